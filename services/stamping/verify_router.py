"""Public verification: a serial's record (`GET /verify/{serial}`, what the QR code opens) and
an uploaded document's stamps (`POST /api/v1/verify`). JSON for programs, HTML for browsers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from services.platform.errors import MeteraiError, ServiceUnavailable
from services.stamping import repository as repo
from services.stamping import verify_page
from services.stamping.config import StampingSettings
from services.stamping.documents import DocumentRejected
from services.stamping.models import JobStatus, StampingJob
from services.stamping.router import MalformedMultipart, PayloadTooLarge, UnsupportedMediaType
from services.stamping.schemas import (
    SerialStatus,
    StampRecord,
    StampVerification,
    Tariff,
    VerificationOut,
)
from services.stamping.verification import DocumentCheck, StampCheck, StampVerifier, Verdict

router = APIRouter(tags=["verification"])

_SERIAL = re.compile(r"^[0-9A-Z]{22}$")
_PDF_MAGIC = b"%PDF-"
_RAW_TYPES = ("application/pdf", "application/octet-stream")

VERDICT_DETAILS = {
    Verdict.valid: "The e-meterai is authentic, matches our records, and the document was not "
    "changed after stamping.",
    Verdict.modified: "The e-meterai is authentic, but the document was changed after stamping.",
    Verdict.unrecorded: "The signature is ours, but our records do not show this document "
    "stamped with this serial.",
    Verdict.untrusted: "The signature was not made by a certificate we trust: this is not a "
    "genuine e-meterai.",
    Verdict.invalid: "The e-meterai signature is broken: the signed content or the signature "
    "was altered.",
    Verdict.not_stamped: "The document carries no e-meterai.",
}


class UnknownSerial(MeteraiError):
    status = 404
    code = "unknown_serial"
    title = "Unknown serial"


class NotPdf(MeteraiError):
    status = 415
    code = "not_pdf"
    title = "Only PDF documents can be verified"


class MissingFile(MeteraiError):
    status = 422
    code = "invalid_request"
    title = "Invalid request"


class UnreadableDocument(MeteraiError):
    """The upload cannot be read as a PDF; `code` says why (`invalid_pdf`, `too_complex`...)."""

    status = 422
    title = "Document cannot be verified"

    def __init__(self, rejection: DocumentRejected) -> None:
        super().__init__(rejection.detail)
        self.code = rejection.code


class VerificationBusy(ServiceUnavailable):
    code = "verification_busy"


class VerificationUnavailable(ServiceUnavailable):
    code = "verification_unavailable"


class VerificationGate:
    """At most `concurrency` documents are checked at once (the work is CPU-bound and holds
    the GIL) and at most `queue_limit` wait, each holding its upload in memory; more get 503."""

    def __init__(self, concurrency: int, queue_limit: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._queue_limit = queue_limit
        self._waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block, or raise VerificationBusy."""
        if self._slots.locked() and self._waiting >= self._queue_limit:
            raise VerificationBusy("Too many documents are being checked; try again shortly.")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


def _settings(request: Request) -> StampingSettings:
    settings: StampingSettings = request.app.state.settings
    return settings


