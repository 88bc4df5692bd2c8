"""Development signing keys: a throw-away root CA and a document-signing certificate.

Production keys come from a PKCS#12 bundle or an HSM; these exist so that `meterai up`, the
tests and local demos can sign documents that validators accept up to the (untrusted) root.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

SIGNER_COMMON_NAME = "Meterai Development Signer"

# Microsoft "Document Signing" EKU, which Adobe Reader accepts for document signatures.
_DOCUMENT_SIGNING_EKU = ObjectIdentifier("1.3.6.1.4.1.311.10.3.12")

_CA_LIFETIME = dt.timedelta(days=3652)
_SIGNER_LIFETIME = dt.timedelta(days=730)
# Backdate validity a little so that clocks a few minutes behind still accept fresh keys.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class SigningKeyPaths:
    """Where the signing material lives inside one directory."""

    directory: Path
    ca_cert: Path
    signer_cert: Path
    signer_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> SigningKeyPaths:
        """Return the conventional file names (`ca.pem`, `signer.pem`, `signer-key.pem`)."""
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            signer_cert=directory / "signer.pem",
            signer_key=directory / "signer-key.pem",
        )

    def exist(self) -> bool:
        """True if all three files are present."""
        return all(path.is_file() for path in (self.ca_cert, self.signer_cert, self.signer_key))


def create_development_keys(
    directory: Path,
    *,
    overwrite: bool = False,
    organisation: str = "Meterai Development",
) -> SigningKeyPaths:
    """Create a development root CA and a signer certificate issued by it in ``directory``.

    The CA key itself is not kept: nothing else is ever issued by a development root.
    Raises FileExistsError if any of the files exists and ``overwrite`` is False.
    """
    paths = SigningKeyPaths.in_directory(directory)
    existing = [p for p in (paths.ca_cert, paths.signer_cert, paths.signer_key) if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing)
        raise FileExistsError(
            f"signing keys already exist ({names}); pass overwrite=True to replace them"
        )
    directory.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} Root CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    signer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, SIGNER_COMMON_NAME),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _SIGNER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # a.k.a. nonRepudiation
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([_DOCUMENT_SIGNING_EKU, ExtendedKeyUsageOID.EMAIL_PROTECTION]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write(paths.signer_cert, signer_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    key_pem = signer_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write(paths.signer_key, key_pem, mode=0o600)
    return paths


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` so that the file never exists with looser permissions than ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL + explicit mode: a private key is never world-readable, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have narrowed the mode; make it exact
        file.write(data)
    os.replace(tmp, path)
