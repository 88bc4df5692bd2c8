"""The verifier on its own (no servers): what counts as a change after stamping and what does
not (a second e-meterai, a PAdES document timestamp), and stamps that name two serials."""

from __future__ import annotations

import datetime as dt
from io import BytesIO

import pytest
from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.keys.internal import translate_pyca_cryptography_cert_to_asn1
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import signers
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper

from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.signing import StampRequest, StampSigner
from services.stamping.verification import StampVerifier, Verdict, load_trust_roots
from tests.pdfs import changed_page, make_pdf

FIRST = "2C5NV74I6D0HJ1EZ000DU9"
SECOND = "9ZYXWV8U7T6S5R4Q3P2O1N"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyPaths:
    return create_development_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signer(keys: SigningKeyPaths) -> StampSigner:
    return StampSigner.from_pem_files(keys.signer_key, keys.signer_cert, [keys.ca_cert])


@pytest.fixture(scope="module")
def verifier(keys: SigningKeyPaths) -> StampVerifier:
    return StampVerifier(load_trust_roots([keys.ca_cert]))


@pytest.fixture(scope="module")
def stamped(signer: StampSigner) -> bytes:
    return signer.stamp(make_pdf(2), StampRequest(serial=FIRST, verify_url="http://x"))


def test_a_second_stamp_is_not_a_change_but_a_change_after_it_is(
    signer: StampSigner, verifier: StampVerifier, stamped: bytes
) -> None:
    twice = signer.stamp(stamped, StampRequest(serial=SECOND, verify_url="http://x", page=1))
    check = verifier.check(twice, cpu_budget_seconds=3)
    assert check.verdict is Verdict.valid
    first, second = check.stamps
    assert (first.serial, second.serial) == (FIRST, SECOND)
    assert first.changed_after_stamping and first.modification_level == "form_filling"
    assert not second.changed_after_stamping

    changed = verifier.check(changed_page(twice), cpu_budget_seconds=3)
    assert [stamp.verdict for stamp in changed.stamps] == [Verdict.modified, Verdict.modified]


def test_a_document_timestamp_after_the_stamp_is_not_a_change(
    verifier: StampVerifier, stamped: bytes
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TSA")])
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(key, hashes.SHA256())
    )
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tsa = DummyTimeStamper(
        translate_pyca_cryptography_cert_to_asn1(certificate),
        asn1_keys.PrivateKeyInfo.load(der_key),
    )
    output = BytesIO()
    signers.PdfTimeStamper(tsa).timestamp_pdf(
        IncrementalPdfFileWriter(BytesIO(stamped)), "sha256", output=output
    )

    check = verifier.check(output.getvalue(), cpu_budget_seconds=3)
    assert check.verdict is Verdict.valid and check.other_signatures == 1
    (stamp,) = check.stamps
    assert stamp.modification_level == "lta_updates" and not stamp.changed_after_stamping


def test_a_stamp_whose_field_and_reason_name_different_serials_is_invalid(
    verifier: StampVerifier, stamped: bytes
) -> None:
    # Same length, so the signed byte range still fits: only the field's name changes (pyHanko
    # writes its hyphen escaped).
    field_name = b"/T (eMeterai\\055"
    assert stamped.count(field_name + FIRST.encode()) == 1
    relabelled = stamped.replace(field_name + FIRST.encode(), field_name + SECOND.encode())
    (stamp,) = verifier.check(relabelled, cpu_budget_seconds=3).stamps
    # The reason names the serial; the disagreement is what is reported (the signature no
    # longer covers the field either).
    assert stamp.verdict is Verdict.invalid and stamp.serial == FIRST
    assert stamp.problem == "the field name and the reason name different serials"