def _negotiated(html: bool, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers of a negotiated answer: caches must key it on Accept."""
    return {"Vary": "Accept", **(verify_page.HEADERS if html else {}), **(headers or {})}


async def _jobs(
    sessionmaker: async_sessionmaker[AsyncSession], serials: set[str]
) -> dict[str, StampingJob]:
    if not serials:
        return {}
    async with sessionmaker() as session:
        return await repo.jobs_for_serials(session, serials)


def _serial_status(job: StampingJob) -> SerialStatus:
    if job.status is JobStatus.done:
        return SerialStatus(
            serial=job.serial,
            state="stamped",
            stamped_at=job.finished_at,
            sha256=job.output_sha256,
        )
    return SerialStatus(serial=job.serial, state="pending")


@router.get(
    "/verify/{serial}",
    response_model=SerialStatus,
    summary="Verify a serial (what the stamp's QR code opens)",
    responses={
        200: {"content": {"text/html": {}}, "description": "JSON, or a page for browsers."},
        404: {"description": "`unknown_serial`: no stamp was affixed with it"},
    },
)
async def verify_serial(serial: str, request: Request) -> Response:
    """Whether and when the serial was affixed, the stamped document's SHA-256 and the tariff.

    Answers HTML to browsers (`Accept: text/html`) and JSON otherwise.
    """
    html = verify_page.wants_html(request.headers.get("accept"))
    wanted = serial.strip().upper()
    job = None
    if _SERIAL.match(wanted):
        job = (await _jobs(request.app.state.sessionmaker, {wanted})).get(wanted)
    if job is None:
        if html:
            return HTMLResponse(
                verify_page.not_found_page(serial),
                status_code=404,
                headers=_negotiated(True, {"Cache-Control": "no-cache"}),
            )
        raise UnknownSerial(
            "No e-meterai was affixed with this serial.",
            extra={"serial": serial[:64], "state": "unknown"},
            headers=_negotiated(False, {"Cache-Control": "no-cache"}),
        )
    status = _serial_status(job)
    # A stamped serial's record never changes; a pending one will soon.
    cache = "public, max-age=300" if status.state == "stamped" else "no-cache"
    headers = _negotiated(html, {"Cache-Control": cache})
    if html:
        return HTMLResponse(verify_page.serial_page(status), headers=headers)
    return JSONResponse(status.model_dump(mode="json"), headers=headers)


async def _read_document(request: Request, max_bytes: int) -> bytes:
    """The uploaded PDF: the multipart `file` part, or the whole body as `application/pdf`."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"Documents are limited to {max_bytes:,} bytes.")
    if media_type == "multipart/form-data":
        document = await _multipart_file(request, max_bytes)
    elif media_type in _RAW_TYPES:
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > max_bytes:
                raise PayloadTooLarge(f"Documents are limited to {max_bytes:,} bytes.")
        document = bytes(received)
    else:
        raise UnsupportedMediaType(
            "Send the PDF as multipart/form-data with a `file` part, or as application/pdf."
        )
    if _PDF_MAGIC not in document[:1024]:
        raise NotPdf("The file is not a PDF (no %PDF- header).")
    return document


async def _multipart_file(request: Request, max_bytes: int) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except (MultiPartException, StarletteHTTPException) as exc:
        raise MalformedMultipart(f"The multipart body cannot be parsed: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise MissingFile("The `file` part (the PDF) is missing.")
        document = await upload.read(max_bytes + 1)
        if len(document) > max_bytes:
            raise PayloadTooLarge(f"Documents are limited to {max_bytes:,} bytes.")
        return document
    finally:
        await form.close()


def _record(stamp: StampCheck, job: StampingJob | None) -> StampRecord:
    if job is None:
        return StampRecord(state="unknown", matches=False)
    if job.status is not JobStatus.done:
        return StampRecord(state="pending", matches=False)
    return StampRecord(
        state="stamped",
        stamped_at=job.finished_at,
        sha256=job.output_sha256,
        matches=job.output_sha256 is not None and job.output_sha256 == stamp.signed_revision_sha256,
    )


def verification_result(check: DocumentCheck, jobs: dict[str, StampingJob]) -> VerificationOut:
    """The answer for an uploaded document, once its stamps are held against our records: a
    stamp whose signed revision is not exactly the document we stamped with its serial is
    `unrecorded`, however sound its signature."""
    stamps = []
    for stamp in check.stamps:
        record = _record(stamp, jobs.get(stamp.serial)) if stamp.serial else None
        verdict, problem = stamp.verdict, stamp.problem
        if verdict in (Verdict.valid, Verdict.modified) and not (record and record.matches):
            verdict = Verdict.unrecorded
            problem = "our records do not show this document stamped with this serial"
        stamps.append(
            StampVerification(
                serial=stamp.serial,
                verdict=verdict,
                signed_at=stamp.signed_at,
                timestamped=stamp.timestamped,
                intact=stamp.intact,
                trusted=stamp.trusted,
                signer=stamp.signer,
                coverage=stamp.coverage,
                modification_level=stamp.modification_level,
                changed_after_stamping=stamp.changed_after_stamping,
                signed_revision_sha256=stamp.signed_revision_sha256,
                field_name=stamp.field_name,
                record=record,
                problem=problem,
            )
        )
    if not stamps:
        verdict = Verdict.not_stamped
        primary = None
    else:
        # The stamp the verdict is about: the worst, and the newest of equals.
        primary = min(reversed(stamps), key=lambda stamp: stamp.verdict.rank)
        verdict = primary.verdict
    return VerificationOut(
        valid=verdict is Verdict.valid,
        verdict=verdict,
        detail=VERDICT_DETAILS[verdict],
        sha256=check.sha256,
        serial=primary.serial if primary else None,
        signed_at=primary.signed_at if primary else None,
        changed_after_stamping=primary.changed_after_stamping if primary else None,
        tariff=Tariff() if primary else None,
        stamps=stamps,
        other_signatures=check.other_signatures,
    )


VERIFY_FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The PDF."}
                    },
                }
            },
            "application/pdf": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/api/v1/verify",
    response_model=VerificationOut,
    summary="Verify a stamped PDF",
    openapi_extra=VERIFY_FORM_SCHEMA,
    responses={
        200: {"content": {"text/html": {}}, "description": "JSON, or a page for browsers."},
        413: {"description": "`payload_too_large`"},
        415: {"description": "`not_pdf` or `unsupported_media_type`"},
        422: {"description": "`invalid_pdf`, `encrypted_pdf`, `too_complex`"},
        503: {"description": "`verification_busy`"},
    },
)
async def verify_document(request: Request) -> Response:
    """Is the document's e-meterai valid (signed by us, intact), which serial, signed when,
    was the document changed after stamping, and do our records agree?

    Any readable PDF gets an answer (`verdict: not_stamped` without a stamp). Answers HTML to
    browsers (the verification page's upload form) and JSON otherwise.
    """
    html = verify_page.wants_html(request.headers.get("accept"))
    settings = _settings(request)
    state = request.app.state
    try:
        document = await _read_document(request, settings.max_upload_bytes)
        verifier: StampVerifier | None = state.verifier
        if verifier is None:
            raise VerificationUnavailable("Verification is not configured (no trust roots).")
        gate: VerificationGate = state.verify_gate
        async with gate.slot():
            try:
                check = await asyncio.to_thread(
                    verifier.check,
                    document,
                    cpu_budget_seconds=settings.document_cpu_budget_seconds,
                )
            except DocumentRejected as rejection:
                raise UnreadableDocument(rejection) from rejection
        serials = {stamp.serial for stamp in check.stamps if stamp.serial}
        result = verification_result(check, await _jobs(state.sessionmaker, serials))
    except MeteraiError as exc:
        if not html:
            exc.headers.update(_negotiated(False))
            raise
        return HTMLResponse(
            verify_page.problem_page(exc.code),
            status_code=exc.status,
            headers=_negotiated(True, exc.headers),
        )
    headers = _negotiated(html, {"Cache-Control": "no-store"})
    if html:
        return HTMLResponse(verify_page.result_page(result), headers=headers)
    return JSONResponse(result.model_dump(mode="json"), headers=headers)
