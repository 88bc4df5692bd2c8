"""Stamping and signing PDFs, checked with pyHanko's validator and independent tools."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from pyhanko.keys import load_cert_from_pemder, load_certs_from_pemder_data
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.diff_analysis import ModificationLevel
from pyhanko.sign.validation import async_validate_pdf_signature, validate_pdf_signature
from pyhanko.sign.validation.status import SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext

from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.signing import (
    DocumentRejected,
    SignerFailure,
    StampBox,
    StampRequest,
    StampSigner,
    inspect_document,
)
from tests.pdfs import A4, make_pdf
from tests.pdftools import require

SERIAL = "2C5NV74I6D0HJ1EZ000DU9"
OTHER_SERIAL = "9ZYXWV8U7T6S5R4Q3P2O1N"


def request(serial: str = SERIAL, **kwargs: Any) -> StampRequest:
    return StampRequest(
        serial=serial, verify_url=f"http://127.0.0.1:8000/verify/{serial}", **kwargs
    )


@pytest.fixture(scope="module")
def key_paths(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyPaths:
    return create_development_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signer(key_paths: SigningKeyPaths) -> StampSigner:
    return StampSigner.from_pem_files(
        key_paths.signer_key, key_paths.signer_cert, [key_paths.ca_cert]
    )


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return make_pdf(3)


@pytest.fixture(scope="module")
def stamped(signer: StampSigner, pdf: bytes) -> bytes:
    return signer.stamp(pdf, request())


@pytest.fixture(scope="module")
def validation_context(key_paths: SigningKeyPaths) -> ValidationContext:
    return ValidationContext(trust_roots=[load_cert_from_pemder(str(key_paths.ca_cert))])


@pytest.fixture
def out_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "stamped.pdf"


def run_tool(tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run an independent PDF tool; CI installs them, so a missing one fails the test."""
    return subprocess.run(
        [require(tool), *(str(a) for a in args)], capture_output=True, text=True, timeout=60
    )


def widget_names(pdf: bytes, page_index: int) -> list[str]:
    reader = PdfFileReader(BytesIO(pdf))
    page_ref, _ = reader.find_page_for_modification(page_index)
    annots = page_ref.get_object().get("/Annots", [])
    return [str(a.get_object()["/T"]) for a in annots if "/T" in a.get_object()]


def widget_rect(pdf: bytes, field_name: str) -> list[float]:
    reader = PdfFileReader(BytesIO(pdf))
    for sig in reader.embedded_signatures:
        if sig.field_name == field_name:
            return [float(v) for v in sig.sig_field["/Rect"]]
    raise AssertionError(f"no field {field_name}")


# --- Independent validators ----------------------------------------------------------------


def test_stamped_pdf_passes_pdfsig_and_qpdf(stamped: bytes, out_file: Path) -> None:
    out_file.write_bytes(stamped)

    sig = run_tool("pdfsig", out_file)
    assert sig.returncode == 0, sig.stderr
    assert "Signature #1:" in sig.stdout and "Signature #2:" not in sig.stdout
    assert "Signature Validation: Signature is Valid." in sig.stdout
    assert "Total document signed" in sig.stdout
    assert f"Signature Field Name: eMeterai-{SERIAL}" in sig.stdout
    assert "Signature Type: ETSI.CAdES.detached" in sig.stdout
    assert "Signing Hash Algorithm: SHA-256" in sig.stdout

    check = run_tool("qpdf", "--check", out_file)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No syntax or stream encoding errors found" in check.stdout


def test_stamping_twice_keeps_both_signatures_valid(
    signer: StampSigner, stamped: bytes, out_file: Path
) -> None:
    twice = signer.stamp(stamped, request(OTHER_SERIAL, page=1))
    assert twice.startswith(stamped)  # incremental: the first revision is untouched
    out_file.write_bytes(twice)

    sig = run_tool("pdfsig", out_file)
    assert sig.returncode == 0, sig.stderr
    assert len(re.findall(r"^Signature #\d+:", sig.stdout, re.MULTILINE)) == 2
    assert sig.stdout.count("Signature Validation: Signature is Valid.") == 2
    assert sig.stdout.count("Total document signed") == 1  # only the latest covers it all
    assert run_tool("qpdf", "--check", out_file).returncode == 0


