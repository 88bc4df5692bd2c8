"""QR codes for the stamp, from zxing-cpp's encoder.

The QR code is the costliest part of a stamp's appearance. The pure-Python `qrcode` library
(what pyHanko's own QR stamp uses) took 2.1 ms per symbol on the 2-core benchmark machine,
a quarter of a whole stamp, most of it in Reed-Solomon arithmetic and in trying all eight
mask patterns module by module. zxing-cpp's C++ encoder makes the same kind of symbol
(ISO/IEC 18004, error correction level M, the mask with the lowest penalty) in about 0.2 ms.
It also splits a URL into segments (the upper-case serial in alphanumeric mode), so a verify
URL often fits a smaller version, whose modules print larger in the same box.
"""

from __future__ import annotations

import zxingcpp

__all__ = ["MAX_BYTES", "qr_modules"]

MAX_BYTES = 2331
"""What any QR code at level M holds in byte mode: data up to this many bytes always fits."""
_DARK = 0  # zxing-cpp draws dark modules black on a white 8-bit image


def qr_modules(data: str) -> list[list[bool]]:
    """The modules of the smallest QR code (error correction level M) holding ``data``,
    rows from the top, True for dark, without a quiet zone.

    Raises ValueError if ``data`` does not fit any QR code at level M (see MAX_BYTES).
    """
    barcode = zxingcpp.create_barcode(data, zxingcpp.BarcodeFormat.QRCode, ec_level="M")
    image = barcode.to_image(scale=1, add_quiet_zones=False)
    size = image.shape[0]
    pixels = bytes(memoryview(image))  # type: ignore[arg-type]  # a buffer; the stub omits it
    return [
        [pixel == _DARK for pixel in pixels[row : row + size]]
        for row in range(0, size * size, size)
    ]
