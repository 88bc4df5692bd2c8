"""The CMS signature container of a stamp: pyHanko builds the first one, later ones reuse it.

pyHanko assembles every CMS SignedData afresh with asn1crypto: signed attributes (content
type, message digest, ESS signing-certificate-v2 with the certificate's hash), the SignerInfo
and the certificate set, each encoded in pure Python. That is about 7 ms of a 13 ms stamp
(measured on the 2-core benchmark machine, see ``benchmarks/stamping.py``), spent producing
bytes in which only the document's digest and the signature value change from one document
to the next (plus, for PAdES B-T, the timestamp token beside the signature).

So :class:`KeySigner` lets pyHanko build the first container unchanged, cuts it into a
:class:`SignedDataTemplate` that must reproduce those very bytes, and fills the template in
for every later signature (about 0.1 ms plus the RSA operation). Calls that ask for anything
else than the PAdES signature the template was cut from go through pyHanko as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyhanko.sign import signers
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes
from pyhanko.sign.timestamps import TimeStamper
from pyhanko_certvalidator.registry import SimpleCertificateStore

__all__ = ["KeySigner", "SignedDataTemplate", "SignerFailure"]

DIGEST_ALGORITHM = "sha256"
_SIGNED_DATA = cms.ContentType("signed_data").dump()
# Signed attributes that do not change between documents, but for the digest itself.
_CONSTANT_ATTRIBUTES = {
    "content_type",
    "message_digest",
    "signing_certificate",
    "signing_certificate_v2",
    "cms_algorithm_protection",
}


class SignerFailure(RuntimeError):
    """Signing failed for reasons outside the document (the key, the timestamp authority);
    retrying the job later may succeed."""


@dataclass(frozen=True)
class SignedDataTemplate:
    """A CMS SignedData with one SignerInfo, cut around what changes per signature."""

    signed_attrs_head: bytes
    """The DER signed attributes (a SET, as signed) up to the message digest value."""
    signed_attrs_tail: bytes
    """The rest of the signed attributes after the message digest value."""
    signer_info_head: bytes
    """SignerInfo fields before the signed attributes: version, sid, digestAlgorithm."""
    signature_algorithm: bytes
    signed_data_head: bytes
    """SignedData fields before the SignerInfos: version, digestAlgorithms,
    encapContentInfo, certificates (and crls, if any)."""

    def signed_attributes(self, digest: bytes) -> bytes:
        """The DER signed attributes for a document with ``digest``: what gets signed."""
        return self.signed_attrs_head + digest + self.signed_attrs_tail

    def content_info(self, signed_attrs: bytes, signature: bytes, unsigned_attrs: bytes) -> bytes:
        """The DER ContentInfo around one signature; ``unsigned_attrs`` is the DER
        ``[1] IMPLICIT`` attribute set, or empty."""
        signer_info = _tlv(
            0x30,
            self.signer_info_head
            + b"\xa0"  # [0] IMPLICIT SET OF Attribute: the same bytes under another tag
            + signed_attrs[1:]
            + self.signature_algorithm
            + _tlv(0x04, signature)
            + unsigned_attrs,
        )
        signed_data = _tlv(0x30, self.signed_data_head + _tlv(0x31, signer_info))
        return _tlv(0x30, _SIGNED_DATA + _tlv(0xA0, signed_data))

    @classmethod
    def cut(cls, content_info: cms.ContentInfo, digest: bytes) -> SignedDataTemplate | None:
        """Cut pyHanko's container for ``digest`` into a template, or None if the template
        would not reproduce it byte for byte (then nothing is reused)."""
        signed_data = content_info["content"]
        signer_infos = signed_data["signer_infos"]
        if content_info["content_type"].native != "signed_data" or len(signer_infos) != 1:
            return None
        signer_info = signer_infos[0]
        # Only attributes that are the same for every document may be frozen in a template:
        # a signing time, say, would be stale from the second signature on.
        types = {attribute["type"].native for attribute in signer_info["signed_attrs"]}
        if not types <= _CONSTANT_ATTRIBUTES:
            return None
        signed_attrs = b"\x31" + signer_info["signed_attrs"].dump()[1:]
        if signed_attrs.count(digest) != 1:
            return None
        head, _, tail = signed_attrs.partition(digest)
        template = cls(
            signed_attrs_head=head,
            signed_attrs_tail=tail,
            signer_info_head=b"".join(
                signer_info[name].dump() for name in ("version", "sid", "digest_algorithm")
            ),
            signature_algorithm=signer_info["signature_algorithm"].dump(),
            signed_data_head=b"".join(
                signed_data[name].dump()
                for name in (
                    "version",
                    "digest_algorithms",
                    "encap_content_info",
                    "certificates",
                    "crls",
                )
            ),
        )
        rebuilt = template.content_info(
            template.signed_attributes(digest),
            signer_info["signature"].native,
            signer_info["unsigned_attrs"].dump(),
        )
        return template if rebuilt == content_info.dump() else None


class KeySigner(signers.Signer):
    """pyHanko signer over a key object loaded once (SimpleSigner re-parses the DER key on
    every signature) that reuses its CMS container (see the module's docstring)."""

    def __init__(
        self,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        signing_cert: asn1_x509.Certificate,
        registry: SimpleCertificateStore,
    ) -> None:
        mechanism = "sha256_rsa" if isinstance(key, rsa.RSAPrivateKey) else "sha256_ecdsa"
        super().__init__(
            signing_cert=signing_cert,
            cert_registry=registry,
            signature_mechanism=algos.SignedDigestAlgorithm({"algorithm": mechanism}),
        )
        self._key = key
        self.template: SignedDataTemplate | None = None
        self._token_allowance: int | None = None

    def bytes_reserved(self) -> int:
        """Hex characters to reserve for the container without a timestamp token:
        certificates, signature, signed attributes and framing, with some slack."""
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            signature = key.key_size // 8
        else:
            signature = key.key_size // 4 + 16
        certs = [self.signing_cert, *self.cert_registry]
        # Signed attributes (content type, digest, ESS signing-certificate-v2 which repeats
        # the issuer name) and the SignedData framing: about 600 bytes measured.
        der = sum(len(cert.dump()) for cert in certs) + signature
        der += len(certs[0].issuer.dump()) + 1024
        return 2 * der  # written as hex

    async def timestamp_allowance(self, timestamper: TimeStamper) -> int:
        """Hex characters to reserve for the timestamp token of ``timestamper``.

        Sized on one token fetched once per signer (pyHanko's own estimate does the same),
        with pyHanko's 50% margin: tokens from one authority differ by a few bytes, but it
        may switch to a longer certificate chain at any time.
        """
        if self._token_allowance is None:
            token = await timestamper.async_dummy_response(DIGEST_ALGORITHM)
            # The unsigned attribute around the token: tags, lengths and its type's OID.
            der = len(token.dump()) + 32
            self._token_allowance = 2 * (der + der // 2)
        return self._token_allowance

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        """Sign ``data`` with the loaded key (PKCS#1 v1.5 for RSA, ECDSA for EC keys)."""
        if digest_algorithm != DIGEST_ALGORITHM:
            raise SignerFailure(f"unexpected digest algorithm {digest_algorithm}")
        try:
            if isinstance(self._key, rsa.RSAPrivateKey):
                return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        except Exception as exc:
            raise SignerFailure(f"signing key failed: {exc}") from exc

    async def async_sign(
        self,
        data_digest: bytes,
        digest_algorithm: str,
        dry_run: bool = False,
        use_pades: bool = False,
        timestamper: TimeStamper | None = None,
        signed_attr_settings: PdfCMSSignedAttributes | None = None,
        is_pdf_sig: bool = True,
        encap_content_info: Any = None,
    ) -> cms.ContentInfo:
        """Produce the detached CMS signature for ``data_digest`` (pyHanko's interface).

        A PAdES signature with nothing extra reuses the template; anything else, and the
        first signature, which the template is cut from, is pyHanko's own.
        """
        template = self.template
        reusable = (
            digest_algorithm == DIGEST_ALGORITHM
            and use_pades
            and is_pdf_sig
            and not dry_run
            and encap_content_info is None
            # PAdES leaves the signing time out of the signed attributes, so only these
            # settings would change them.
            and (
                signed_attr_settings is None
                or (
                    signed_attr_settings.adobe_revinfo_attr is None
                    and signed_attr_settings.cades_signed_attrs is None
                )
            )
            and self.signed_attr_prov_spec is None
            and self.unsigned_attr_prov_spec is None
        )
        if not reusable or template is None:
            content_info: cms.ContentInfo = await super().async_sign(
                data_digest,
                digest_algorithm,
                dry_run=dry_run,
                use_pades=use_pades,
                timestamper=timestamper,
                signed_attr_settings=signed_attr_settings,
                is_pdf_sig=is_pdf_sig,
                encap_content_info=encap_content_info,
            )
            if reusable:
                self.template = SignedDataTemplate.cut(content_info, data_digest)
            (signer_info,) = content_info["content"]["signer_infos"]
            self._check_token_fits(signer_info["unsigned_attrs"].dump())
            return content_info
        signed_attrs = template.signed_attributes(data_digest)
        signature = await self.async_sign_raw(signed_attrs, digest_algorithm)
        unsigned_attrs = b""
        if timestamper is not None:
            # pyHanko's own unsigned attributes: the signature timestamp token.
            attrs = await self.unsigned_attrs(
                digest_algorithm,
                signature,
                signed_attrs=cms.CMSAttributes.load(signed_attrs),
                timestamper=timestamper,
            )
            if attrs is not None:
                unsigned_attrs = b"\xa1" + attrs.dump()[1:]  # [1] IMPLICIT, as pyHanko tags it
            self._check_token_fits(unsigned_attrs)
        return cms.ContentInfo.load(template.content_info(signed_attrs, signature, unsigned_attrs))

    def _check_token_fits(self, unsigned_attrs: bytes) -> None:
        """Refuse a token larger than its reservation here: pyHanko would only notice when
        writing it, in an error that looks like the document's fault."""
        allowance = self._token_allowance
        if allowance is not None and 2 * len(unsigned_attrs) > allowance:
            raise SignerFailure(
                f"the timestamp token ({len(unsigned_attrs)} bytes) outgrew its reservation"
            )


def _tlv(tag: int, body: bytes) -> bytes:
    """One DER element: tag, definite length, body."""
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body