def test_pdfs_helper_output_passes_qpdf(tmp_path: Path) -> None:
    path = tmp_path / "plain.pdf"
    path.write_bytes(make_pdf(2, text=False, size=(300, 400)))
    assert run_tool("qpdf", "--check", path).returncode == 0


# --- pyHanko's own view -------------------------------------------------------------------


def test_signature_is_intact_trusted_and_covers_the_whole_file(
    stamped: bytes, validation_context: ValidationContext
) -> None:
    reader = PdfFileReader(BytesIO(stamped))
    (embedded,) = reader.embedded_signatures
    status = validate_pdf_signature(embedded, validation_context)

    assert status.intact and status.valid and status.trusted
    assert status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert status.bottom_line
    assert embedded.field_name == f"eMeterai-{SERIAL}"
    assert str(embedded.sig_object["/Reason"]).startswith(f"[{SERIAL}]")
    assert embedded.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"


def test_second_stamp_counts_as_form_filling_for_the_first(
    signer: StampSigner, stamped: bytes, validation_context: ValidationContext
) -> None:
    twice = signer.stamp(stamped, request(OTHER_SERIAL))
    first, second = PdfFileReader(BytesIO(twice)).embedded_signatures

    first_status = validate_pdf_signature(first, validation_context)
    assert first_status.bottom_line
    assert first_status.coverage == SignatureCoverageLevel.ENTIRE_REVISION
    assert first_status.modification_level == ModificationLevel.FORM_FILLING
    second_status = validate_pdf_signature(second, validation_context)
    assert second_status.bottom_line
    assert second_status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert str(second.sig_object["/Reason"]).startswith(f"[{OTHER_SERIAL}]")


# --- Placement ----------------------------------------------------------------------------


def test_default_is_the_last_page_bottom_right(
    signer: StampSigner, pdf: bytes, stamped: bytes
) -> None:
    page_index, box = inspect_document(pdf, None, None)
    assert page_index == 2
    assert box == StampBox(A4[0] - 36 - 90, 36, A4[0] - 36, 126)

    assert widget_names(stamped, 2) == [f"eMeterai-{SERIAL}"]
    assert widget_names(stamped, 0) == [] and widget_names(stamped, 1) == []
    assert widget_rect(stamped, f"eMeterai-{SERIAL}") == pytest.approx(
        [box.llx, box.lly, box.urx, box.ury], abs=0.01
    )


def test_signature_widget_is_on_the_requested_page(signer: StampSigner, pdf: bytes) -> None:
    box = StampBox(72, 600, 162, 690)
    out = signer.stamp(pdf, request(page=2, box=box))
    assert widget_names(out, 1) == [f"eMeterai-{SERIAL}"]
    assert widget_names(out, 2) == []
    assert widget_rect(out, f"eMeterai-{SERIAL}") == pytest.approx([72, 600, 162, 690], abs=0.01)


def test_upside_down_boxes_are_normalised(signer: StampSigner, pdf: bytes) -> None:
    assert StampBox.normalised(162, 690, 72, 600) == StampBox(72, 600, 162, 690)

    flipped = StampBox(162, 690, 72, 600)  # built directly, corners swapped
    assert inspect_document(pdf, 1, flipped) == (0, StampBox(72, 600, 162, 690))
    out = signer.stamp(pdf, request(page=1, box=flipped))
    assert widget_rect(out, f"eMeterai-{SERIAL}") == pytest.approx([72, 600, 162, 690], abs=0.01)


