"""Affix a visible e-meterai to a PDF and sign the whole document (PAdES, incremental):
B-B, or B-T when a timestamp authority is configured.

Build one :class:`StampSigner` per worker process and call :meth:`StampSigner.stamp` for every
document. The signer holds no per-document state: the key object, certificate chain, stamp
style, the reserved signature size and the CMS container template
(:mod:`services.stamping.cms_signer`) are made once. ``stamp`` is synchronous and CPU-bound
(plus one request to the timestamp authority for B-T); run it through ``asyncio.to_thread``.
Concurrent calls from several threads are safe (what is shared is computed once, the
template and the timestamp reservation by the first stamp, and never changed after), but the
GIL serialises them, so plan for one stamp at a time per process (B-T stamps may overlap
their waits for the authority).

Documents come from strangers: they are read under a CPU budget and decoding limits (see
:mod:`services.stamping.reading`), checked and placed by :mod:`services.stamping.documents`,
and whatever a document makes go wrong becomes :class:`DocumentRejected`, never a crash.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pyhanko.keys.internal import translate_pyca_cryptography_cert_to_asn1
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko_certvalidator.registry import SimpleCertificateStore

from services.stamping import qr
from services.stamping.appearance import EMeteraiStampStyle
from services.stamping.cms_signer import KeySigner, SignerFailure
from services.stamping.documents import (
    DocumentRejected,
    StampBox,
    hybrid_opt_in,
    open_document,
    placement,
    refuse_stamped,
    rehearse,
)
from services.stamping.reading import DEFAULT_CPU_BUDGET_SECONDS, CpuBudget, exceeded_limit
from services.stamping.timestamps import TimestampAuthority

__all__ = [
    "DEFAULT_CPU_BUDGET_SECONDS",
    "DocumentRejected",
    "SignerFailure",
    "StampBox",
    "StampRequest",
    "StampSigner",
    "inspect_document",
]

SERIAL_PATTERN = re.compile(r"[0-9A-Z]{22}")


@dataclass(frozen=True)
class StampRequest:
    """One stamp to affix: its serial, where the QR code points, and where it goes."""

    serial: str
    verify_url: str
    page: int | None = None
    box: StampBox | None = None


class StampSigner:
    """Stamps and signs documents with one key; build once per process, reuse for every job."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        *,
        tsa_url: str = "",
        tsa_timeout_seconds: float = 5.0,
    ) -> None:
        """Use an already loaded key; prefer :meth:`from_pem_files` or :meth:`from_pkcs12`.

        With ``tsa_url``, every signature gets an RFC 3161 signature timestamp from that
        authority (PAdES B-T); a failing authority fails the stamp with SignerFailure.
        """
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"unsupported signing key type {type(private_key).__name__}")
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the signing certificate does not belong to the private key")
        self.certificate = certificate
        signing_cert = translate_pyca_cryptography_cert_to_asn1(certificate)
        others = [translate_pyca_cryptography_cert_to_asn1(cert) for cert in chain]
        registry = SimpleCertificateStore.from_certs(others)  # type: ignore[no-untyped-call]
        self._signer = KeySigner(private_key, signing_cert, registry)
        self._bytes_reserved = self._signer.bytes_reserved()
        self._style = EMeteraiStampStyle()
        self._timestamper = (
            TimestampAuthority(tsa_url, timeout=tsa_timeout_seconds) if tsa_url else None
        )

    @classmethod
    def from_pem_files(
        cls,
        key_path: Path,
        cert_path: Path,
        chain_paths: Sequence[Path] = (),
        key_passphrase: bytes | None = None,
        *,
        tsa_url: str = "",
        tsa_timeout_seconds: float = 5.0,
    ) -> StampSigner:
        """Load a PEM (or DER) private key, its certificate and optional chain certificates."""
        key = _load_private_key(key_path.read_bytes(), key_passphrase)
        # A certificate file may carry its chain after the signer's own certificate.
        cert, *bundled = _load_certificates(cert_path.read_bytes())
        chain = bundled + [c for path in chain_paths for c in _load_certificates(path.read_bytes())]
        return cls(key, cert, chain, tsa_url=tsa_url, tsa_timeout_seconds=tsa_timeout_seconds)

    @classmethod
    def from_pkcs12(
        cls,
        path: Path,
        passphrase: bytes | None,
        *,
        tsa_url: str = "",
        tsa_timeout_seconds: float = 5.0,
    ) -> StampSigner:
        """Load key, certificate and chain from a PKCS#12 (.p12/.pfx) bundle."""
        key, cert, chain = pkcs12.load_key_and_certificates(path.read_bytes(), passphrase)
        if key is None or cert is None:
            raise ValueError(f"{path} does not hold both a private key and its certificate")
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"unsupported signing key type {type(key).__name__}")
        return cls(key, cert, chain, tsa_url=tsa_url, tsa_timeout_seconds=tsa_timeout_seconds)

    def stamp(
        self,
        pdf: bytes,
        request: StampRequest,
        *,
        cpu_budget_seconds: float = DEFAULT_CPU_BUDGET_SECONDS,
    ) -> bytes:
        """Affix the visible e-meterai and sign the whole document as an incremental update.

        Returns the signed PDF. Raises DocumentRejected for bad documents (``too_complex`` once
        reading it took ``cpu_budget_seconds`` of this thread's CPU time), SignerFailure if the
        key or the timestamp authority failed (worth retrying later), ValueError for a malformed
        request, RuntimeError if called on a thread that runs an event loop.
        """
        _refuse_event_loop_thread()
        if not SERIAL_PATTERN.fullmatch(request.serial):
            raise ValueError(f"serial must be 22 upper-case letters or digits: {request.serial!r}")
        if not request.verify_url:
            raise ValueError("verify_url must not be empty")
        if len(request.verify_url.encode()) > qr.MAX_BYTES:
            raise ValueError(f"verify_url is longer than a QR code holds ({qr.MAX_BYTES} bytes)")
        field_name = f"eMeterai-{request.serial}"
        output = BytesIO()
        with _document_errors():
            budget = CpuBudget(cpu_budget_seconds)
            reader = open_document(pdf, budget)
            page_index, box = placement(reader, request.page, request.box)
            refuse_stamped(reader, request.serial)
            writer = IncrementalPdfFileWriter.from_reader(
                hybrid_opt_in(pdf, budget) if reader.xrefs.hybrid_xrefs_present else reader
            )
            pdf_signer = signers.PdfSigner(
                signers.PdfSignatureMetadata(
                    field_name=field_name,
                    reason=f"[{request.serial}] e-Meterai",
                    subfilter=fields.SigSeedSubFilter.PADES,
                    md_algorithm="sha256",
                ),
                signer=self._signer,
                timestamper=self._timestamper,
                stamp_style=self._style,
                new_field_spec=fields.SigFieldSpec(
                    sig_field_name=field_name,
                    on_page=page_index,
                    # pyHanko annotates the box as ints but writes floats correctly.
                    box=(box.llx, box.lly, box.urx, box.ury),  # type: ignore[arg-type]
                    readable_field_name=f"e-Meterai {request.serial}",
                ),
            )
            # pyHanko's sign_pdf, in a coroutine of ours so that the timestamp reservation
            # can be sized on the same event loop.
            signing = self._sign(pdf_signer, writer, request, output)
            if self._timestamper is None:
                _run_offline(signing)
            else:
                asyncio.run(signing)
        return output.getvalue()

    async def _sign(
        self,
        pdf_signer: signers.PdfSigner,
        writer: IncrementalPdfFileWriter,
        request: StampRequest,
        output: BytesIO,
    ) -> None:
        # A fixed reservation skips pyHanko's dry-run signature used for sizing.
        reserved = self._bytes_reserved
        if self._timestamper is not None:
            reserved += await self._signer.timestamp_allowance(self._timestamper)
        await pdf_signer.async_sign_pdf(
            writer,
            bytes_reserved=reserved,
            appearance_text_params={"serial": request.serial, "url": request.verify_url},
            output=output,
        )


