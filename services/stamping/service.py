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
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from services.platform.blobs import BlobStore
from services.platform.db import transaction
from services.platform.errors import MeteraiError, ServiceUnavailable
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
    give_backs: GiveBacks,
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
    publishes it again after `republish_after_seconds` (see `BacklogGuard.republish_after`).
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
            job = await repo.add_job(
                session,
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
        if claim_asked:
            await give_backs.give_back(job_id, attempt, commit_unknown=committing)
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


class _NotSettled(Exception):
    """The give-back could not be done or decided yet (inventory or the database is away)."""


class GiveBacks:
    """Gives back the serial claimed by an upload that failed after claiming it.

    The first try is made before the upload's error is answered. If inventory cannot be
    reached, or the upload failed in its commit and the database cannot say yet whether the job
    was stored (a commit can succeed and its answer be lost: then the job runs, and its serial
    must stay claimed), it is tried again in the background for up to `patience` seconds. A
    claim still open after that is found by inventory's check of old claims, and a retry of the
    upload with the same Idempotency-Key takes it over at any time (see `job_id_for`).
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        inventory: InventoryClient,
        *,
        patience: float = 60.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.inventory = inventory
        self.patience = patience
        self._pending: set[asyncio.Task[None]] = set()

    async def give_back(
        self, job_id: uuid.UUID, attempt: uuid.UUID, *, commit_unknown: bool
    ) -> None:
        try:
            await self._try(job_id, attempt, commit_unknown)
        except MeteraiError as exc:  # inventory refused it: nothing to try again
            log.error("serial_release_refused", job_id=str(job_id), error=exc.detail)
        except _NotSettled as exc:
            log.warning("serial_release_postponed", job_id=str(job_id), error=str(exc))
            task = asyncio.create_task(self._keep_trying(job_id, attempt, commit_unknown))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Stop retrying (inventory's claim check settles what is left)."""
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _keep_trying(self, job_id: uuid.UUID, attempt: uuid.UUID, unknown: bool) -> None:
        try:
            async for trying in AsyncRetrying(
                stop=stop_after_delay(self.patience),
                wait=wait_exponential(multiplier=0.25, max=5),
                retry=retry_if_exception_type(_NotSettled),
                reraise=True,
            ):
                with trying:
                    await self._try(job_id, attempt, unknown)
        except _NotSettled as exc:
            # The claim stays with a job that does not exist, until a retry of the upload
            # takes it over or inventory finds it orphaned.
            log.error("serial_release_failed", job_id=str(job_id), error=str(exc))

    async def _try(self, job_id: uuid.UUID, attempt: uuid.UUID, commit_unknown: bool) -> None:
        if commit_unknown:
            try:
                async with self.sessionmaker() as session:
                    if await session.get(StampingJob, job_id) is not None:
                        return  # committed after all: the job runs with its serial
            except Exception as exc:
                raise _NotSettled(f"whether the job was stored is unknown: {exc!r}") from exc
        try:
            await self.inventory.release_serial(job_id, attempt=attempt)
        except ServiceUnavailable as exc:
            raise _NotSettled(exc.detail) from exc


def _trace_headers() -> dict[str, str]:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return {"request_id": request_id} if isinstance(request_id, str) else {}