def test_non_square_box_is_accepted(signer: StampSigner, pdf: bytes) -> None:
    out = signer.stamp(pdf, request(page=1, box=StampBox(100, 100, 250, 160)))
    assert PdfFileReader(BytesIO(out)).embedded_signatures[0].field_name == f"eMeterai-{SERIAL}"


def test_crop_box_limits_the_page(signer: StampSigner) -> None:
    writer = IncrementalPdfFileWriter(BytesIO(make_pdf(1)))
    page_ref, _ = writer.find_page_for_modification(0)
    page = page_ref.get_object()
    page["/CropBox"] = generic.ArrayObject([generic.FloatObject(v) for v in (100, 100, 400, 500)])
    writer.update_container(page)
    out = BytesIO()
    writer.write(out)
    cropped = out.getvalue()

    assert inspect_document(cropped, None, None) == (0, StampBox(274, 136, 364, 226))
    with pytest.raises(DocumentRejected) as error:
        inspect_document(cropped, 1, StampBox(450, 50, 540, 140))  # on the media box only
    assert error.value.code == "box_off_page"


def test_default_box_must_fit_a_tiny_page(signer: StampSigner) -> None:
    with pytest.raises(DocumentRejected) as error:
        inspect_document(make_pdf(1, size=(100, 100)), None, None)
    assert error.value.code == "box_off_page"


# --- Rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "code"),
    [
        (b"", "invalid_pdf"),
        (b"hello, this is not a PDF", "invalid_pdf"),
        (b"%PDF-1.7\n%garbage without objects\n", "invalid_pdf"),
        (make_pdf(3)[:900], "invalid_pdf"),  # truncated
        (make_pdf(3, user_password="secret"), "encrypted_pdf"),
    ],
    ids=["empty", "not-pdf", "header-only", "truncated", "encrypted"],
)
def test_bad_documents_are_rejected(signer: StampSigner, document: bytes, code: str) -> None:
    with pytest.raises(DocumentRejected) as inspected:
        inspect_document(document, None, None)
    assert inspected.value.code == code
    with pytest.raises(DocumentRejected) as stamped:
        signer.stamp(document, request())
    assert stamped.value.code == code


@pytest.mark.parametrize("page", [0, 4, -1])
def test_pages_outside_the_document_are_rejected(
    signer: StampSigner, pdf: bytes, page: int
) -> None:
    with pytest.raises(DocumentRejected) as error:
        inspect_document(pdf, page, None)
    assert error.value.code == "page_out_of_range"
    assert "1..3" in str(error.value)


@pytest.mark.parametrize(
    "box",
    [
        StampBox(500, 700, 700, 900),  # sticks out to the right and above
        StampBox(-10, 10, 80, 100),
        StampBox(10, -0.5, 100, 89.5),
    ],
)
def test_boxes_off_the_page_are_rejected(signer: StampSigner, pdf: bytes, box: StampBox) -> None:
    with pytest.raises(DocumentRejected) as error:
        inspect_document(pdf, 1, box)
    assert error.value.code == "box_off_page"


def test_tiny_or_empty_boxes_are_rejected(signer: StampSigner, pdf: bytes) -> None:
    for box in (StampBox(10, 10, 10, 10), StampBox(10, 10, 40, 100)):
        with pytest.raises(DocumentRejected) as error:
            inspect_document(pdf, 1, box)
        assert error.value.code == "box_too_small"


def _certified(key_paths: SigningKeyPaths, permission: fields.MDPPerm) -> bytes:
    author = signers.SimpleSigner.load(
        str(key_paths.signer_key),
        str(key_paths.signer_cert),
        ca_chain_files=[str(key_paths.ca_cert)],
    )
    assert author is not None
    writer = IncrementalPdfFileWriter(BytesIO(make_pdf(2)))
    meta = signers.PdfSignatureMetadata(
        field_name="Author", certify=True, docmdp_permissions=permission
    )
    out = signers.PdfSigner(meta, signer=author).sign_pdf(writer)
    return bytes(out.getvalue())


