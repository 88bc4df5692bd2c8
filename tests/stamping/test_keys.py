"""Development key generation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from services.stamping.keys import SIGNER_COMMON_NAME, SigningKeyPaths, create_development_keys


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_creates_the_three_files_with_a_private_key_file(tmp_path: Path) -> None:
    paths = create_development_keys(tmp_path / "keys")

    assert paths == SigningKeyPaths.in_directory(tmp_path / "keys")
    assert paths.exist()
    assert paths.ca_cert.name == "ca.pem"
    assert paths.signer_cert.name == "signer.pem"
    assert paths.signer_key.name == "signer-key.pem"
    assert stat.S_IMODE(paths.signer_key.stat().st_mode) == 0o600
    assert paths.signer_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert not list(paths.directory.glob(".*.tmp"))


def test_exist_is_false_until_all_files_are_there(tmp_path: Path) -> None:
    paths = SigningKeyPaths.in_directory(tmp_path)
    assert not paths.exist()
    paths.ca_cert.write_bytes(b"")
    assert not paths.exist()


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = create_development_keys(tmp_path)
    before = first.signer_cert.read_bytes()

    with pytest.raises(FileExistsError, match="overwrite=True"):
        create_development_keys(tmp_path)
    assert first.signer_cert.read_bytes() == before

    create_development_keys(tmp_path, overwrite=True)
    assert first.signer_cert.read_bytes() != before
    assert stat.S_IMODE(first.signer_key.stat().st_mode) == 0o600


def test_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    SigningKeyPaths.in_directory(tmp_path).signer_key.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create_development_keys(tmp_path)


def test_signer_is_issued_by_the_ca_and_fit_for_document_signing(tmp_path: Path) -> None:
    paths = create_development_keys(tmp_path, organisation="Test Org")
    ca, signer = _cert(paths.ca_cert), _cert(paths.signer_cert)

    signer.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed root

    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_constraints.ca
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650

    assert signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SIGNER_COMMON_NAME
    assert signer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Test Org"
    assert not signer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    assert not usage.key_cert_sign
    eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ObjectIdentifier("1.3.6.1.4.1.311.10.3.12") in eku
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    assert 700 <= (signer.not_valid_after_utc - signer.not_valid_before_utc).days <= 731


def test_private_key_matches_the_signer_certificate(tmp_path: Path) -> None:
    paths = create_development_keys(tmp_path)
    key = serialization.load_pem_private_key(paths.signer_key.read_bytes(), password=None)
    assert key.public_key() == _cert(paths.signer_cert).public_key()
    assert key.key_size == 2048  # type: ignore[union-attr]
