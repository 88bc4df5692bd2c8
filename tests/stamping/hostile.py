"""Hostile and odd documents for the stamping API, made at run time (no binary fixtures).

Each :class:`HostileCase` builds its bytes and says what Meterai must answer: a 4xx problem at
upload (:class:`Refused`) or an accepted job that is stamped (:class:`Stamped`). Validation at
upload rehearses everything the signer touches, so no case here is left for a worker to fail;
the tests add the one that only a worker can see (our stamp with the serial the upload gets).

Most documents are assembled byte by byte so that they break exactly where intended; qpdf
makes the encrypted and object-stream variants, and pyHanko the signed and certified ones.
"""

from __future__ import annotations

import random
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from services.stamping.keys import SigningKeyPaths
from services.stamping.signing import StampRequest, StampSigner
from tests.pdfs import make_pdf
from tests.pdftools import require

GiB = 1024**3
MiB = 1024**2
A4_BOX = b"[0 0 595 842]"


@dataclass(frozen=True)
class Refused:
    """The upload is answered with a problem+json `status` and `code`; no job, no serial."""

    status: int
    code: str


@dataclass(frozen=True)
class Stamped:
    """The upload is accepted and the job ends `done`."""


Outcome = Refused | Stamped


@dataclass(frozen=True)
class Materials:
    """What some builders need: signing keys (signed documents), a serial (already stamped)."""

    keys: SigningKeyPaths
    serial: str
    max_upload_bytes: int


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[Materials], bytes]
    expect: Outcome
    # Extra form fields sent with the upload; "{serial}" is replaced with Materials.serial.
    form: dict[str, str] = field(default_factory=dict)


# --- Assembling PDFs byte by byte ---------------------------------------------------------


def stream(data: bytes, entries: bytes = b"", length: int | None = None) -> bytes:
    """A stream object's body with /Length (the true one unless ``length`` says otherwise)."""
    size = len(data) if length is None else length
    return b"<< /Length %d %s >>\nstream\n%s\nendstream" % (size, entries, data)


