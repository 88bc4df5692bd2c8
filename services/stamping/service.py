"""Accepting a stamping job: validate the document, claim a serial, store, enqueue."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.platform.blobs import BlobStore
from services.platform.db import transaction
from services.platform.errors import MeteraiError
from services.platform.idempotency import IdempotencyStore, StoredResponse, request_fingerprint
from services.platform.identity import Principal
from services.platform.ids import new_id
from services.stamping import repository as repo
from services.stamping.inventory_client import InventoryClient, UpstreamProblem
from services.stamping.messages import StampingRequested
from services.stamping.models import JobStatus, StampingJob, idempotency_keys
from services.stamping.signing import DocumentRejected, StampBox, inspect_document

log = structlog.get_logger(__name__)
idempotency = IdempotencyStore(idempotency_keys)
# Namespace of the job ids derived from Idempotency-Keys (any fixed UUID; never change it).
_JOB_IDS = uuid.UUID("6f0c8f5e-2b7a-4c1d-9a3e-5d4b8c2f1e07")


class InvalidDocument(MeteraiError):
    """The upload cannot be stamped; `code` says why (`invalid_pdf`, `encrypted_pdf`...)."""

    status = 422
    title = "Document cannot be stamped"

    def __init__(self, rejection: DocumentRejected) -> None:
        super().__init__(rejection.detail)
        self.code = rejection.code


@dataclass(frozen=True)
class StampingOrder:
    """A validated upload: the document and where the stamp goes."""

    document: bytes
    serial: str | None
    page: int | None
    box: StampBox | None
    callback_url: str | None

    def fingerprint(self) -> str:
        """What makes two uploads the same request (for Idempotency-Key)."""
        box = self.box and (self.box.llx, self.box.lly, self.box.urx, self.box.ury)
        return request_fingerprint(
            "POST /api/v1/stampings",
            hashlib.sha256(self.document).hexdigest(),
            repr((self.serial, self.page, box, self.callback_url)),
        )


@dataclass(frozen=True)
class Accepted:
    job: StampingJob | None
    replay: StoredResponse | None


def input_key(job_id: uuid.UUID) -> str:
    return f"inputs/{job_id}.pdf"


def output_key(job_id: uuid.UUID) -> str:
    return f"outputs/{job_id}.pdf"


async def accept(
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    inventory: InventoryClient,
    principal: Principal,
    order: StampingOrder,
    idempotency_key: str | None,
    requests_topic: str,
    render: Any,
    cpu_budget_seconds: float,
    republish_after_seconds: float,
) -> Accepted:
    """Accept a job: one transaction writes the job, its outbox message and the idempotency
    record; the serial claimed at inventory is given back if anything after the claim fails.

    The document is inspected first (within `cpu_budget_seconds`), before any database work:
    a hostile upload costs bounded CPU and holds no connection. `render(job)` builds the
    response body recorded for idempotent replays. Should the job's message be lost, the relay
    publishes it again after `republish_after_seconds`.
    """
    try:
        page, box = await asyncio.to_thread(
            inspect_document,
            order.document,
            order.page,
            order.box,
            order.serial,
            cpu_budget_seconds=cpu_budget_seconds,
        )
    except DocumentRejected as rejection:
        raise InvalidDocument(rejection) from rejection
    job_id = job_id_for(principal.owner_key, idempotency_key, order)
    # Each attempt claims under its own name: a give-back of ours that arrives late releases
    # nothing a retry of the same upload has claimed since.
    attempt = new_id()
    # Whether inventory may hold a claim of ours (yes once asked, unless it refused), and
    # whether our transaction had reached its commit, whose outcome a failure leaves unknown.
    claim_asked = committing = False
    try:
        async with transaction(sessionmaker) as session:
            if idempotency_key is not None:
                replay = await idempotency.claim(
                    session,
                    owner=principal.owner_key,
                    key=idempotency_key,
                    request_hash=order.fingerprint(),
                )
                if replay is not None:
                    return Accepted(job=None, replay=replay)
                # The key was used for this very upload so long ago that its record is gone.
                earlier = await session.get(StampingJob, job_id)
                if earlier is not None:
                    return await _replay_job(session, principal, idempotency_key, earlier, render)
            claim_asked = True
            try:
                serial = await inventory.claim_serial(
                    owner=principal.owner_key, job_id=job_id, serial=order.serial, attempt=attempt
                )
            except UpstreamProblem:
                claim_asked = False  # refused: nothing was claimed
                raise
            await blobs.put(input_key(job_id), order.document)
            job = StampingJob(
                id=job_id,
                owner=principal.owner_key,
                serial=serial,
                status=JobStatus.queued,
                page=page,
                llx=box.llx,
                lly=box.lly,
                urx=box.urx,
                ury=box.ury,
                input_key=input_key(job_id),
                input_sha256=hashlib.sha256(order.document).hexdigest(),
                input_bytes=len(order.document),
                callback_url=order.callback_url,
                attempts=0,
                republish_at=func.now() + timedelta(seconds=republish_after_seconds),
            )
            session.add(job)
            await session.flush()
            await session.refresh(job)
            await repo.add_outbox(
                session,
                requests_topic,
                str(job_id),
                StampingRequested(job_id=job_id).model_dump(mode="json"),
                headers=_trace_headers(),
            )
            if idempotency_key is not None:
                await idempotency.record(
                    session,
                    owner=principal.owner_key,
                    key=idempotency_key,
                    status_code=202,
                    body=render(job),
                )
            committing = True
        log.info("stamping_accepted", job_id=str(job_id), serial=serial, bytes=len(order.document))
        return Accepted(job=job, replay=None)
    except BaseException:
        if claim_asked and not (committing and await _recorded(sessionmaker, job_id)):
            await _give_back(inventory, job_id, attempt)
        raise


def job_id_for(owner: str, idempotency_key: str | None, order: StampingOrder) -> uuid.UUID:
    """The id of the job an upload creates: a new one, or with an Idempotency-Key the same one
    on every retry of the upload, so that a retry takes over whatever claim an earlier attempt
    left at inventory (a failed attempt whose give-back did not reach inventory either) instead
    of finding the owner's stamp taken until the claim is found orphaned."""
    if idempotency_key is None:
        return new_id()
    return uuid.uuid5(_JOB_IDS, "\n".join((owner, idempotency_key, order.fingerprint())))


