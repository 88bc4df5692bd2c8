"""Stamping HTTP routes: accept a PDF, report a job, hand out the stamped document."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any
from urllib.parse import urlparse

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from services.platform.blobs import BlobNotFound, BlobStore
from services.platform.errors import Conflict, MeteraiError, NotFound
from services.platform.idempotency import IdempotencyKey
from services.platform.identity import CurrentPrincipal, Principal
from services.stamping import repository as repo
from services.stamping import service
from services.stamping.backlog import BacklogGuard
from services.stamping.config import StampingSettings
from services.stamping.models import JobStatus, StampingJob
from services.stamping.schemas import STAMPING_FORM_SCHEMA, Box, StampingError, StampingOut
from services.stamping.signing import StampBox

router = APIRouter(tags=["stamping"])

_SERIAL = re.compile(r"^[0-9A-Z]{22}$")
_PDF_MAGIC = b"%PDF-"


class InvalidForm(MeteraiError):
    status = 422
    code = "invalid_request"
    title = "Invalid request"


class MalformedMultipart(MeteraiError):
    status = 400
    code = "malformed_multipart"
    title = "Malformed multipart body"


class UnsupportedMediaType(MeteraiError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class PayloadTooLarge(MeteraiError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class NotPdf(MeteraiError):
    status = 415
    code = "not_pdf"
    title = "Only PDF documents can be stamped"


class NotReady(MeteraiError):
    status = 409
    code = "not_ready"
    title = "The document is not stamped yet"


def _settings(request: Request) -> StampingSettings:
    settings: StampingSettings = request.app.state.settings
    return settings


def render_job(job: StampingJob, public_base_url: str) -> dict[str, Any]:
    """The public view of a job (also stored for idempotent replays)."""
    done = job.status is JobStatus.done
    out = StampingOut(
        id=job.id,
        status=job.status,
        serial=job.serial,
        page=job.page + 1,
        box=Box(llx=job.llx, lly=job.lly, urx=job.urx, ury=job.ury),
        error=StampingError(code=job.error_code, detail=job.error_detail)
        if job.error_code
        else None,
        sha256=job.output_sha256 if done else None,
        input_sha256=job.input_sha256,
        document_url=f"{public_base_url}/api/v1/stampings/{job.id}/document" if done else None,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )
    return out.model_dump(mode="json")


async def _owned_job(request: Request, principal: Principal, job_id: uuid.UUID) -> StampingJob:
    async with request.app.state.sessionmaker() as session:
        job = await repo.get_job(session, job_id)
    # Another caller's job is reported exactly like a missing one.
    if job is None or job.owner != principal.owner_key:
        raise NotFound("No such stamping job.")
    return job


async def _read_order(request: Request, settings: StampingSettings) -> service.StampingOrder:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType("Send the PDF as multipart/form-data with a `file` part.")
    declared = request.headers.get("content-length")
    # Refuse early, before reading the body, when the client says it is too large.
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 64 * 1024:
        raise PayloadTooLarge(f"Documents are limited to {settings.max_upload_bytes:,} bytes.")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except (MultiPartException, StarletteHTTPException) as exc:
        raise MalformedMultipart(f"The multipart body cannot be parsed: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidForm("The `file` part (the PDF) is missing.")
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise PayloadTooLarge(f"Documents are limited to {settings.max_upload_bytes:,} bytes.")
        document = await upload.read(settings.max_upload_bytes + 1)
        if len(document) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"Documents are limited to {settings.max_upload_bytes:,} bytes.")
        # PDF readers accept the header anywhere in the first kilobyte.
        if _PDF_MAGIC not in document[:1024]:
            raise NotPdf("The file is not a PDF (no %PDF- header).")
        return service.StampingOrder(
            document=document,
            serial=_serial_field(form),
            page=_page_field(form),
            box=_box_fields(form),
            callback_url=_callback_field(form),
        )
    finally:
        await form.close()


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidForm(f"`{name}` must be a plain form field, not a file.")
    value = value.strip()
    return value or None


def _serial_field(form: FormData) -> str | None:
    serial = _text(form, "serial")
    if serial is not None and not _SERIAL.match(serial):
        raise InvalidForm("`serial` must be 22 upper-case letters and digits.")
    return serial


def _page_field(form: FormData) -> int | None:
    page = _text(form, "page")
    if page is None:
        return None
    if not page.isdigit() or int(page) < 1 or int(page) > 1_000_000:
        raise InvalidForm("`page` must be a whole number from 1 (the first page).")
    return int(page)


def _number(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidForm(f"`{name}` must be a number of points.") from None
    if not math.isfinite(value) or abs(value) > 100_000:
        raise InvalidForm(f"`{name}` must be a finite number of points.")
    return value


def _box_fields(form: FormData) -> StampBox | None:
    combined = _text(form, "box")
    names = ("llx", "lly", "urx", "ury")
    parts = {name: _text(form, name) for name in names}
    given = [name for name in names if parts[name] is not None]
    if combined is not None:
        if given:
            raise InvalidForm("Give either `box` or `llx`, `lly`, `urx`, `ury`, not both.")
        pieces = combined.split(",")
        if len(pieces) != 4:
            raise InvalidForm("`box` must be four numbers: llx,lly,urx,ury.")
        values = [_number("box", piece.strip()) for piece in pieces]
    elif given:
        if len(given) != 4:
            raise InvalidForm("Give all four of `llx`, `lly`, `urx`, `ury` (points), or none.")
        values = [_number(name, parts[name] or "") for name in names]
    else:
        return None
    box = StampBox.normalised(*values)
    if box.width <= 0 or box.height <= 0:
        raise InvalidForm("The box must have a width and a height.")
    return box


def _callback_field(form: FormData) -> str | None:
    url = _text(form, "callback_url")
    if url is None:
        return None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or len(url) > 2000:
        raise InvalidForm("`callback_url` must be an absolute http(s) URL.")
    return url


@router.post(
    "/api/v1/stampings",
    status_code=202,
    response_model=StampingOut,
    summary="Stamp a PDF",
    openapi_extra=STAMPING_FORM_SCHEMA,
    responses={
        409: {"description": "`serial_unavailable` or `no_unused_serial`"},
        413: {"description": "`payload_too_large`"},
        503: {"description": "`backlog_full`: more documents wait than are stamped soon"},
        415: {"description": "`not_pdf` or `unsupported_media_type`"},
        422: {
            "description": "`invalid_pdf`, `encrypted_pdf`, `certified_no_changes`, "
            "`certified_pdf`, `no_pages`, `page_out_of_range`, `box_off_page`, `box_too_small`, "
            "`already_stamped`, `too_complex`"
        },
    },
)
async def create_stamping(
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Accept a PDF for stamping with one of the caller's unused serials.

    Returns 202 at once with the job and a `Location`; a signing worker stamps it shortly.
    """
    settings = _settings(request)
    order = await _read_order(request, settings)
    state = request.app.state
    # After the body was read (the connection stays usable), before the costly checks.
    guard: BacklogGuard = state.backlog_guard
    guard.check()
    accepted = await service.accept(
        sessionmaker=state.sessionmaker,
        blobs=state.blobs,
        inventory=state.inventory,
        give_backs=state.give_backs,
        principal=principal,
        order=order,
        idempotency_key=idempotency_key,
        requests_topic=settings.requests_topic,
        render=lambda job: render_job(job, settings.public_base_url),
        cpu_budget_seconds=settings.document_cpu_budget_seconds,
        republish_after_seconds=guard.republish_after(
            settings.republish_after_seconds, settings.republish_max_interval_seconds
        ),
    )
    state.relay.wake()
    if accepted.job is not None:
        guard.accepted()
    if accepted.replay is not None:
        body, status, replayed = accepted.replay.body, accepted.replay.status_code, True
    else:
        assert accepted.job is not None  # noqa: S101 - accept returns one of the two
        body, status, replayed = render_job(accepted.job, settings.public_base_url), 202, False
    headers = {"Location": f"/api/v1/stampings/{body['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=status, headers=headers)


@router.get("/api/v1/stampings/{job_id}", response_model=StampingOut, summary="A stamping job")
async def get_stamping(
    job_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The job's status: `queued`, `signing`, `done` (with `document_url`) or `failed`."""
    job = await _owned_job(request, principal, job_id)
    return render_job(job, _settings(request).public_base_url)


@router.get(
    "/api/v1/stampings/{job_id}/document",
    summary="The stamped PDF",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}}, 409: {"description": "`not_ready`"}},
)
async def get_stamped_document(
    job_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Response:
    """Download the stamped document once the job is `done`."""
    job = await _owned_job(request, principal, job_id)
    if job.status is not JobStatus.done or job.output_key is None:
        if job.status is JobStatus.failed:
            raise Conflict(f"The job failed: {job.error_detail}", extra={"error": job.error_code})
        raise NotReady(f"The job is {job.status.value}; poll its status.")
    blobs: BlobStore = request.app.state.blobs
    try:
        document = await blobs.get(job.output_key)
    except BlobNotFound as exc:
        raise NotFound("The stamped document is no longer stored.") from exc
    return Response(
        document,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="stamped-{job.serial}.pdf"',
            "ETag": f'"{job.output_sha256}"',
        },
    )