def test_certified_no_changes_is_rejected(signer: StampSigner, key_paths: SigningKeyPaths) -> None:
    document = _certified(key_paths, fields.MDPPerm.NO_CHANGES)
    with pytest.raises(DocumentRejected) as error:
        inspect_document(document, None, None)
    assert error.value.code == "certified_no_changes"


@pytest.mark.parametrize("permission", [fields.MDPPerm.FILL_FORMS, fields.MDPPerm.ANNOTATE])
def test_other_certified_documents_are_rejected(
    signer: StampSigner, key_paths: SigningKeyPaths, permission: fields.MDPPerm
) -> None:
    # A new visible signature field would break the author's certification (pyHanko's diff
    # policy and Acrobat agree), so these are refused too rather than stamped into invalidity.
    with pytest.raises(DocumentRejected) as error:
        inspect_document(_certified(key_paths, permission), None, None)
    assert error.value.code == "certified_pdf"


def test_approval_signed_documents_can_be_stamped(
    signer: StampSigner, key_paths: SigningKeyPaths, validation_context: ValidationContext
) -> None:
    """Applicants sign first and stamp last: their signature must survive the stamp."""
    author = signers.SimpleSigner.load(str(key_paths.signer_key), str(key_paths.signer_cert))
    assert author is not None
    writer = IncrementalPdfFileWriter(BytesIO(make_pdf(2)))
    meta = signers.PdfSignatureMetadata(field_name="Applicant")
    signed = bytes(signers.PdfSigner(meta, signer=author).sign_pdf(writer).getvalue())

    out = signer.stamp(signed, request())
    applicant, stamp = PdfFileReader(BytesIO(out)).embedded_signatures
    applicant_status = validate_pdf_signature(applicant, validation_context)
    assert applicant_status.bottom_line
    assert applicant_status.modification_level == ModificationLevel.FORM_FILLING
    assert validate_pdf_signature(stamp, validation_context).bottom_line


def test_the_same_serial_cannot_be_affixed_twice(signer: StampSigner, stamped: bytes) -> None:
    with pytest.raises(DocumentRejected) as error:
        signer.stamp(stamped, request())
    assert error.value.code == "already_stamped"


def test_malformed_requests_are_programming_errors(signer: StampSigner, pdf: bytes) -> None:
    with pytest.raises(ValueError, match="serial"):
        signer.stamp(pdf, StampRequest(serial="abc", verify_url="http://x/verify/abc"))
    with pytest.raises(ValueError, match="verify_url"):
        signer.stamp(pdf, StampRequest(serial=SERIAL, verify_url=""))
    with pytest.raises(ValueError, match="verify_url is longer than a QR code holds"):
        signer.stamp(pdf, StampRequest(serial=SERIAL, verify_url="https://x/" + "v" * 2322))


def test_document_rejected_carries_a_stable_code() -> None:
    error = DocumentRejected("encrypted_pdf", "encrypted PDFs cannot be stamped")
    assert (error.code, error.detail) == ("encrypted_pdf", "encrypted PDFs cannot be stamped")
    assert str(error) == "encrypted_pdf: encrypted PDFs cannot be stamped"


