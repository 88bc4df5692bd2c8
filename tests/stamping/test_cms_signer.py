"""The reused CMS container is pyHanko's own, byte for byte, for every signature after the
first; anything the template was not cut for still goes through pyHanko."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from io import BytesIO

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyhanko.keys import load_cert_from_pemder
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from services.stamping.cms_signer import KeySigner, SignedDataTemplate
from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.signing import StampRequest, StampSigner
from tests.pdfs import make_pdf


@pytest.fixture(scope="module")
def key_paths(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyPaths:
    return create_development_keys(tmp_path_factory.mktemp("keys"))


def key_signer(key_paths: SigningKeyPaths) -> KeySigner:
    signer = StampSigner.from_pem_files(
        key_paths.signer_key, key_paths.signer_cert, [key_paths.ca_cert]
    )
    return signer._signer


def normalised(content_info: cms.ContentInfo) -> tuple[bytes, ...]:
    """The container's parts, with the certificate set in one order (pyHanko builds it from
    a Python set, so two of its own containers may list the certificates differently)."""
    signed_data = content_info["content"]
    return (
        content_info["content_type"].dump(),
        signed_data["version"].dump(),
        signed_data["digest_algorithms"].dump(),
        signed_data["encap_content_info"].dump(),
        *sorted(cert.dump() for cert in signed_data["certificates"]),
        signed_data["signer_infos"].dump(),
    )


async def test_reused_container_is_pyhankos_own(key_paths: SigningKeyPaths) -> None:
    signer = key_signer(key_paths)
    assert signer.template is None
    await signer.async_sign(os.urandom(32), "sha256", use_pades=True)
    assert isinstance(signer.template, SignedDataTemplate)

    for _ in range(3):
        digest = os.urandom(32)
        reused = await signer.async_sign(digest, "sha256", use_pades=True)
        # RSA PKCS#1 v1.5 signatures are deterministic: pyHanko's container must be identical.
        own = await signers.Signer.async_sign(signer, digest, "sha256", use_pades=True)
        assert normalised(cms.ContentInfo.load(reused.dump())) == normalised(own)


async def test_other_containers_are_left_to_pyhanko(key_paths: SigningKeyPaths) -> None:
    signer = key_signer(key_paths)
    await signer.async_sign(os.urandom(32), "sha256", use_pades=True)
    template = signer.template
    # Not PAdES: pyHanko adds CMS algorithm protection, which the template does not carry.
    digest = os.urandom(32)
    generic = await signer.async_sign(digest, "sha256", use_pades=False)
    own = await signers.Signer.async_sign(signer, digest, "sha256", use_pades=False)
    assert normalised(generic) == normalised(own)
    (signer_info,) = generic["content"]["signer_infos"]
    types = [attr["type"].native for attr in signer_info["signed_attrs"]]
    assert "cms_algorithm_protection" in types
    # Dry runs (pyHanko's size estimates) do not touch the key, nor the template.
    await signer.async_sign(os.urandom(32), "sha256", use_pades=True, dry_run=True)
    assert signer.template is template


async def test_time_dependent_attributes_are_never_frozen(key_paths: SigningKeyPaths) -> None:
    signer = key_signer(key_paths)
    digest = os.urandom(32)
    settings = PdfCMSSignedAttributes(signing_time=datetime.now(UTC))
    # Not PAdES, with a signing time: pyHanko's container as always, and no template of it.
    generic = await signers.Signer.async_sign(
        signer, digest, "sha256", use_pades=False, signed_attr_settings=settings
    )
    (signer_info,) = generic["content"]["signer_infos"]
    assert "signing_time" in [attr["type"].native for attr in signer_info["signed_attrs"]]
    assert SignedDataTemplate.cut(generic, digest) is None


def test_a_container_the_template_cannot_reproduce_is_not_reused() -> None:
    digest = os.urandom(32)
    content_info = cms.ContentInfo(
        {
            "content_type": "signed_data",
            "content": {
                "version": "v1",
                "digest_algorithms": [{"algorithm": "sha256"}],
                "encap_content_info": {"content_type": "data"},
                "signer_infos": [],
            },
        }
    )
    assert SignedDataTemplate.cut(content_info, digest) is None


def test_ec_signatures_of_any_length_fit_the_template(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ECDSA signatures vary in length (DER integers): the template recomputes the lengths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EC Template Signer")])
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
    signer = StampSigner(key, cert)
    path = tmp_path_factory.mktemp("ec") / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    trust = ValidationContext(trust_roots=[load_cert_from_pemder(str(path))])
    pdf = make_pdf(1)
    lengths = set()
    for number in range(12):
        serial = f"{number:022d}"
        out = signer.stamp(pdf, StampRequest(serial, f"http://x/verify/{serial}"))
        (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
        assert validate_pdf_signature(embedded, trust).bottom_line
        lengths.add(len(embedded.signed_data["signer_infos"][0]["signature"].native))
    assert signer._signer.template is not None
    assert len(lengths) > 1, "twelve ECDSA signatures all of one length: try more"
