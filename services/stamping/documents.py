"""What a document must be to get a stamp, and where on it the stamp goes.

Used by the API before accepting a job and by the signer before signing, always inside an
error boundary that turns whatever else a hostile document raises into DocumentRejected (see
``services.stamping.signing``). Readers come from :mod:`services.stamping.reading`: every
function here runs under that document's CPU budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields
from pyhanko.sign.validation import read_certification_data

from services.stamping.reading import BudgetedReader, CpuBudget

__all__ = [
    "DEFAULT_BOX_MARGIN",
    "DEFAULT_BOX_SIZE",
    "MIN_BOX_SIDE",
    "DocumentRejected",
    "StampBox",
    "hybrid_opt_in",
    "open_document",
    "placement",
    "refuse_stamped",
    "rehearse",
]

DEFAULT_BOX_SIZE = 90.0
DEFAULT_BOX_MARGIN = 36.0
# Below half an inch the QR code stops being scannable; a zero-size box would even make
# pyHanko create an invisible signature.
MIN_BOX_SIDE = 36.0
# Boxes computed by clients from floating-point page sizes may overshoot by rounding noise.
_TOLERANCE = 0.01
# Page boxes beyond this many points are nonsense (the PDF limit is 14,400 user units).
_MAX_COORDINATE = 1_000_000.0
# Page trees are a few levels deep; a /Parent chain longer than this is a loop.
_MAX_TREE_DEPTH = 256


@dataclass(frozen=True)
class StampBox:
    """A rectangle in PDF user space (points), lower-left and upper-right corners."""

    llx: float
    lly: float
    urx: float
    ury: float

    @classmethod
    def normalised(cls, llx: float, lly: float, urx: float, ury: float) -> StampBox:
        """Build a box from two opposite corners given in any order."""
        return cls(min(llx, urx), min(lly, ury), max(llx, urx), max(lly, ury))

    @property
    def width(self) -> float:
        """Horizontal extent in points."""
        return self.urx - self.llx

    @property
    def height(self) -> float:
        """Vertical extent in points."""
        return self.ury - self.lly

    def contains(self, other: StampBox) -> bool:
        """True if ``other`` lies inside this box (with a rounding tolerance)."""
        return (
            other.llx >= self.llx - _TOLERANCE
            and other.lly >= self.lly - _TOLERANCE
            and other.urx <= self.urx + _TOLERANCE
            and other.ury <= self.ury + _TOLERANCE
        )


class DocumentRejected(Exception):
    """The input document cannot be stamped; retrying will not help.

    ``code`` is stable and machine-readable: ``invalid_pdf``, ``encrypted_pdf``,
    ``certified_no_changes``, ``certified_pdf``, ``no_pages``, ``page_out_of_range``,
    ``box_off_page``, ``box_too_small``, ``already_stamped``, ``too_complex`` (the document
    exceeds a processing limit: CPU time, decompressed size, nesting depth or memory).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def open_document(pdf: bytes, budget: CpuBudget) -> PdfFileReader:
    """Parse a document and refuse the kinds we never sign."""
    if not pdf.startswith(b"%PDF-"):
        raise DocumentRejected("invalid_pdf", "the file does not start with a PDF header")
    reader = BudgetedReader(pdf, budget)
    # Checked on the trailer so that unsupported security handlers also land here.
    if "/Encrypt" in reader.trailer_view:
        raise DocumentRejected("encrypted_pdf", "encrypted PDFs cannot be stamped")
    certification = read_certification_data(reader)
    if certification is not None:
        if certification.permission == fields.MDPPerm.NO_CHANGES:
            raise DocumentRejected("certified_no_changes", "the author certified: no changes")
        # Even "form filling and signing" only covers existing fields: a new visible signature
        # field breaks the author's certification in Acrobat and pyHanko's validator alike.
        raise DocumentRejected(
            "certified_pdf", "the author's certification does not allow new signature fields"
        )
    return reader


def hybrid_opt_in(pdf: bytes, budget: CpuBudget) -> PdfFileReader:
    """A reader that lets pyHanko sign a hybrid-reference file (an xref table plus /XRefStm).

    MS Office still writes these. pyHanko makes signing them opt-in, through non-strict
    parsing, because PDF 1.4 readers ignore the /XRefStm part; none are left in use. The
    strict reader already parsed the document, and the API rehearsed the stamp on it.
    """
    return BudgetedReader(pdf, budget, strict=False)