def test_key_failures_are_not_blamed_on_the_document(
    key_paths: SigningKeyPaths, pdf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = StampSigner.from_pem_files(key_paths.signer_key, key_paths.signer_cert)

    class FailingKey:
        def sign(self, *args: object) -> bytes:
            raise RuntimeError("HSM unplugged")

    monkeypatch.setattr(broken._signer, "_key", FailingKey())
    with pytest.raises(SignerFailure, match="HSM unplugged"):
        broken.stamp(pdf, request())


# --- Loading keys -------------------------------------------------------------------------


def test_loads_a_pkcs12_bundle(
    key_paths: SigningKeyPaths, pdf: bytes, tmp_path: Path, validation_context: ValidationContext
) -> None:
    key = serialization.load_pem_private_key(key_paths.signer_key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(key_paths.signer_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(key_paths.ca_cert.read_bytes())
    bundle = tmp_path / "signer.p12"
    bundle.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"signer",
            key,  # type: ignore[arg-type]
            cert,
            [ca],
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    from_p12 = StampSigner.from_pkcs12(bundle, b"pass")
    out = from_p12.stamp(pdf, request())
    (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
    assert validate_pdf_signature(embedded, validation_context).bottom_line

    with pytest.raises(ValueError):
        StampSigner.from_pkcs12(bundle, b"wrong")


def test_refuses_a_certificate_that_does_not_match_the_key(
    key_paths: SigningKeyPaths, tmp_path: Path
) -> None:
    other = create_development_keys(tmp_path)
    with pytest.raises(ValueError, match="does not belong"):
        StampSigner.from_pem_files(key_paths.signer_key, other.signer_cert)


# --- Appearance and concurrency -----------------------------------------------------------


def test_qr_code_decodes_to_the_verify_url(stamped: bytes, tmp_path: Path) -> None:
    (tmp_path / "stamped.pdf").write_bytes(stamped)
    rendered = run_tool(
        "pdftoppm",
        "-png",
        "-r",
        "150",
        "-f",
        "3",
        "-l",
        "3",
        tmp_path / "stamped.pdf",
        tmp_path / "page",
    )
    assert rendered.returncode == 0, rendered.stderr
    (png,) = tmp_path.glob("page*.png")
    decoded = run_tool("zbarimg", "--quiet", "--raw", png)
    assert decoded.stdout.strip() == f"http://127.0.0.1:8000/verify/{SERIAL}"


async def test_stamps_can_run_in_worker_threads(
    signer: StampSigner, pdf: bytes, validation_context: ValidationContext
) -> None:
    serials = [f"{n:022d}" for n in range(4)]
    outputs = await asyncio.gather(
        *(asyncio.to_thread(signer.stamp, pdf, request(serial)) for serial in serials)
    )
    for serial, out in zip(serials, outputs, strict=True):
        (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
        assert embedded.field_name == f"eMeterai-{serial}"
        status = await async_validate_pdf_signature(embedded, validation_context)
        assert status.bottom_line


async def test_stamping_on_the_event_loop_thread_is_a_programming_error(
    signer: StampSigner, pdf: bytes
) -> None:
    with pytest.raises(RuntimeError, match="asyncio.to_thread"):
        signer.stamp(pdf, request())


def test_certificate_file_may_carry_the_chain(
    key_paths: SigningKeyPaths, pdf: bytes, tmp_path: Path
) -> None:
    bundle = tmp_path / "fullchain.pem"
    bundle.write_bytes(key_paths.signer_cert.read_bytes() + key_paths.ca_cert.read_bytes())
    out = StampSigner.from_pem_files(key_paths.signer_key, bundle).stamp(pdf, request())
    (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
    subjects = [cert.subject.human_friendly for cert in embedded.other_embedded_certs]
    assert any("Root CA" in subject for subject in subjects)


def test_ec_keys_sign_too(pdf: bytes, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EC Test Signer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    out = StampSigner(key, cert).stamp(pdf, request())
    (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
    trust = ValidationContext(
        trust_roots=list(load_certs_from_pemder_data(cert.public_bytes(serialization.Encoding.PEM)))
    )
    status = validate_pdf_signature(embedded, trust)
    assert status.intact and status.valid
    assert status.coverage == SignatureCoverageLevel.ENTIRE_FILE


def test_inspect_document_needs_no_signer(pdf: bytes) -> None:
    assert inspect_document(pdf, 2, StampBox(10, 10, 100, 100)) == (1, StampBox(10, 10, 100, 100))
    with pytest.raises(DocumentRejected) as error:
        inspect_document(b"not a pdf", None, None)
    assert error.value.code == "invalid_pdf"
