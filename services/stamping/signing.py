"""Affix a visible e-meterai to a PDF and sign the whole document (PAdES B-B, incremental).

Build one :class:`StampSigner` per worker process and call :meth:`StampSigner.stamp` for every
document. The signer holds no per-document state: the key object, certificate chain, stamp
style and the reserved signature size are computed once. ``stamp`` is synchronous and
CPU-bound; run it through ``asyncio.to_thread``. Concurrent calls from several threads are
safe (nothing shared is mutated), but the GIL serialises them, so plan for one stamp at a
time per process.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pyhanko.keys.internal import translate_pyca_cryptography_cert_to_asn1
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.rw_common import find_inherited_value_in_tree
from pyhanko.sign import fields, signers
from pyhanko.sign.validation import read_certification_data
from pyhanko_certvalidator.registry import SimpleCertificateStore

from services.stamping.appearance import EMeteraiStampStyle

__all__ = [
    "DocumentRejected",
    "SignerFailure",
    "StampBox",
    "StampRequest",
    "StampSigner",
    "inspect_document",
]

SERIAL_PATTERN = re.compile(r"[0-9A-Z]{22}")
DEFAULT_BOX_SIZE = 90.0
DEFAULT_BOX_MARGIN = 36.0
# Below half an inch the QR code stops being scannable; a zero-size box would even make
# pyHanko create an invisible signature.
MIN_BOX_SIDE = 36.0
# Boxes computed by clients from floating-point page sizes may overshoot by rounding noise.
_TOLERANCE = 0.01


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


@dataclass(frozen=True)
class StampRequest:
    """One stamp to affix: its serial, where the QR code points, and where it goes."""

    serial: str
    verify_url: str
    page: int | None = None
    box: StampBox | None = None


class DocumentRejected(Exception):
    """The input document cannot be stamped; retrying will not help.

    ``code`` is stable and machine-readable: ``invalid_pdf``, ``encrypted_pdf``,
    ``certified_no_changes``, ``certified_pdf``, ``no_pages``, ``page_out_of_range``,
    ``box_off_page``, ``box_too_small``, ``already_stamped``.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class SignerFailure(RuntimeError):
    """The signing key failed; the document is not at fault and the job may be retried."""


class StampSigner:
    """Stamps and signs documents with one key; build once per process, reuse for every job."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        """Use an already loaded key; prefer :meth:`from_pem_files` or :meth:`from_pkcs12`."""
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"unsupported signing key type {type(private_key).__name__}")
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the signing certificate does not belong to the private key")
        self.certificate = certificate
        signing_cert = translate_pyca_cryptography_cert_to_asn1(certificate)
        others = [translate_pyca_cryptography_cert_to_asn1(cert) for cert in chain]
        registry = SimpleCertificateStore.from_certs(others)  # type: ignore[no-untyped-call]
        self._signer = _LoadedKeySigner(private_key, signing_cert, registry)
        self._bytes_reserved = _reserved_signature_size(private_key, [signing_cert, *others])
        self._style = EMeteraiStampStyle()

    @classmethod
    def from_pem_files(
        cls,
        key_path: Path,
        cert_path: Path,
        chain_paths: Sequence[Path] = (),
        key_passphrase: bytes | None = None,
    ) -> StampSigner:
        """Load a PEM (or DER) private key, its certificate and optional chain certificates."""
        key = _load_private_key(key_path.read_bytes(), key_passphrase)
        # A certificate file may carry its chain after the signer's own certificate.
        cert, *bundled = _load_certificates(cert_path.read_bytes())
        chain = bundled + [c for path in chain_paths for c in _load_certificates(path.read_bytes())]
        return cls(key, cert, chain)

    @classmethod
    def from_pkcs12(cls, path: Path, passphrase: bytes | None) -> StampSigner:
        """Load key, certificate and chain from a PKCS#12 (.p12/.pfx) bundle."""
        key, cert, chain = pkcs12.load_key_and_certificates(path.read_bytes(), passphrase)
        if key is None or cert is None:
            raise ValueError(f"{path} does not hold both a private key and its certificate")
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"unsupported signing key type {type(key).__name__}")
        return cls(key, cert, chain)

    def stamp(self, pdf: bytes, request: StampRequest) -> bytes:
        """Affix the visible e-meterai and sign the whole document as an incremental update.

        Returns the signed PDF. Raises DocumentRejected for bad documents, SignerFailure if the
        key itself failed, ValueError for a malformed request, RuntimeError if called on a thread
        that runs an event loop.
        """
        _refuse_event_loop_thread()
        if not SERIAL_PATTERN.fullmatch(request.serial):
            raise ValueError(f"serial must be 22 upper-case letters or digits: {request.serial!r}")
        if not request.verify_url:
            raise ValueError("verify_url must not be empty")
        field_name = f"eMeterai-{request.serial}"
        output = BytesIO()
        with _document_errors():
            reader = _open(pdf)
            page_index, box = _placement(reader, request.page, request.box)
            if any(True for _ in fields.enumerate_sig_fields(reader, with_name=field_name)):
                raise DocumentRejected("already_stamped", f"{field_name} is already present")
            writer = IncrementalPdfFileWriter.from_reader(reader)
            pdf_signer = signers.PdfSigner(
                signers.PdfSignatureMetadata(
                    field_name=field_name,
                    reason=f"[{request.serial}] e-Meterai",
                    subfilter=fields.SigSeedSubFilter.PADES,
                    md_algorithm="sha256",
                ),
                signer=self._signer,
                stamp_style=self._style,
                new_field_spec=fields.SigFieldSpec(
                    sig_field_name=field_name,
                    on_page=page_index,
                    # pyHanko annotates the box as ints but writes floats correctly.
                    box=(box.llx, box.lly, box.urx, box.ury),  # type: ignore[arg-type]
                    readable_field_name=f"e-Meterai {request.serial}",
                ),
            )
            pdf_signer.sign_pdf(
                writer,
                # A fixed reservation skips pyHanko's dry-run signature used for sizing.
                bytes_reserved=self._bytes_reserved,
                appearance_text_params={"serial": request.serial, "url": request.verify_url},
                output=output,
            )
        return output.getvalue()


