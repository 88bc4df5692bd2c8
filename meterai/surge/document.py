"""The reference document of the benchmarks and the surge: what a CPNS applicant uploads.

A4, four pages of text and, on the first, a photo-like image: about 780 KB, like a scanned
statement. Generated (deterministically), so that no binary fixture lives in the repository.
"""

from __future__ import annotations

import random
from io import BytesIO

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.font.basic import get_courier
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

A4 = (595.28, 841.89)
_WORDS = (
    "surat pernyataan bersedia ditempatkan di seluruh wilayah negara kesatuan republik "
    "indonesia saya yang bertanda tangan di bawah ini menyatakan dengan sesungguhnya bahwa "
    "data yang saya sampaikan adalah benar dan apabila di kemudian hari terbukti tidak benar"
).split()


def reference_document(pages: int = 4, seed: int = 2024) -> bytes:
    """A4 pages of text in Courier and, on the first page, a 480x560 RGB image (deflated
    noise over a gradient, so that it stays about 780 KB as a scan or a photo would)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    writer = PdfFileWriter(stream_xrefs=False)
    font = writer.add_object(get_courier(writer))
    width, height = 480, 560
    pixels = b"".join(
        bytes(
            (noise >> 2) + ((x // 3 + y) % 160) for x, noise in enumerate(rng.randbytes(3 * width))
        )
        for y in range(height)
    )
    image = generic.StreamObject(
        {
            pdf_name("/Type"): pdf_name("/XObject"),
            pdf_name("/Subtype"): pdf_name("/Image"),
            pdf_name("/Width"): generic.NumberObject(width),
            pdf_name("/Height"): generic.NumberObject(height),
            pdf_name("/ColorSpace"): pdf_name("/DeviceRGB"),
            pdf_name("/BitsPerComponent"): generic.NumberObject(8),
        },
        stream_data=pixels,
    )
    image.compress()
    image_ref = writer.add_object(image)
    for number in range(pages):
        resources = generic.DictionaryObject(
            {pdf_name("/Font"): generic.DictionaryObject({pdf_name("/F1"): font})}
        )
        lines = 20 if number == 0 else 60
        ops = [b"BT /F1 10 Tf 12 TL 56 790 Td"]
        ops += [
            b"(%s) '" % " ".join(rng.choice(_WORDS) for _ in range(11)).encode()
            for _ in range(lines)
        ]
        ops.append(b"ET")
        if number == 0:
            resources[pdf_name("/XObject")] = generic.DictionaryObject(
                {pdf_name("/Im1"): image_ref}
            )
            ops.append(b"q 288 0 0 336 154 120 cm /Im1 Do Q")
        contents = generic.StreamObject(stream_data=b"\n".join(ops))
        contents.compress()
        writer.insert_page(
            PageObject(
                contents=writer.add_object(contents), media_box=(0, 0, *A4), resources=resources
            )
        )
    out = BytesIO()
    writer.write(out)
    return out.getvalue()
