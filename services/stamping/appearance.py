"""The visible e-meterai: title, face value, QR code to the verification page, serial.

Drawn as vector content in a form XObject (no images), legible from about 54 pt upwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyhanko.pdf_utils import generic, layout
from pyhanko.pdf_utils.content import ResourceType
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.writer import BasePdfFileWriter
from pyhanko.stamp import BaseStamp, BaseStampStyle

from services.stamping.qr import qr_modules

# Helvetica-Bold advance widths (Adobe core-14 AFM, 1/1000 em) for the characters we draw.
_HELVETICA_BOLD_WIDTHS = {
    " ": 278, "0": 556, "1": 556, "2": 556, "3": 556, "4": 556, "5": 556, "6": 556, "7": 556,
    "8": 556, "9": 556, "A": 722, "B": 722, "C": 722, "D": 722, "E": 667, "F": 611, "G": 778,
    "H": 722, "I": 278, "J": 556, "K": 722, "L": 611, "M": 833, "N": 722, "O": 778, "P": 667,
    "Q": 778, "R": 722, "S": 667, "T": 611, "U": 722, "V": 667, "W": 944, "X": 667, "Y": 667,
    "Z": 611,
}  # fmt: skip
_FIRST_CHAR, _LAST_CHAR = ord(" "), ord("Z")
_ACCENT = b"0.62 0.09 0.20"  # a deep red, close to the printed meterai's colour
_DESIGN = 100.0  # the stamp is drawn on a 100x100 canvas and scaled into the box


@dataclass(frozen=True)
class EMeteraiStampStyle(BaseStampStyle):
    """Appearance of the e-meterai: title, face value, QR code to the verify page, serial."""

    border_width: int = 0  # the frame is part of our own drawing

    def create_stamp(
        self, writer: BasePdfFileWriter, box: layout.BoxConstraints, text_params: dict[str, Any]
    ) -> EMeteraiStamp:
        """Called by pyHanko with the signature box and our ``serial``/``url`` parameters."""
        return EMeteraiStamp(
            writer, self, box, serial=str(text_params["serial"]), url=str(text_params["url"])
        )


class EMeteraiStamp(BaseStamp):
    """One rendered e-meterai appearance (a form XObject for the signature widget)."""

    def __init__(
        self,
        writer: BasePdfFileWriter,
        style: EMeteraiStampStyle,
        box: layout.BoxConstraints,
        *,
        serial: str,
        url: str,
    ) -> None:
        super().__init__(writer, style, box)
        self.serial = serial
        self.url = url

    def _render_inner_content(self) -> list[bytes]:
        self.set_resource(ResourceType.FONT, pdf_name("/HB"), _helvetica_bold())
        width, height = self.box.width, self.box.height
        scale = min(width, height) / _DESIGN
        # Keep the square design undistorted and centred in non-square boxes.
        dx, dy = (width - _DESIGN * scale) / 2, (height - _DESIGN * scale) / 2
        return [
            b"q %.4f 0 0 %.4f %.3f %.3f cm" % (scale, scale, dx, dy),
            b"1 g 0 0 100 100 re f",
            b"%s RG 1.6 w 1.5 1.5 97 97 re S" % _ACCENT,
            b"%s rg" % _ACCENT,
            _centred_text("METERAI ELEKTRONIK", 50, 87.5, max_size=8, max_width=90),
            _centred_text("10000", 22.5, 48, max_size=13.5, max_width=38),
            b"0 g",
            _centred_text("SEPULUH RIBU RUPIAH", 50, 16, max_size=7.6, max_width=90),
            _centred_text(self.serial, 50, 6, max_size=7.5, max_width=91),
            _qr_code(self.url, x=42, y=24, side=54),
            b"Q",
        ]

    def as_form_xobject(self) -> generic.StreamObject:
        """Render as pyHanko does, then compress: the QR code's rectangles deflate well."""
        xobject = super().as_form_xobject()
        xobject.compress()  # type: ignore[no-untyped-call]
        return xobject


def _helvetica_bold() -> generic.DictionaryObject:
    """The standard Helvetica-Bold, not embedded; /Widths pins our metrics in every viewer."""
    widths = [
        _pdf_int(_HELVETICA_BOLD_WIDTHS.get(chr(code), 0))
        for code in range(_FIRST_CHAR, _LAST_CHAR + 1)
    ]
    return generic.DictionaryObject(  # type: ignore[no-untyped-call]
        {
            pdf_name("/Type"): pdf_name("/Font"),
            pdf_name("/Subtype"): pdf_name("/Type1"),
            pdf_name("/BaseFont"): pdf_name("/Helvetica-Bold"),
            pdf_name("/Encoding"): pdf_name("/WinAnsiEncoding"),
            pdf_name("/FirstChar"): _pdf_int(_FIRST_CHAR),
            pdf_name("/LastChar"): _pdf_int(_LAST_CHAR),
            pdf_name("/Widths"): generic.ArrayObject(widths),
        }
    )


def _pdf_int(value: int) -> generic.NumberObject:
    return generic.NumberObject(value)  # type: ignore[no-untyped-call]


def _centred_text(
    text: str, centre_x: float, baseline: float, *, max_size: float, max_width: float
) -> bytes:
    """Helvetica-Bold text centred on ``centre_x``, shrunk to fit ``max_width`` if needed."""
    em = sum(_HELVETICA_BOLD_WIDTHS[char] for char in text) / 1000
    size = min(max_size, max_width / em)
    x = centre_x - em * size / 2
    return b"BT /HB %.3f Tf %.3f %.3f Td (%s) Tj ET" % (size, x, baseline, text.encode("ascii"))


def _qr_code(data: str, *, x: float, y: float, side: float) -> bytes:
    """A QR code as filled rectangles (one per run of dark modules), 2-module quiet zone."""
    rows = qr_modules(data)
    count = len(rows)
    module = side / (count + 4)
    runs: list[bytes] = []
    for row_index, row in enumerate(rows):
        # PDF's y axis points up; QR rows are numbered from the top.
        top = count - 1 - row_index
        col = 0
        while col < count:
            if not row[col]:
                col += 1
                continue
            start = col
            while col < count and row[col]:
                col += 1
            runs.append(b"%d %d %d 1 re" % (start, top, col - start))
    origin_x, origin_y = x + 2 * module, y + 2 * module
    return b"q 0 g %.4f 0 0 %.4f %.3f %.3f cm %s f Q" % (
        module,
        module,
        origin_x,
        origin_y,
        b" ".join(runs),
    )
