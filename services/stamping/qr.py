"""QR codes for the stamp: the `qrcode` library's symbols, with its choice of mask made faster.

ISO/IEC 18004 has the encoder try all eight mask patterns and keep the one whose symbol
scores the lowest penalty (long runs, 2x2 blocks, finder-like patterns, dark/light balance).
`qrcode` builds the symbol eight times and scores each module by module in Python: of the
3 ms its QR code took in a stamp on the benchmark machine, 2.5 ms went into choosing the
mask. Here the eight candidates come from one build (masking is an XOR over the data
modules) and each rule is a few bit operations over the whole symbol packed into one integer:
the QR code now takes about 0.9 ms, 0.2 ms of it choosing the mask. The symbol is still
`qrcode`'s own, with the very mask `qrcode` would choose: ``tests/stamping/test_qr.py``
compares the two on many inputs, so it fails if a new `qrcode` release changes the internals
used here (``makeImpl``, ``data_cache``, ``modules``, ``version``).
"""

from __future__ import annotations

from functools import cache

import qrcode
from qrcode.util import mask_func

__all__ = ["penalty", "qr_modules"]

_BINARY_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
# 1:1:3:1:1 dark:light:dark:light:dark, with four light modules on one side.
_FINDER_LIKE = ("10111010000", "00001011101")


def qr_modules(data: str) -> list[list[bool]]:
    """The modules of the smallest QR code (error correction level M) holding ``data``,
    rows from the top, True for dark, without a quiet zone."""
    qr = _QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=0)
    qr.add_data(data)
    qr.make(fit=True)
    modules: list[list[bool]] = qr.modules
    return modules


class _QRCode(qrcode.QRCode):  # type: ignore[misc]
    def best_mask_pattern(self) -> int:
        """The mask `qrcode` would choose: the first with the lowest penalty, each scored
        on the symbol as `qrcode` scores it (format information left light)."""
        self.makeImpl(True, 0)
        size = len(self.modules)
        data = _data_modules(self.version)
        masks = _masks(size)
        plain = _pack(self.modules) ^ (masks[0] & data)  # undo mask 0 on the data modules
        scores = [penalty(plain ^ (mask & data), size) for mask in masks]
        return min(range(8), key=scores.__getitem__)


def penalty(symbol: int, size: int) -> int:
    """ISO/IEC 18004's mask penalty, computed as `qrcode.util.lost_point` does, for a
    ``size`` x ``size`` symbol packed into one integer (see :func:`_pack`).

    Each rule is a few operations on the whole symbol: shifting by one module compares
    neighbours along rows, shifting by a row's stride compares them along columns, and the
    light gap between rows stops any pattern from running into the next row.
    """
    stride = size + 1
    dark = symbol
    light = ~symbol & _whole(size)
    score = 0
    for step in (1, stride):  # along rows, then along columns
        for colour in (dark, light):
            # Starts of five in a row: a run of n >= 5 has n - 4 of them and costs n - 2.
            five = colour
            for k in range(1, 5):
                five &= colour >> (k * step)
            score += five.bit_count() + 2 * (five & ~(five >> step)).bit_count()
        for pattern in _FINDER_LIKE:
            found = dark | light
            for k, module in enumerate(pattern):
                found &= (dark if module == "1" else light) >> (k * step)
            score += 40 * found.bit_count()
    for colour in (dark, light):  # 2x2 blocks of one colour
        score += 3 * (colour & colour >> 1 & colour >> stride & colour >> (stride + 1)).bit_count()
    # Every 5% away from half dark costs 10, in qrcode's own floating-point arithmetic.
    score += int(abs(float(dark.bit_count()) / size**2 * 100 - 50) / 5) * 10
    return score


def _pack(modules: list[list[bool]]) -> int:
    """The symbol as one integer: rows of bits (dark = 1) with a light gap between rows."""
    return int(b"0".join(bytes(row).translate(_BINARY_DIGITS) for row in modules), 2)


@cache
def _whole(size: int) -> int:
    """Every module of a symbol, packed (without the gaps between rows)."""
    return _pack([[True] * size] * size)


@cache
def _masks(size: int) -> list[int]:
    """Each of the eight masks over a whole symbol, packed: 1 where the mask flips."""
    return [
        _pack([[bool(flips(row, col)) for col in range(size)] for row in range(size)])
        for flips in map(mask_func, range(8))
    ]


@cache
def _data_modules(version: int) -> int:
    """The modules that carry data (not function patterns), packed: those that differ
    between a symbol filled with ones and one filled with zeros, both long enough to reach
    every data module."""
    scratch = qrcode.QRCode(version=version, border=0)
    filled = []
    for byte in (0x00, 0xFF):
        scratch.data_cache = [byte] * 4096  # more codewords than version 40 holds
        scratch.makeImpl(True, 0)
        filled.append(_pack(scratch.modules))
    return filled[0] ^ filled[1]
