"""Checking a stamped PDF: is each e-meterai signature intact and made by a certificate we
trust, which serial, signed when, and was the document changed after stamping?

Uploads come from strangers, so a document is read as the stamping upload reads it (a
:class:`~services.stamping.reading.BudgetedReader` under the CPU budget and decoding limits)
and only so many stamps are checked. :meth:`StampVerifier.check` is synchronous and CPU-bound;
run it through ``asyncio.to_thread``. Whether our records agree (the serial was affixed to
exactly the revision that carries its signature) is the caller's part: see
:func:`services.stamping.verify_router.verify_upload`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from asn1crypto import x509 as asn1_x509
from pyhanko.keys import load_certs_from_pemder
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.misc import PdfReadError, PdfStrictReadError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.diff_analysis import ModificationLevel
from pyhanko.sign.fields import enumerate_sig_fields
from pyhanko.sign.validation import EmbeddedPdfSignature, validate_pdf_signature
from pyhanko.sign.validation.status import PdfSignatureStatus, SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext

from services.stamping.documents import DocumentRejected, hybrid_opt_in
from services.stamping.reading import BudgetedReader, CpuBudget, exceeded_limit

__all__ = [
    "FIELD_PREFIX",
    "MAX_STAMPS",
    "DocumentCheck",
    "StampCheck",
    "StampVerifier",
    "Verdict",
    "load_trust_roots",
]

FIELD_PREFIX = "eMeterai-"
"""Our signature fields are named ``eMeterai-<serial>`` (see services.stamping.signing)."""

MAX_STAMPS = 16
"""A document with more e-meterai signatures than this is refused as ``too_complex``."""

_REASON_SERIAL = re.compile(r"^\[([0-9A-Z]{22})\]")
_FIELD_SERIAL = re.compile(rf"^{re.escape(FIELD_PREFIX)}([0-9A-Z]{{22}})$")

# pyHanko's validator logs a traceback for every changed document and every untrusted
# signer; for a verification service those are ordinary answers (returned to the caller), and
# strangers could fill the logs with them.
for _name in ("pyhanko.sign.diff_analysis", "pyhanko.sign.validation"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


class Verdict(StrEnum):
    """What a stamp (or a whole document: its worst stamp) comes to, worst first."""

    invalid = "invalid"  # the signed bytes or the signature itself do not check out
    untrusted = "untrusted"  # intact, but not signed by a certificate we trust
    unrecorded = "unrecorded"  # intact and trusted, but not what our records say was stamped
    modified = "modified"  # authentic, but the document was changed after stamping
    valid = "valid"
    not_stamped = "not_stamped"  # no e-meterai signature at all (documents only)

    @property
    def rank(self) -> int:
        return list(Verdict).index(self)


@dataclass
class StampCheck:
    """One e-meterai signature in a document, as the signature itself tells it."""

    serial: str | None
    field_name: str
    signed_at: datetime | None
    timestamped: bool
    intact: bool
    trusted: bool
    signer: str | None
    coverage: str
    modification_level: str | None
    changed_after_stamping: bool
    signed_revision_sha256: str | None
    verdict: Verdict
    problem: str | None = None


@dataclass
class DocumentCheck:
    """Every e-meterai signature of a document, oldest first, and how many others it has."""

    sha256: str
    stamps: list[StampCheck] = field(default_factory=list)
    other_signatures: int = 0

    @property
    def verdict(self) -> Verdict:
        """The worst verdict of the stamps (`not_stamped` without any)."""
        if not self.stamps:
            return Verdict.not_stamped
        return min((stamp.verdict for stamp in self.stamps), key=lambda v: v.rank)


def load_trust_roots(paths: Sequence[Path]) -> list[asn1_x509.Certificate]:
    """The PEM or DER certificates in `paths` (a file may hold several)."""
    roots: list[asn1_x509.Certificate] = list(
        load_certs_from_pemder([str(path) for path in paths])  # type: ignore[no-untyped-call]
    )
    if not roots:
        raise ValueError("no trust roots: name at least one certificate")
    return roots


class StampVerifier:
    """Checks stamp signatures against fixed trust roots (the CA that issues our signing
    certificates); build once per process, call :meth:`check` from worker threads."""

    def __init__(self, trust_roots: Sequence[asn1_x509.Certificate]) -> None:
        self.trust_roots = list(trust_roots)

    def check(self, pdf: bytes, *, cpu_budget_seconds: float) -> DocumentCheck:
        """Read `pdf` under the budget and check each of its e-meterai signatures.

        Raises DocumentRejected (``invalid_pdf``, ``encrypted_pdf``, ``too_complex``) when the
        document cannot be read; a signature that cannot be checked is reported `invalid`.
        Blocking: call it through ``asyncio.to_thread``.
        """
        with _read_errors():
            if not pdf.startswith(b"%PDF-"):
                raise DocumentRejected("invalid_pdf", "the file does not start with a PDF header")
            budget = CpuBudget(cpu_budget_seconds)
            try:
                result = self._check_all(pdf, BudgetedReader(pdf, budget))
            except PdfStrictReadError:
                # Hybrid-reference files (MS Office) read only leniently, and so do our stamps
                # on them: stamping opted in for these too (documents.hybrid_opt_in).
                result = self._check_all(pdf, hybrid_opt_in(pdf, budget))
        _judge_later_changes(result.stamps)
        return result

    def _check_all(self, pdf: bytes, reader: PdfFileReader) -> DocumentCheck:
        result = DocumentCheck(sha256=hashlib.sha256(pdf).hexdigest())
        if "/Encrypt" in reader.trailer_view:
            raise DocumentRejected("encrypted_pdf", "encrypted PDFs carry no e-meterai")
        if reader.strict and reader.xrefs.hybrid_xrefs_present:
            raise PdfStrictReadError("a hybrid-reference file")
        found: list[tuple[int, StampCheck | EmbeddedPdfSignature]] = []
        for name, value, field_ref in _signature_fields(reader):
            if not _is_ours(str(name), value.get_object()):
                result.other_signatures += 1
                continue
            if len(found) == MAX_STAMPS:
                raise DocumentRejected(
                    "too_complex", f"more than {MAX_STAMPS} e-meterai signatures"
                )
            try:
                embedded = EmbeddedPdfSignature(reader, field_ref.get_object(), name)
            except Exception as exc:
                if exceeded_limit(exc) is not None or isinstance(exc, PdfStrictReadError):
                    raise
                found.append((-1, _unreadable(str(name), value.get_object(), exc)))
                continue
            found.append((embedded.signed_revision, embedded))
        found.sort(key=lambda item: item[0])
        result.stamps = [
            item if isinstance(item, StampCheck) else self._check_one(pdf, item)
            for _, item in found
        ]
        return result

    def _check_one(self, pdf: bytes, embedded: EmbeddedPdfSignature) -> StampCheck:
        serial, problem = _serial_of(str(embedded.field_name), embedded.sig_object)
        check = StampCheck(
            serial=serial,
            field_name=str(embedded.field_name),
            signed_at=None,
            timestamped=False,
            intact=False,
            trusted=False,
            signer=None,
            coverage="unclear",
            modification_level=None,
            changed_after_stamping=True,
            signed_revision_sha256=_signed_revision_sha256(pdf, embedded),
            verdict=Verdict.invalid,
            problem=problem,
        )
        try:
            status = validate_pdf_signature(
                embedded, ValidationContext(trust_roots=self.trust_roots)
            )
        except Exception as exc:
            if exceeded_limit(exc) is not None or isinstance(exc, PdfStrictReadError):
                raise
            check.problem = f"the signature cannot be checked: {type(exc).__name__}: {exc}"
            return check
        _fill(check, status)
        return check


def _signed_revision_sha256(pdf: bytes, embedded: EmbeddedPdfSignature) -> str | None:
    """SHA-256 of the document up to the end of the signature's byte range: the document as
    it was signed (for our stamps, the output of the job that made it)."""
    try:
        start, _, second, length = (int(value) for value in embedded.byte_range)
    except (TypeError, ValueError):
        return None
    end = second + length
    if start != 0 or not 0 < end <= len(pdf):
        return None
    return hashlib.sha256(pdf[:end]).hexdigest()


def _signature_fields(reader: PdfFileReader) -> list[tuple[str, Any, Any]]:
    """The filled signature fields: (name, value, field reference)."""
    try:
        return list(enumerate_sig_fields(reader, filled_status=True))
    except PdfReadError as exc:
        if exceeded_limit(exc) is not None or isinstance(exc, PdfStrictReadError):
            raise
        # A form tree pyHanko will not walk (a cycle, which stamping leaves alone): our
        # stamps are among the top-level fields.
        return list(_top_level_sig_fields(reader))


def _top_level_sig_fields(reader: PdfFileReader) -> Iterator[tuple[str, Any, Any]]:
    acroform = reader.root.get("/AcroForm")
    fields = acroform.get("/Fields") if isinstance(acroform, dict) else None
    for ref in fields if isinstance(fields, list) else []:
        if not isinstance(ref, generic.IndirectObject):
            continue
        field = ref.get_object()  # type: ignore[no-untyped-call]
        if (
            isinstance(field, generic.DictionaryObject)
            and field.get("/FT") == "/Sig"
            and field.get("/V") is not None
        ):
            yield str(field.get("/T", "")), field.raw_get("/V"), ref


def _is_ours(field_name: str, sig_object: Any) -> bool:
    """Our fields are named `eMeterai-<serial>`; our reasons start with `[<serial>]`. Document
    timestamps (PAdES B-LTA, whatever their field's name) are not stamps."""
    if not isinstance(sig_object, dict):
        return field_name.startswith(FIELD_PREFIX)
    if sig_object.get("/Type") == "/DocTimeStamp":
        return False
    reason = str(sig_object.get("/Reason", ""))
    return field_name.startswith(FIELD_PREFIX) or bool(_REASON_SERIAL.match(reason))


def _unreadable(field_name: str, sig_object: Any, exc: Exception) -> StampCheck:
    """A field that looks like ours but whose signature cannot even be parsed."""
    serial, _ = _serial_of(field_name, sig_object)
    return StampCheck(
        serial=serial,
        field_name=field_name,
        signed_at=None,
        timestamped=False,
        intact=False,
        trusted=False,
        signer=None,
        coverage="unclear",
        modification_level=None,
        changed_after_stamping=True,
        signed_revision_sha256=None,
        verdict=Verdict.invalid,
        problem=f"the signature cannot be read: {type(exc).__name__}: {exc}",
    )


def _serial_of(field_name: str, sig_object: Any) -> tuple[str | None, str | None]:
    """The serial the signature names (its reason `[SERIAL] ...`, else its field name), and a
    problem if the two disagree."""
    raw_reason = sig_object.get("/Reason", "") if isinstance(sig_object, dict) else ""
    reason = _REASON_SERIAL.match(str(raw_reason))
    named = _FIELD_SERIAL.match(field_name)
    serial = reason.group(1) if reason else named.group(1) if named else None
    if reason and named and reason.group(1) != named.group(1):
        return serial, "the field name and the reason name different serials"
    return serial, None


def _fill(check: StampCheck, status: PdfSignatureStatus) -> None:
    check.intact = bool(status.intact and status.valid)
    check.trusted = bool(status.trusted)
    timestamp = status.timestamp_validity
    check.timestamped = bool(
        timestamp and timestamp.intact and timestamp.valid and timestamp.trusted
    )
    check.signed_at = timestamp.timestamp if timestamp and check.timestamped else None
    check.signed_at = check.signed_at or status.signer_reported_dt
    check.signer = status.signing_cert.subject.human_friendly
    coverage = status.coverage or SignatureCoverageLevel.UNCLEAR
    check.coverage = coverage.name.lower()
    level = status.modification_level
    check.modification_level = level.name.lower() if level is not None else None
    # Validation data and document timestamps added later (PAdES B-LT/B-LTA) change nothing.
    check.changed_after_stamping = (
        coverage is not SignatureCoverageLevel.ENTIRE_FILE
        and level is not ModificationLevel.LTA_UPDATES
    )
    if check.problem is not None:
        check.verdict = Verdict.invalid
    elif not check.intact:
        check.verdict = Verdict.invalid
        check.problem = "the signed bytes of the document or the signature were altered"
    elif not check.trusted:
        check.verdict = Verdict.untrusted
        check.problem = "the signing certificate is not issued by a certificate we trust"
    elif check.changed_after_stamping:
        check.verdict = Verdict.modified  # unless only later stamps came after it: see below
        check.problem = "the document was changed after stamping"
    else:
        check.verdict = Verdict.valid


def _judge_later_changes(stamps: list[StampCheck]) -> None:
    """A stamp followed only by our later stamps (a document that needs two meterai) is not
    "modified": the changes after it add signatures (pyHanko: form filling at most), and the
    last stamp covers the whole file."""
    if not stamps or stamps[-1].verdict is not Verdict.valid:
        return
    allowed = {
        level.name.lower()
        for level in (
            ModificationLevel.NONE,
            ModificationLevel.LTA_UPDATES,
            ModificationLevel.FORM_FILLING,
        )
    }
    # From the newest back: a stamp is cleared only if every later one is valid.
    for stamp in reversed(stamps[:-1]):
        if stamp.verdict is Verdict.valid:
            continue
        if (
            stamp.verdict is not Verdict.modified
            or stamp.coverage != SignatureCoverageLevel.ENTIRE_REVISION.name.lower()
            or stamp.modification_level not in allowed
        ):
            return
        stamp.verdict, stamp.problem = Verdict.valid, None


@contextmanager
def _read_errors() -> Iterator[None]:
    """Whatever reading a hostile or broken document raises becomes DocumentRejected."""
    try:
        yield
    except DocumentRejected:
        raise
    except Exception as exc:
        limit = exceeded_limit(exc)
        if limit is not None:
            raise DocumentRejected("too_complex", limit) from exc
        raise DocumentRejected("invalid_pdf", f"{type(exc).__name__}: {exc}") from exc