class Assembler:
    """Writes numbered objects, then a classic cross-reference table and trailer."""

    def __init__(self, header: bytes = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n") -> None:
        self.out = bytearray(header)
        self.offsets: dict[int, int] = {}

    def add(self, number: int, body: bytes) -> None:
        self.offsets[number] = len(self.out)
        self.out += b"%d 0 obj\n%s\nendobj\n" % (number, body)

    def add_all(self, objects: dict[int, bytes]) -> None:
        for number, body in objects.items():
            self.add(number, body)

    def xref_table(self, trailer: bytes, *, skip: Iterable[int] = (), shift: int = 0) -> int:
        """Write an xref table for objects 0..max (``skip`` listed as free) and the trailer;
        return where the table starts. ``shift`` moves every offset (a broken table)."""
        start = len(self.out)
        size = max(self.offsets) + 1
        skipped = set(skip)
        self.out += b"xref\n0 %d\n0000000000 65535 f \n" % size
        for number in range(1, size):
            if number in self.offsets and number not in skipped:
                self.out += b"%010d 00000 n \n" % (self.offsets[number] + shift)
            else:
                # Generation 65535: never reused, so readers look in a hybrid file's
                # /XRefStm for it.
                self.out += b"0000000000 65535 f \n"
        self.out += b"trailer\n<< /Size %d %s >>\n" % (size, trailer)
        return start

    def finish(self, startxref: int) -> bytes:
        self.out += b"startxref\n%d\n%%%%EOF\n" % startxref
        return bytes(self.out)


def one_page_objects(
    *,
    page: bytes = b"/MediaBox " + A4_BOX,
    contents: bytes = stream(b"BT /F1 14 Tf 72 770 Td (Hostile but fine) Tj ET"),
    catalog: bytes = b"",
    pages: bytes = b"/Kids [3 0 R] /Count 1",
) -> dict[int, bytes]:
    """Catalog 1, page tree 2, page 3 and its contents 4, font 5; extras spliced in."""
    return {
        1: b"<< /Type /Catalog /Pages 2 0 R %s >>" % catalog,
        2: b"<< /Type /Pages %s >>" % pages,
        3: b"<< /Type /Page /Parent 2 0 R %s /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>" % page,
        4: contents,
        5: b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier >>",
    }


def classic(objects: dict[int, bytes], trailer: bytes = b"/Root 1 0 R") -> bytes:
    """A well-formed file around ``objects`` (a classic xref table)."""
    pdf = Assembler()
    pdf.add_all(objects)
    return pdf.finish(pdf.xref_table(trailer))


def one_page(**parts: bytes) -> bytes:
    return classic(one_page_objects(**parts))


def object_stream(objects: dict[int, bytes], extra: bytes = b"") -> bytes:
    """An /ObjStm holding ``objects`` (Flate-compressed)."""
    header = bytearray()
    body = bytearray()
    for number, value in objects.items():
        header += b"%d %d " % (number, len(body))
        body += value + b"\n"
    data = zlib.compress(bytes(header) + bytes(body))
    return stream(
        data,
        b"/Type /ObjStm /N %d /First %d /Filter /FlateDecode %s"
        % (len(objects), len(header), extra),
    )


def xref_stream(entries: dict[int, tuple[int, int, int]], size: int, trailer: bytes = b"") -> bytes:
    """An /XRef stream (W [1 4 4]) listing ``entries`` as (type, field 2, field 3), with
    ``trailer`` entries; /Index names runs of consecutive object numbers."""
    rows = bytearray()
    runs: list[list[int]] = []
    for number in sorted(entries):
        kind, second, third = entries[number]
        rows += struct.pack(">BII", kind, second, third)
        if runs and runs[-1][0] + runs[-1][1] == number:
            runs[-1][1] += 1
        else:
            runs.append([number, 1])
    index = b" ".join(b"%d %d" % (first, count) for first, count in runs)
    return stream(
        zlib.compress(bytes(rows)),
        b"/Type /XRef /W [1 4 4] /Size %d /Index [%s] /Filter /FlateDecode %s"
        % (size, index, trailer),
    )


def with_object_stream(
    objects: dict[int, bytes], packed: Iterable[int], objstm: bytes | None = None
) -> bytes:
    """A PDF 1.5 file whose ``packed`` objects live in one object stream (or in ``objstm``
    instead), found through an xref stream (no classic table at all)."""
    packed = list(packed)
    inside = set(packed)
    stm_number = max(objects) + 1
    xref_number = stm_number + 1
    pdf = Assembler()
    for number, body in objects.items():
        if number not in inside:
            pdf.add(number, body)
    pdf.add(stm_number, objstm or object_stream({n: objects[n] for n in packed}))
    entries = {n: (1, offset, 0) for n, offset in pdf.offsets.items()}
    entries.update({n: (2, stm_number, index) for index, n in enumerate(packed)})
    start = len(pdf.out)
    entries[xref_number] = (1, start, 0)
    pdf.add(xref_number, xref_stream(entries, xref_number + 1, b"/Root 1 0 R"))
    return pdf.finish(start)


def flate_bomb(inflated: int, layers: int = 1) -> bytes:
    """Valid zlib data that inflates to ``inflated`` zero bytes (a multiple of 1 MiB), built
    without ever holding or compressing that much: after a full flush the compressor emits the
    same bytes for every further megabyte of zeros. ``layers`` > 1 compresses it again."""
    compressor = zlib.compressobj(9)
    zeros = bytes(MiB)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH) == repeat
    tail = compressor.flush(zlib.Z_FINISH)[:-4]  # the final block; adler32 follows
    # Adler-32 of n zero bytes: A stays 1, B grows by 1 per byte.
    checksum = struct.pack(">I", ((inflated % 65521) << 16) | 1)
    data = first + repeat * (inflated // MiB - 1) + tail + checksum
    for _ in range(layers - 1):
        data = zlib.compress(data, 9)
    return data


def qpdf(pdf: bytes, *args: str) -> bytes:
    """Rewrite ``pdf`` with the qpdf command line (installed with the test tools)."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.pdf", Path(folder) / "out.pdf"
        source.write_bytes(pdf)
        result = subprocess.run(
            [require("qpdf"), *args, str(source), str(target)],
            capture_output=True,
            timeout=60,
        )
        # 3 = warnings only, e.g. about weak cryptography asked for on purpose.
        assert result.returncode in (0, 3), result.stderr
        return target.read_bytes()


def encrypted(user: str, bits: int, aes: bool) -> Callable[[Materials], bytes]:
    """Encrypted by qpdf (RC4 for 40 and 128 bits unless ``aes``; AES for 256)."""

    def build(_: Materials) -> bytes:
        options = ["--allow-weak-crypto", "--encrypt", user, "owner-secret", str(bits)]
        if bits == 128:
            options.append(f"--use-aes={'y' if aes else 'n'}")
        return qpdf(make_pdf(2), *options, "--")

    return build


def _author(materials: Materials) -> signers.SimpleSigner:
    keys = materials.keys
    signer = signers.SimpleSigner.load(
        str(keys.signer_key), str(keys.signer_cert), ca_chain_files=[str(keys.ca_cert)]
    )
    assert signer is not None
    return signer


def signed(certify: fields.MDPPerm | None) -> Callable[[Materials], bytes]:
    """Signed by an applicant (approval signature) or certified by its author."""

    def build(materials: Materials) -> bytes:
        meta = signers.PdfSignatureMetadata(
            field_name="Author" if certify else "Applicant",
            certify=certify is not None,
            docmdp_permissions=certify or fields.MDPPerm.FILL_FORMS,
        )
        writer = IncrementalPdfFileWriter(BytesIO(make_pdf(2)))
        output = signers.PdfSigner(meta, signer=_author(materials)).sign_pdf(writer)
        return bytes(output.getvalue())

    return build


def stamped_by_us(materials: Materials) -> bytes:
    """A document that already carries our stamp with ``materials.serial``."""
    keys = materials.keys
    signer = StampSigner.from_pem_files(keys.signer_key, keys.signer_cert, [keys.ca_cert])
    request = StampRequest(serial=materials.serial, verify_url="http://meterai.test/verify")
    return signer.stamp(make_pdf(1), request)


def png(_: Materials) -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def truncated(fraction: float) -> bytes:
    whole = make_pdf(3)
    return whole[: int(len(whole) * fraction)]


def shifted_xref() -> bytes:
    """Every xref offset points 7 bytes past its object."""
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    return pdf.finish(pdf.xref_table(b"/Root 1 0 R", shift=7))


def startxref_to_garbage() -> bytes:
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    pdf.xref_table(b"/Root 1 0 R")
    return pdf.finish(40)


def no_xref() -> bytes:
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    return bytes(pdf.out) + b"%%EOF\n"


def billion_entry_xref() -> bytes:
    """An xref subsection that claims 10^9 entries (and lists six)."""
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    start = len(pdf.out)
    pdf.out += b"xref\n0 1000000000\n0000000000 65535 f \n"
    pdf.out += b"".join(b"%010d 00000 n \n" % pdf.offsets[n] for n in sorted(pdf.offsets))
    pdf.out += b"trailer\n<< /Size 1000000000 /Root 1 0 R >>\n"
    return pdf.finish(start)


def self_referencing_prev() -> bytes:
    """An incremental update whose trailer's /Prev points at its own xref table."""
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    first = pdf.xref_table(b"/Root 1 0 R")
    pdf.out += b"startxref\n%d\n%%%%EOF\n" % first
    pdf.add(3, one_page_objects(page=b"/MediaBox [0 0 600 800]")[3])
    second = len(pdf.out)
    pdf.out += b"xref\n0 1\n0000000000 65535 f \n3 1\n%010d 00000 n \n" % pdf.offsets[3]
    pdf.out += b"trailer\n<< /Size 6 /Root 1 0 R /Prev %d >>\n" % second
    return pdf.finish(second)


def huge_xref_stream(size: int) -> bytes:
    """An xref stream for ``size`` objects, all but a few free (zeros compress well)."""
    pdf = Assembler(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    pdf.add_all(one_page_objects())
    start = len(pdf.out)
    rows = bytearray(9 * size)  # W [1 4 4]: type 0 (free) throughout
    for number, offset in [*pdf.offsets.items(), (size - 1, start)]:
        rows[9 * number : 9 * number + 9] = struct.pack(">BII", 1, offset, 0)
    entries = b"/Type /XRef /W [1 4 4] /Size %d /Root 1 0 R /Filter /FlateDecode" % size
    pdf.add(size - 1, stream(zlib.compress(bytes(rows)), entries))
    return pdf.finish(start)


def revisions(count: int) -> bytes:
    """``count`` incremental updates, each rewriting the page (a long /Prev chain)."""
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    previous = pdf.xref_table(b"/Root 1 0 R")
    for n in range(count):
        pdf.out += b"startxref\n%d\n%%%%EOF\n" % previous
        pdf.add(3, one_page_objects(page=b"/MediaBox [0 0 595 %d]" % (800 + n % 40))[3])
        section = len(pdf.out)
        pdf.out += b"xref\n3 1\n%010d 00000 n \n" % pdf.offsets[3]
        pdf.out += b"trailer\n<< /Size 6 /Root 1 0 R /Prev %d >>\n" % previous
        previous = section
    return pdf.finish(previous)


def hybrid(broken: bool = False) -> bytes:
    """A hybrid-reference file (as MS Office writes them): the page object is only listed in
    the /XRefStm stream that PDF 1.5 readers consult after the classic table."""
    objects = one_page_objects()
    pdf = Assembler(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    for number in (1, 2, 4, 5):
        pdf.add(number, objects[number])
    pdf.add(6, object_stream({3: objects[3]}))
    stream_at = len(pdf.out)
    pdf.add(7, xref_stream({3: (2, 6, 0), 7: (1, stream_at, 0)}, 8))
    xrefstm = stream_at + 3 if broken else stream_at
    table = pdf.xref_table(b"/Root 1 0 R /XRefStm %d" % xrefstm, skip=(3, 7))
    return pdf.finish(table)


def binary_trailer() -> bytes:
    pdf = Assembler()
    pdf.add_all(one_page_objects())
    start = pdf.xref_table(b"/Root 1 0 R /Junk " + random.Random(7).randbytes(300))
    return pdf.finish(start)


def many_pages(count: int) -> bytes:
    """``count`` pages sharing one contents stream, in a flat page tree."""
    kids = b" ".join(b"%d 0 R" % (10 + n) for n in range(count))
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d /MediaBox %s >>" % (kids, count, A4_BOX),
        3: stream(b"BT /F1 12 Tf 72 770 Td (A page) Tj ET"),
        4: b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier >>",
    }
    for n in range(count):
        objects[10 + n] = (
            b"<< /Type /Page /Parent 2 0 R /Contents 3 0 R"
            b" /Resources << /Font << /F1 4 0 R >> >> >>"
        )
    return classic(objects)


def one_page_listed(times: int, in_object_stream: bool = False) -> bytes:
    """One page listed ``times`` times in one /Kids array (six bytes per entry)."""
    objects = one_page_objects(pages=b"/Kids [%s] /Count %d" % (b"3 0 R " * times, times))
    if in_object_stream:
        return with_object_stream(objects, packed=[1, 2, 3, 5])
    return classic(objects)


def many_objects_in_one_stream(count: int) -> bytes:
    """``count`` small objects in one object stream, the page tree after all of them."""
    objects = {10 + n: b"<< /N %d >>" % n for n in range(count)}
    objects.update(one_page_objects())
    # Streams (the contents, 4) cannot live in an object stream.
    return with_object_stream(objects, packed=[n for n in objects if n != 4])


def page_tree_cycle() -> bytes:
    """Two /Pages nodes that are each other's kid."""
    return classic(
        {
            1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            3: b"<< /Type /Pages /Parent 2 0 R /Kids [2 0 R] /Count 1 >>",
        }
    )


def parent_cycle() -> bytes:
    """A page without a /MediaBox whose ancestors form a loop: looking up an inherited value
    must not follow /Parent for ever."""
    objects = one_page_objects(page=b"", pages=b"/Kids [3 0 R] /Count 1 /Parent 6 0 R")
    objects[6] = b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R >>"
    return classic(objects)


def nested(depth: int, opening: bytes, core: bytes, closing: bytes) -> bytes:
    """A page carrying an entry nested ``depth`` levels deep (read whenever the page is)."""
    value = opening * depth + core + closing * depth
    return one_page(page=b"/MediaBox %s /PieceInfo %s" % (A4_BOX, value))


def object_stream_bomb() -> bytes:
    """The catalog and page tree live in an object stream that inflates to 1 GiB."""
    bomb = stream(
        flate_bomb(GiB, layers=2),
        b"/Type /ObjStm /N 4 /First 20 /Filter [/FlateDecode /FlateDecode]",
    )
    return with_object_stream(one_page_objects(), packed=[1, 2, 3, 5], objstm=bomb)


def content_stream_bomb() -> bytes:
    """The page's content stream inflates to 8 GiB (from 20 KB): stamping must not read it."""
    return one_page(
        contents=stream(flate_bomb(8 * GiB, layers=2), b"/Filter [/FlateDecode /FlateDecode]")
    )


def xmp(packet: bytes, compress: bool = False) -> bytes:
    """A document whose catalog carries ``packet`` as XMP metadata (the signer updates it)."""
    objects = one_page_objects(catalog=b"/Metadata 6 0 R")
    data = zlib.compress(packet, 9) if compress else packet
    extra = b"/Type /Metadata /Subtype /XML" + (b" /Filter /FlateDecode" if compress else b"")
    objects[6] = stream(data, extra)
    return classic(objects)


XMP_OPEN = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">'
    b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
)
XMP_CLOSE = b'</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'


def xmp_with_elements(count: int) -> bytes:
    items = b"<rdf:li>x</rdf:li>" * count
    packet = XMP_OPEN + b"<dc:subject><rdf:Bag>%s</rdf:Bag></dc:subject>" % items + XMP_CLOSE
    return xmp(packet, compress=True)


def xmp_billion_laughs() -> bytes:
    """Entities nested eight deep: 10^9 bytes if a parser expanded them."""
    entities = b"".join(b'<!ENTITY %c "%s">' % (98 + n, b"&%c;" % (97 + n) * 10) for n in range(8))
    doctype = b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">%s]>' % entities
    return xmp(doctype + XMP_OPEN + b"<dc:format>&i;</dc:format>" + XMP_CLOSE)


def field_cycle() -> bytes:
    """Two form fields that are each other's kid."""
    objects = one_page_objects(catalog=b"/AcroForm << /Fields [6 0 R] >>")
    objects[6] = b"<< /T (a) /Kids [7 0 R] >>"
    objects[7] = b"<< /T (b) /Parent 6 0 R /Kids [6 0 R] >>"
    return classic(objects)


def embedded_file() -> bytes:
    objects = one_page_objects(catalog=b"/Names << /EmbeddedFiles << /Names [(a.txt) 6 0 R] >> >>")
    objects[6] = b"<< /Type /Filespec /F (a.txt) /EF << /F 7 0 R >> >>"
    objects[7] = stream(b"attached text", b"/Type /EmbeddedFile")
    return classic(objects)


def too_large(materials: Materials) -> bytes:
    """A valid PDF one byte over the limit (its padding stream is never read)."""
    objects = one_page_objects(catalog=b"/PieceInfo 6 0 R")
    objects[6] = stream(b"")
    overhead = len(classic(objects))
    objects[6] = stream(b"0" * (materials.max_upload_bytes + 1 - overhead))
    return classic(objects)


def with_page(entries: bytes) -> bytes:
    """One A4 page with extra page dictionary entries."""
    return one_page(page=b"/MediaBox %s %s" % (A4_BOX, entries))


INVALID = Refused(422, "invalid_pdf")
NOT_PDF = Refused(415, "not_pdf")
ENCRYPTED = Refused(422, "encrypted_pdf")
TOO_COMPLEX = Refused(422, "too_complex")
STAMPED = Stamped()
JAVASCRIPT = b"/OpenAction << /S /JavaScript /JS (app.alert\\('hello'\\);) >>"
HUGE = b"9" * 400  # a PDF real that reads as infinity

CASES: list[HostileCase] = [
    # Not a PDF at all: refused by the upload route, before any parsing.
    HostileCase("empty-file", lambda _: b"", NOT_PDF),
    HostileCase("random-bytes", lambda _: random.Random(1).randbytes(4096), NOT_PDF),
    HostileCase("png-image", png, NOT_PDF),
    HostileCase("html-page", lambda _: b"<!doctype html><body>%PDF?</body>", NOT_PDF),
    HostileCase("header-after-first-kilobyte", lambda _: b" " * 2048 + make_pdf(1), NOT_PDF),
    # Looks like a PDF, does not parse.
    HostileCase("junk-before-header", lambda _: b"JUNK\n" + make_pdf(1), INVALID),
    HostileCase("header-only", lambda _: b"%PDF-1.7\n", INVALID),
    HostileCase("truncated-at-a-quarter", lambda _: truncated(0.25), INVALID),
    HostileCase("truncated-at-two-thirds", lambda _: truncated(0.66), INVALID),
    HostileCase("truncated-in-the-trailer", lambda _: truncated(0.99), INVALID),
    HostileCase("xref-offsets-shifted", lambda _: shifted_xref(), INVALID),
    HostileCase("startxref-points-at-garbage", lambda _: startxref_to_garbage(), INVALID),
    HostileCase("no-xref-no-trailer", lambda _: no_xref(), INVALID),
    HostileCase("xref-claims-a-billion-objects", lambda _: billion_entry_xref(), INVALID),
    HostileCase("xref-prev-loop", lambda _: self_referencing_prev(), INVALID),
    HostileCase("hybrid-xref-broken-xrefstm", lambda _: hybrid(broken=True), INVALID),
    HostileCase("binary-garbage-in-trailer", lambda _: binary_trailer(), INVALID),
    HostileCase(
        "garbage-after-eof-4-kb", lambda _: make_pdf(1) + random.Random(8).randbytes(4096), INVALID
    ),
    # Encrypted, whatever the cipher, even when anyone may open it (empty user password).
    HostileCase("encrypted-rc4-40", encrypted("user", 40, aes=False), ENCRYPTED),
    HostileCase("encrypted-rc4-128-no-user-password", encrypted("", 128, aes=False), ENCRYPTED),
    HostileCase("encrypted-aes-128", encrypted("user", 128, aes=True), ENCRYPTED),
    HostileCase("encrypted-aes-128-no-user-password", encrypted("", 128, aes=True), ENCRYPTED),
    HostileCase("encrypted-aes-256", encrypted("user", 256, aes=True), ENCRYPTED),
    HostileCase("encrypted-aes-256-no-user-password", encrypted("", 256, aes=True), ENCRYPTED),
    HostileCase(
        "unknown-security-handler",
        lambda _: classic(one_page_objects(), b"/Root 1 0 R /Encrypt << /Filter /Nope >>"),
        ENCRYPTED,
    ),
    # Page trees.
    HostileCase(
        "zero-pages", lambda _: one_page(pages=b"/Kids [] /Count 0"), Refused(422, "no_pages")
    ),
    HostileCase("no-kids-count-says-1", lambda _: one_page(pages=b"/Kids [] /Count 1"), INVALID),
    HostileCase("count-says-5-has-1", lambda _: one_page(pages=b"/Kids [3 0 R] /Count 5"), INVALID),
    HostileCase(
        "count-not-a-number", lambda _: one_page(pages=b"/Kids [3 0 R] /Count (1)"), INVALID
    ),
    HostileCase("page-tree-cycle", lambda _: page_tree_cycle(), INVALID),
    HostileCase("parent-cycle-without-mediabox", lambda _: parent_cycle(), INVALID),
    # Too costly to read: refused within the CPU budget or the decoding limits.
    HostileCase("one-page-listed-a-million-times", lambda _: one_page_listed(10**6), TOO_COMPLEX),
    HostileCase(
        "one-page-listed-a-million-times-in-an-object-stream",
        lambda _: one_page_listed(10**6, in_object_stream=True),
        TOO_COMPLEX,
    ),
    HostileCase(
        "objects-in-one-stream-200000", lambda _: many_objects_in_one_stream(200_000), TOO_COMPLEX
    ),
    HostileCase("nested-arrays-10000-deep", lambda _: nested(10_000, b"[", b"", b"]"), TOO_COMPLEX),
    HostileCase(
        "nested-dicts-10000-deep", lambda _: nested(10_000, b"<</A ", b"0", b">>"), TOO_COMPLEX
    ),
    HostileCase("object-stream-bomb-1-gib", lambda _: object_stream_bomb(), TOO_COMPLEX),
    HostileCase("xref-stream-of-5-million", lambda _: huge_xref_stream(5_000_000), TOO_COMPLEX),
    HostileCase("xmp-with-200000-elements", lambda _: xmp_with_elements(200_000), TOO_COMPLEX),
    # Pages and boxes.
    HostileCase("missing-mediabox", lambda _: one_page(page=b""), INVALID),
    HostileCase(
        "mediabox-not-numbers", lambda _: one_page(page=b"/MediaBox [0 0 /A4 (x)]"), INVALID
    ),
    HostileCase("mediabox-three-numbers", lambda _: one_page(page=b"/MediaBox [0 0 595]"), INVALID),
    HostileCase(
        "mediabox-infinite", lambda _: one_page(page=b"/MediaBox [0 0 %s 842]" % HUGE), INVALID
    ),
    HostileCase(
        "box-off-the-page",
        lambda _: make_pdf(1),
        Refused(422, "box_off_page"),
        {"box": "500,700,700,900"},
    ),
    HostileCase(
        "box-too-small",
        lambda _: make_pdf(1),
        Refused(422, "box_too_small"),
        {"box": "100,100,110,110"},
    ),
    HostileCase(
        "page-out-of-range", lambda _: make_pdf(2), Refused(422, "page_out_of_range"), {"page": "3"}
    ),
    # What the stamp itself changes: annotations, form fields, metadata.
    HostileCase("annots-not-an-array", lambda _: with_page(b"/Annots 42"), INVALID),
    HostileCase("annots-missing-object", lambda _: with_page(b"/Annots 99 0 R"), INVALID),
    HostileCase("acroform-not-a-dict", lambda _: one_page(catalog=b"/AcroForm 42"), INVALID),
    HostileCase(
        "acroform-fields-not-an-array",
        lambda _: one_page(catalog=b"/AcroForm << /Fields 42 >>"),
        INVALID,
    ),
    HostileCase("perms-not-a-dict", lambda _: one_page(catalog=b"/Perms 42"), INVALID),
    HostileCase(
        "info-not-a-dict", lambda _: classic(one_page_objects(), b"/Root 1 0 R /Info 42"), INVALID
    ),
    HostileCase("xmp-not-xml", lambda _: xmp(b"<<not xml"), INVALID),
    HostileCase("xmp-billion-laughs", lambda _: xmp_billion_laughs(), INVALID),
    # Signatures.
    HostileCase(
        "already-stamped-with-this-serial",
        stamped_by_us,
        Refused(422, "already_stamped"),
        {"serial": "{serial}"},
    ),
    HostileCase(
        "certified-no-changes",
        signed(fields.MDPPerm.NO_CHANGES),
        Refused(422, "certified_no_changes"),
    ),
    HostileCase(
        "certified-form-filling", signed(fields.MDPPerm.FILL_FORMS), Refused(422, "certified_pdf")
    ),
    HostileCase(
        "certified-annotations", signed(fields.MDPPerm.ANNOTATE), Refused(422, "certified_pdf")
    ),
    HostileCase("over-the-size-limit", too_large, Refused(413, "payload_too_large")),
    # Odd but fine: these are stamped.
    HostileCase("approval-signed", signed(None), STAMPED),
    HostileCase("hybrid-xref", lambda _: hybrid(), STAMPED),
    HostileCase(
        "object-streams", lambda _: qpdf(make_pdf(3), "--object-streams=generate"), STAMPED
    ),
    HostileCase(
        "objects-in-one-stream-30000", lambda _: many_objects_in_one_stream(30_000), STAMPED
    ),
    HostileCase("pages-5000", lambda _: many_pages(5000), STAMPED),
    HostileCase("revisions-2000", lambda _: revisions(2000), STAMPED),
    HostileCase("content-stream-bomb-8-gib", lambda _: content_stream_bomb(), STAMPED),
    HostileCase(
        "content-stream-huge-length",
        lambda _: one_page(contents=stream(b"BT ET", length=10**12)),
        STAMPED,
    ),
    HostileCase("javascript-open-action", lambda _: one_page(catalog=JAVASCRIPT), STAMPED),
    HostileCase("embedded-file", lambda _: embedded_file(), STAMPED),
    HostileCase("acroform-field-cycle", lambda _: field_cycle(), STAMPED),
    HostileCase("catalog-version-garbage", lambda _: one_page(catalog=b"/Version /Foo"), STAMPED),
    HostileCase(
        "garbage-after-eof-300-bytes",
        lambda _: make_pdf(1) + random.Random(8).randbytes(300),
        STAMPED,
    ),
    HostileCase("upside-down-box", lambda _: make_pdf(1), STAMPED, {"box": "490,190,400,100"}),
    HostileCase("rotated-page", lambda _: with_page(b"/Rotate 90"), STAMPED),
    HostileCase(
        "negative-mediabox-origin",
        lambda _: one_page(page=b"/MediaBox [-300.5 -421 294.5 421]"),
        STAMPED,
    ),
    HostileCase(
        "upside-down-mediabox", lambda _: one_page(page=b"/MediaBox [595 842 0 0]"), STAMPED
    ),
]
