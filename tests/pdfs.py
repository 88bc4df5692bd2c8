"""Generate small, valid PDFs for tests (no binary fixtures in the repository)."""

from __future__ import annotations

from io import BytesIO

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.font.basic import get_courier
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

A4 = (595.28, 841.89)
"""A4 in PDF points (210 x 297 mm)."""


def make_pdf(
    pages: int = 3,
    *,
    text: bool = True,
    size: tuple[float, float] = A4,
    user_password: str | None = None,
) -> bytes:
    """Return a fresh PDF with ``pages`` pages of ``size`` points.

    With ``text`` each page carries a line of Courier text ("Test page N of M") so that
    renderers and text extractors have something to show. With ``user_password`` the
    document is encrypted (AES-256, PDF 2.0 standard security handler).
    """
    if pages < 1:
        raise ValueError("a PDF needs at least one page")
    writer = PdfFileWriter(stream_xrefs=False)
    width, height = size
    # One shared font resource dictionary; pages refer to it indirectly.
    resources = generic.DictionaryObject(
        {
            pdf_name("/Font"): generic.DictionaryObject(
                {pdf_name("/F1"): writer.add_object(get_courier(writer))}
            )
        }
    )
    for number in range(1, pages + 1):
        ops = b""
        if text:
            line = f"Test page {number} of {pages}".encode("ascii")
            ops = b"BT /F1 14 Tf 72 %.2f Td (%s) Tj ET" % (height - 72, line)
        contents = writer.add_object(generic.StreamObject(stream_data=ops))
        page = PageObject(contents=contents, media_box=(0, 0, width, height), resources=resources)
        writer.insert_page(page)
    if user_password is not None:
        writer.encrypt(user_password, user_password)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def changed_page(document: bytes) -> bytes:
    """The document with an incremental update that replaces the first page's content."""
    writer = IncrementalPdfFileWriter(BytesIO(document))
    page_ref, _ = writer.find_page_for_modification(0)
    page = page_ref.get_object()
    page["/Contents"] = writer.add_object(
        generic.StreamObject(stream_data=b"BT /F1 14 Tf 72 500 Td (Paid in full) Tj ET")
    )
    writer.update_container(page)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()
