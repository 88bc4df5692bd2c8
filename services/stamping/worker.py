"""Signing workers: take jobs from `stamping.requests`, stamp and sign, record the result.

Exactly once in effect: a job is leased in PostgreSQL before any work, so a redelivered message
for a finished or leased job does nothing; the output is stored under a key derived from the job
id, while the transaction that records the job done holds its row, so only the attempt that
records the job writes its output; the result and its outbox message commit together. An
attempt that fails through no fault of the document is retried after a growing backoff; after
`worker_max_attempts` the job is `failed` and recorded in `dead_letters`. Run with
`python -m services.platform.serve services.stamping.worker:create_worker_app --port N`
(one process per core).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta

import structlog
from aiokafka import ConsumerRecord
from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.platform.app import create_service_app
from services.platform.blobs import BlobNotFound, BlobStore, blob_store_from_url
from services.platform.db import (
    check_database,
    create_engine,
    create_sessionmaker,
    driver_connection,
    transaction,
)
from services.platform.health import HealthChecks
from services.platform.kafka import ConsumerLoop
from services.platform.stopping import on_stop_requested
from services.stamping import repository as repo
from services.stamping.config import StampingSettings
from services.stamping.messages import StampingFinished, StampingRequested
from services.stamping.models import JobStatus, StampingJob
from services.stamping.service import output_key
from services.stamping.signing import DocumentRejected, StampBox, StampRequest, StampSigner

log = structlog.get_logger(__name__)

JOBS = Counter("meterai_signer_jobs_total", "Jobs a signing worker finished", ["outcome"])
DEAD_LETTERS = Counter(
    "meterai_signer_dead_letters_total",
    "Jobs given up on through no fault of their document (see the dead_letters table)",
    ["reason"],
)
SIGNING_SECONDS = Histogram(
    "meterai_signer_signing_duration_seconds",
    "Time to stamp and sign one document",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def load_signer(settings: StampingSettings) -> StampSigner:
    """The signing key and certificates named by the settings (PEM, or PKCS#12 by suffix)."""
    passphrase = (
        settings.signing_key_passphrase.encode() if settings.signing_key_passphrase else None
    )
    tsa_url, tsa_timeout = settings.tsa_url, settings.tsa_timeout_seconds
    if settings.signing_key_path.suffix.lower() in (".p12", ".pfx"):
        return StampSigner.from_pkcs12(
            settings.signing_key_path, passphrase, tsa_url=tsa_url, tsa_timeout_seconds=tsa_timeout
        )
    return StampSigner.from_pem_files(
        settings.signing_key_path,
        settings.signing_cert_path,
        settings.signing_chain_paths,
        passphrase,
        tsa_url=tsa_url,
        tsa_timeout_seconds=tsa_timeout,
    )


class SigningWorker:
    """Handles one `stamping.requests` message per call; the consumer loop keeps
    `worker_concurrency` of them running, so the next job is leased and read while one signs."""

    def __init__(
        self,
        *,
        settings: StampingSettings,
        engines: WorkerEngines,
        blobs: BlobStore,
        signer: StampSigner,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.engines = engines
        self.sessionmaker = create_sessionmaker(engines.outcomes)
        self.blobs = blobs
        self.signer = signer
        self.worker_id = worker_id
        self.lease = timedelta(seconds=settings.worker_lease_seconds)
        self.jobs_done = 0
        # pyHanko work is CPU-bound: one signature at a time, I/O of other jobs overlaps it.
        # With a timestamp authority a signature also waits on the network: let them overlap.
        self._signing = asyncio.Semaphore(settings.worker_concurrency if settings.tsa_url else 1)

    async def __call__(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            request = StampingRequested.model_validate_json(record.value or b"")
        except ValidationError as exc:
            log.error("bad_stamping_request", offset=record.offset, error=str(exc))
            JOBS.labels("bad_message").inc()
            return
        request_id = dict(record.headers or []).get("request_id")
        structlog.contextvars.bind_contextvars(
            job_id=str(request.job_id),
            request_id=request_id.decode() if request_id else None,
        )
        try:
            await self.process(request.job_id)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "request_id")

    async def process(self, job_id: uuid.UUID) -> None:
        """Lease, stamp, store and record one job; a no-op if it is finished, leased or
        waiting out a backoff."""
        # The lease is one statement: its own transaction, without BEGIN and COMMIT round trips.
        async with driver_connection(self.engines.leases) as connection:
            job = await repo.lease_job(
                connection, job_id, worker_id=self.worker_id, lease=self.lease
            )
        if job is None:
            log.info("job_skipped", reason="finished, leased, or backing off")
            JOBS.labels("skipped").inc()
            return
        if job.attempts > self.settings.worker_max_attempts:
            # The last attempts ended without a word: their workers died on this job.
            await self._give_up(
                job,
                "too_many_attempts",
                f"Gave up after {job.attempts - 1} attempts; the last error was "
                f"{job.last_error or 'not recorded (the worker stopped mid-job)'}.",
            )
            return
        try:
            document = await self.blobs.get(job.input_key)
        except BlobNotFound:
            await self._give_up(job, "input_missing", "The uploaded document is gone.")
            return
        request = StampRequest(
            serial=job.serial,
            verify_url=f"{self.settings.public_base_url}/verify/{job.serial}",
            page=job.page + 1,
            box=StampBox(job.llx, job.lly, job.urx, job.ury),
        )
        started = time.perf_counter()
        try:
            async with self._signing:
                signed = await asyncio.to_thread(
                    self.signer.stamp,
                    document,
                    request,
                    cpu_budget_seconds=self.settings.document_cpu_budget_seconds,
                )
        except DocumentRejected as rejection:
            await self._finish_failed(job, rejection.code, rejection.detail)
            return
        except Exception as exc:  # noqa: BLE001 - never die on one document
            log.exception("signing_error", error=repr(exc), attempt=job.attempts)
            await self._retry_later(job, exc)
            return
        SIGNING_SECONDS.observe(time.perf_counter() - started)
        try:
            finished = await self._finish(
                job,
                JobStatus.done,
                output=signed,
                output_key=output_key(job.id),
                output_sha256=hashlib.sha256(signed).hexdigest(),
            )
        except Exception as exc:  # noqa: BLE001 - storage failed; the database may still work
            log.exception("storing_error", error=repr(exc), attempt=job.attempts)
            await self._retry_later(job, exc)
            return
        if finished is None:
            log.warning("lease_lost", detail="another attempt owns the job now")
            JOBS.labels("lease_lost").inc()
            return
        self.jobs_done += 1
        JOBS.labels("done").inc()
        log.info("job_done", serial=job.serial, ms=round((time.perf_counter() - started) * 1000))

    async def _retry_later(self, job: StampingJob, exc: Exception) -> None:
        """Queue the job again after a backoff, or give up once it had all its attempts."""
        error = f"{type(exc).__name__}: {exc}"[:2000]
        if job.attempts >= self.settings.worker_max_attempts:
            await self._give_up(
                job,
                "too_many_attempts",
                f"Gave up after {job.attempts} attempts; the last error was {error}.",
                last_error=error,
            )
            return
        delay = min(
            self.settings.worker_retry_backoff_seconds * 2 ** (job.attempts - 1),
            self.settings.worker_retry_backoff_max_seconds,
        )
        async with transaction(self.sessionmaker) as session:
            queued = await repo.retry_later(
                session,
                job.id,
                worker_id=self.worker_id,
                attempt=job.attempts,
                error=error,
                delay=timedelta(seconds=delay),
            )
        JOBS.labels("retry" if queued else "lease_lost").inc()
        log.warning("job_retry_later", attempt=job.attempts, retry_in_s=delay, queued=bool(queued))

    async def _finish_failed(self, job: StampingJob, code: str, detail: str) -> None:
        await self._finish(job, JobStatus.failed, error_code=code, error_detail=detail)
        JOBS.labels("failed").inc()
        log.info("job_failed", code=code, detail=detail)

    async def _give_up(
        self, job: StampingJob, code: str, detail: str, last_error: str | None = None
    ) -> None:
        """Fail the job through no fault of its document, with a dead letter for operators."""
        finished = await self._finish(
            job,
            JobStatus.failed,
            dead_letter=True,
            last_error=last_error,
            error_code=code,
            error_detail=detail,
        )
        if finished is None:
            return
        JOBS.labels("failed").inc()
        DEAD_LETTERS.labels(code).inc()
        log.error("job_dead_lettered", code=code, detail=detail, attempts=job.attempts)

    async def _finish(
        self,
        job: StampingJob,
        status: JobStatus,
        *,
        output: bytes | None = None,
        dead_letter: bool = False,
        last_error: str | None = None,
        **outcome: str,
    ) -> StampingJob | None:
        """Record the outcome and its `stamping.results` message in one transaction, if this
        worker still holds the lease of this attempt (None otherwise)."""
        message = StampingFinished.outcome(
            job,
            status,
            sha256=outcome.get("output_sha256"),
            error_code=outcome.get("error_code"),
            error_detail=outcome.get("error_detail"),
        )
        announcement = repo.Announcement(
            self.settings.results_topic, str(job.id), message.model_dump(mode="json")
        )
        async with driver_connection(self.engines.outcomes, begin=True) as connection:
            finished = await repo.finish_job(
                connection,
                job.id,
                worker_id=self.worker_id,
                attempt=job.attempts,
                status=status,
                announce=announcement,
                last_error=last_error,
                **outcome,
            )
            if finished is not None:
                if output is not None and finished.output_key is not None:
                    # While this transaction holds the job's row, no other attempt can record
                    # the job, nor lease it: the stored output is the one recorded. Should the
                    # commit fail, the next attempt overwrites it.
                    await self.blobs.put(finished.output_key, output)
                if dead_letter:
                    await repo.add_dead_letter(connection, finished)
        return finished

    async def heartbeat(self, every: float = 5.0) -> None:
        """Tell the database this worker is alive, until cancelled."""
        while True:
            try:
                async with transaction(self.sessionmaker) as session:
                    await repo.beat(session, self.worker_id, self.jobs_done)
            except Exception as exc:  # noqa: BLE001 - the next beat may succeed
                log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(every)


@dataclass(frozen=True)
class WorkerEngines:
    """A worker's two pools: one for outcomes (and retries, dead letters, heartbeats), the
    other for leases, whose commits do not wait for the disk (PostgreSQL's
    `synchronous_commit=off`; a lease is one of every job's two commits). Should the server
    crash before it flushes a lease (within a fraction of a second), the job is back as it
    was, queued or leased by the attempt before, and is published again; the attempt that
    lost its lease cannot record an outcome, which requires the lease of its attempt number,
    and stores no output before it records one. Outcomes, with their output and message,
    commit durably."""

    outcomes: AsyncEngine
    leases: AsyncEngine

    @classmethod
    def create(cls, settings: StampingSettings) -> WorkerEngines:
        return cls(
            outcomes=create_engine(settings.database_url, pool_size=4),
            leases=create_engine(
                settings.database_url,
                pool_size=max(2, settings.worker_concurrency),
                server_settings={"synchronous_commit": "off"},
            ),
        )

    async def dispose(self) -> None:
        await self.outcomes.dispose()
        await self.leases.dispose()


def create_worker_app(settings: StampingSettings | None = None) -> FastAPI:
    """A signing worker: a consumer loop in the lifespan, plus health and metrics over HTTP."""
    settings = settings or StampingSettings()
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        signer = load_signer(settings)
        engines = WorkerEngines.create(settings)
        worker = SigningWorker(
            settings=settings,
            engines=engines,
            blobs=blob_store_from_url(settings.blob_store_url),
            signer=signer,
            worker_id=worker_id,
        )
        loop = ConsumerLoop(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topics=[settings.requests_topic],
            group_id=settings.worker_group,
            client_id=worker_id,
            handler=worker,
            concurrency=settings.worker_concurrency,
            grace_seconds=settings.worker_grace_seconds,
        )
        await loop.start_in_background()
        # On SIGTERM stop taking jobs at once; the server reaches the shutdown below later.
        forget_stop = on_stop_requested(loop.request_stop)
        beat_task = asyncio.create_task(worker.heartbeat(), name="heartbeat")
        health: HealthChecks = app.state.health
        health.add("database", lambda: check_database(engines.outcomes))
        health.add("consumer", loop.check_running)
        log.info("signing_worker_started", worker_id=worker_id)
        try:
            yield
        finally:
            # SIGTERM: stop fetching, let in-flight jobs finish within the grace period,
            # commit offsets, leave the group.
            forget_stop()
            await loop.stop_background()
            beat_task.cancel()
            with suppress(asyncio.CancelledError):
                await beat_task
            await engines.dispose()
            log.info("signing_worker_stopped", worker_id=worker_id, jobs_done=worker.jobs_done)

    return create_service_app(
        service="signer",
        title="Meterai signing worker",
        settings=settings,
        lifespan=lifespan,
        routers=[],
        openapi_url=None,
    )