def inspect_document(
    pdf: bytes,
    page: int | None,
    box: StampBox | None,
    serial: str | None = None,
    *,
    cpu_budget_seconds: float = DEFAULT_CPU_BUDGET_SECONDS,
) -> tuple[int, StampBox]:
    """Validate a document before a job is accepted; needs no key, so the API can call it.

    Checks that it parses within ``cpu_budget_seconds`` and the decoding limits, is not
    encrypted, is not certified (``certified_no_changes`` for P=1, ``certified_pdf``
    otherwise), that the 1-based ``page`` exists (None = last), that the (normalised) box is at
    least MIN_BOX_SIDE and fits inside the page's crop box (None = the default bottom-right
    box), and that ``serial`` (if given) is not affixed yet. Then it rehearses the changes a
    stamp makes (``documents.rehearse``). Returns the 0-based page index and the box. Raises
    DocumentRejected. Blocking: call it through ``asyncio.to_thread``.
    """
    with _document_errors():
        reader = open_document(pdf, CpuBudget(cpu_budget_seconds))
        page_index, placed = placement(reader, page, box)
        if serial is not None:
            refuse_stamped(reader, serial)
        rehearse(reader, page_index, placed)
        return page_index, placed


class _OwnLoop:
    """An event loop that is closed when it is dropped (with its thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        self.loop.close()


class _ThreadLoops(threading.local):
    own: _OwnLoop | None = None


_thread_loops = _ThreadLoops()


def _run_offline(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that waits for nothing outside this process (a PAdES B-B signature)
    on an event loop of this thread's own, made once.

    asyncio.run makes a loop and closes it every time: 6% of a stamp's CPU. B-T signatures
    still get a fresh loop each: the timestamp authority's connection is closed by callbacks
    that asyncio.run lets finish, which a loop kept for the next stamp would leave pending.
    """
    own = _thread_loops.own
    if own is None:
        own = _thread_loops.own = _OwnLoop()
    own.loop.run_until_complete(coroutine)


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
        limit = exceeded_limit(exc)
        if limit is not None:
            raise DocumentRejected("too_complex", limit) from exc
        raise DocumentRejected("invalid_pdf", f"{type(exc).__name__}: {exc}") from exc


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