def inspect_document(pdf: bytes, page: int | None, box: StampBox | None) -> tuple[int, StampBox]:
    """Validate a document before a job is accepted; needs no key, so the API can call it.

    Checks that it parses, is not encrypted, is not certified (``certified_no_changes`` for
    P=1, ``certified_pdf`` otherwise), that the 1-based ``page`` exists (None = last) and that
    the (normalised) box is at least MIN_BOX_SIDE and fits inside the page's crop box
    (None = the default bottom-right box). Returns the 0-based page index and the box.
    Raises DocumentRejected. Blocking: call it through ``asyncio.to_thread``.
    """
    with _document_errors():
        return _placement(_open(pdf), page, box)


class _LoadedKeySigner(signers.Signer):
    """pyHanko signer over a key object loaded once (SimpleSigner re-parses DER per sign)."""

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

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        """Sign ``data`` with the loaded key (PKCS#1 v1.5 for RSA, ECDSA for EC keys)."""
        if digest_algorithm != "sha256":
            raise SignerFailure(f"unexpected digest algorithm {digest_algorithm}")
        try:
            if isinstance(self._key, rsa.RSAPrivateKey):
                return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        except Exception as exc:
            raise SignerFailure(f"signing key failed: {exc}") from exc


def _refuse_event_loop_thread() -> None:
    """Fail loudly, before any document handling, when called on an event loop's thread.

    pyHanko's synchronous API runs its own event loop; inside a running loop that would fail
    deep in the signing code, where it must not be mistaken for a bad document.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("StampSigner.stamp blocks; call it through asyncio.to_thread")


@contextmanager
def _document_errors() -> Iterator[None]:
    """Turn anything a hostile or broken document can raise into DocumentRejected."""
    try:
        yield
    except (DocumentRejected, SignerFailure):
        raise
    except Exception as exc:
        raise DocumentRejected("invalid_pdf", f"{type(exc).__name__}: {exc}") from exc


def _open(pdf: bytes) -> PdfFileReader:
    """Parse a document and refuse the kinds we never sign."""
    if not pdf.startswith(b"%PDF-"):
        raise DocumentRejected("invalid_pdf", "the file does not start with a PDF header")
    reader = PdfFileReader(BytesIO(pdf), strict=True)
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


def _placement(
    reader: PdfFileReader, page: int | None, box: StampBox | None
) -> tuple[int, StampBox]:
    """Resolve the 1-based (or default last) page and the box, checking both against the page."""
    count = reader.root["/Pages"]["/Count"]
    if not isinstance(count, int) or count < 1:
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
    """A page attribute that may be set on the page or on any ancestor in the page tree."""
    return find_inherited_value_in_tree(page, key, "/Parent")  # type: ignore[no-untyped-call]


def _as_box(value: Any) -> StampBox:
    if value is None or len(value) != 4:
        raise DocumentRejected("invalid_pdf", "a page has no valid /MediaBox")
    llx, lly, urx, ury = (float(v) for v in value)
    return StampBox.normalised(llx, lly, urx, ury)


def _reserved_signature_size(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, certs: Sequence[asn1_x509.Certificate]
) -> int:
    """Hex characters to reserve for the CMS blob: certificates, signature and some slack."""
    signature = key.key_size // 8 if isinstance(key, rsa.RSAPrivateKey) else key.key_size // 4 + 16
    # Signed attributes (content type, digest, algorithm protection, ESS signing-certificate-v2
    # which repeats the issuer name) and the SignedData framing: about 600 bytes measured.
    der = sum(len(cert.dump()) for cert in certs) + signature + len(certs[0].issuer.dump()) + 1024
    return 2 * der  # written as hex


def _load_private_key(
    data: bytes, passphrase: bytes | None
) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    loader = (
        serialization.load_pem_private_key
        if b"-----BEGIN" in data
        else serialization.load_der_private_key
    )
    key = loader(data, passphrase)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"unsupported signing key type {type(key).__name__}")
    return key


def _load_certificates(data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]