async def _replay_job(
    session: AsyncSession,
    principal: Principal,
    idempotency_key: str,
    job: StampingJob,
    render: Any,
) -> Accepted:
    body = render(job)
    await idempotency.record(
        session, owner=principal.owner_key, key=idempotency_key, status_code=202, body=body
    )
    return Accepted(job=None, replay=StoredResponse(status_code=202, body=body))


async def _recorded(sessionmaker: async_sessionmaker[AsyncSession], job_id: uuid.UUID) -> bool:
    """Whether the job was stored after all (a commit can succeed and its answer be lost);
    when that cannot be told, as if it were: its claim must not be given back while the job
    may run, and inventory asks about claims that stay open (see `inventory.claims`)."""
    try:
        async with sessionmaker() as session:
            return await session.get(StampingJob, job_id) is not None
    except Exception as exc:  # noqa: BLE001 - the database is what just failed
        log.warning("stamping_commit_unknown", job_id=str(job_id), error=repr(exc))
        return True


async def _give_back(inventory: InventoryClient, job_id: uuid.UUID, attempt: uuid.UUID) -> None:
    try:
        await inventory.release_serial(job_id, attempt=attempt)
    except MeteraiError as exc:
        # The claim stays with a job that does not exist: a retry of the upload (same key)
        # takes it over, and otherwise the orphaned claim is released after a while.
        log.error("serial_release_failed", job_id=str(job_id), error=exc.detail)


def _trace_headers() -> dict[str, str]:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return {"request_id": request_id} if isinstance(request_id, str) else {}