def refuse_stamped(reader: PdfFileReader, serial: str) -> None:
    """Refuse a document that already carries our stamp with ``serial``."""
    field_name = f"eMeterai-{serial}"
    if any(True for _ in fields.enumerate_sig_fields(reader, with_name=field_name)):
        raise DocumentRejected("already_stamped", f"{field_name} is already present")


def rehearse(reader: PdfFileReader, page_index: int, box: StampBox) -> None:
    """Make the changes a stamp makes (a signature field and its widget on the page, updated
    document metadata) and throw them away, so that a form, annotation list or XMP packet the
    signer would trip over is refused at upload rather than in a signing worker."""
    writer = IncrementalPdfFileWriter.from_reader(reader)
    fields.append_signature_field(
        writer,
        fields.SigFieldSpec(
            sig_field_name="eMeterai-rehearsal",
            on_page=page_index,
            box=(box.llx, box.lly, box.urx, box.ury),  # type: ignore[arg-type]
        ),
    )
    writer.write(BytesIO())  # type: ignore[no-untyped-call]


def placement(
    reader: PdfFileReader, page: int | None, box: StampBox | None
) -> tuple[int, StampBox]:
    """Resolve the 1-based (or default last) page and the box, checking both against the page."""
    count = reader.root["/Pages"]["/Count"]
    if not isinstance(count, int):
        raise DocumentRejected("invalid_pdf", "the page tree has no valid /Count")
    if count < 1:
        raise DocumentRejected("no_pages", "the document has no pages")
    if page is not None and not 1 <= page <= count:
        raise DocumentRejected("page_out_of_range", f"page {page} is not in 1..{count}")
    page_index = count - 1 if page is None else page - 1
    page_ref, _ = reader.find_page_for_modification(page_index)  # type: ignore[no-untyped-call]
    visible = _visible_area(page_ref.get_object())
    if box is None:
        box = StampBox(
            visible.urx - DEFAULT_BOX_MARGIN - DEFAULT_BOX_SIZE,
            visible.lly + DEFAULT_BOX_MARGIN,
            visible.urx - DEFAULT_BOX_MARGIN,
            visible.lly + DEFAULT_BOX_MARGIN + DEFAULT_BOX_SIZE,
        )
    else:
        box = StampBox.normalised(box.llx, box.lly, box.urx, box.ury)
        if min(box.width, box.height) < MIN_BOX_SIDE:
            raise DocumentRejected(
                "box_too_small", f"the stamp box must be at least {MIN_BOX_SIDE:g} pt each side"
            )
    if not visible.contains(box):
        raise DocumentRejected("box_off_page", f"{box} is not inside page {page_index + 1}")
    return page_index, box


def _visible_area(page: generic.DictionaryObject) -> StampBox:
    """The page's crop box clipped to its media box (both may be inherited)."""
    media = _as_box(_inherited(page, "/MediaBox"))
    crop_value = _inherited(page, "/CropBox")
    if crop_value is None:
        return media
    crop = _as_box(crop_value)
    return StampBox(
        max(media.llx, crop.llx),
        max(media.lly, crop.lly),
        min(media.urx, crop.urx),
        min(media.ury, crop.ury),
    )


def _inherited(page: generic.DictionaryObject, key: str) -> Any:
    """A page attribute that may be set on the page or on any ancestor in the page tree.

    pyHanko's own lookup follows /Parent for ever when the chain loops."""
    node = page
    for _ in range(_MAX_TREE_DEPTH):
        if key in node:
            return node[key]
        if "/Parent" not in node:
            return None
        node = node["/Parent"]
    raise DocumentRejected("invalid_pdf", "the page tree's /Parent chain does not end")


def _as_box(value: Any) -> StampBox:
    if value is None or len(value) != 4:
        raise DocumentRejected("invalid_pdf", "a page has no valid /MediaBox")
    llx, lly, urx, ury = (float(v) for v in value)
    if not all(math.isfinite(v) and abs(v) <= _MAX_COORDINATE for v in (llx, lly, urx, ury)):
        raise DocumentRejected("invalid_pdf", "a page box has coordinates out of range")
    return StampBox.normalised(llx, lly, urx, ury)
