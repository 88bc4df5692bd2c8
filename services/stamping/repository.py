"""All stamping SQL: jobs, their leases and retries, the outbox, callbacks and dead letters."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    Interval,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.platform.db import DriverStatement
from services.stamping.models import (
    UNFINISHED,
    CallbackDelivery,
    CallbackState,
    DeadLetter,
    JobStatus,
    OutboxMessage,
    StampingJob,
    WorkerHeartbeat,
)


@dataclass(frozen=True)
class Announcement:
    """A message for the outbox: published once the transaction that queued it commits."""

    topic: str
    key: str
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


async def add_outbox(
    session: AsyncSession,
    topic: str,
    key: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    """Queue a message to be published once the surrounding transaction commits."""
    await add_outbox_many(session, [Announcement(topic, key, payload, headers or {})])


async def add_outbox_many(session: AsyncSession, announcements: Sequence[Announcement]) -> None:
    """Queue several messages at once (one statement, however many)."""
    if announcements:
        await session.execute(
            insert(OutboxMessage),
            [
                {
                    "topic": item.topic,
                    "key": item.key,
                    "payload": item.payload,
                    "headers": item.headers,
                }
                for item in announcements
            ],
        )


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    key: str
    payload: dict[str, Any]
    headers: dict[str, str]


async def take_outbox_batch(session: AsyncSession, limit: int) -> list[OutboxRow]:
    """Delete and return the oldest unsent messages, in order, in one statement: rows that
    come back should the transaction roll back (the broker refused them). Locked rows are
    skipped, so relay replicas never publish the same batch."""
    oldest = (
        select(OutboxMessage.id)
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = await session.execute(
        delete(OutboxMessage)
        .where(OutboxMessage.id.in_(oldest.scalar_subquery()))
        .returning(
            OutboxMessage.id,
            OutboxMessage.topic,
            OutboxMessage.key,
            OutboxMessage.payload,
            OutboxMessage.headers,
        )
        .execution_options(synchronize_session=False)
    )
    return sorted((OutboxRow(*row) for row in rows), key=lambda row: row.id)


async def add_job(session: AsyncSession, **columns: Any) -> StampingJob:
    """Insert a job and return it as stored, server defaults included (one statement: no
    flush followed by a refresh)."""
    row = await session.execute(insert(StampingJob).values(**columns).returning(StampingJob))
    return row.scalar_one()


async def get_job(session: AsyncSession, job_id: uuid.UUID) -> StampingJob | None:
    return await session.get(StampingJob, job_id)


async def lease_job(
    connection: Any, job_id: uuid.UUID, *, worker_id: str, lease: timedelta
) -> StampingJob | None:
    """Take a queued job, or one whose previous worker's lease ran out; None if neither, if
    the job is waiting out a backoff, or if another transaction holds its row (a worker is
    recording it right now: waiting would stall this worker behind one that may be frozen;
    the row lock is what keeps another attempt from recording it meanwhile, so should that
    recording not commit, the job is published again when its lease has ended).
    The attempt number (`attempts`) fences the outcome.

    `connection`: asyncpg's (`services.platform.db.driver_connection`), as for every
    statement a signing worker runs per job; the job returned is in no session (see
    `_job_of`)."""
    statement = _lease_statement()
    row = await connection.fetchrow(
        statement.sql,
        *statement.arguments({"job_id": job_id, "worker_id": worker_id, "lease": lease}),
    )
    return _job_of(row)


def _job_of(row: Any) -> StampingJob | None:
    """The job an asyncpg record holds all the columns of, as an object in no session, to
    read. A signing worker's two statements per job (the lease and the outcome) run on the
    driver's connection (see `DriverStatement`): through an ORM session, each cost 1.7-3.1 ms
    of the worker's CPU on the benchmark machine, out of 15-20 ms per job."""
    if row is None:
        return None
    return StampingJob(**{**row, "status": JobStatus(row["status"])})


@cache
def _lease_statement() -> DriverStatement:
    # Built and compiled once: a worker leases every job.
    now = func.now()
    lease = bindparam("lease", type_=Interval())
    unlocked = (
        select(StampingJob.id)
        .where(StampingJob.id == bindparam("job_id"))
        .with_for_update(skip_locked=True)
    )
    leased = (
        update(StampingJob)
        .where(
            StampingJob.id.in_(unlocked.scalar_subquery()),
            or_(
                StampingJob.status == JobStatus.queued,
                (StampingJob.status == JobStatus.signing) & (StampingJob.lease_expires_at < now),
            ),
            or_(StampingJob.not_before.is_(None), StampingJob.not_before <= now),
        )
        .values(
            status=JobStatus.signing,
            attempts=StampingJob.attempts + 1,
            lease_owner=bindparam("worker_id"),
            lease_expires_at=now + lease,
            not_before=None,
            # Should this worker die, the job is published again as soon as the lease ends.
            republish_at=now + lease,
            started_at=func.coalesce(StampingJob.started_at, now),
            updated_at=now,
        )
        .returning(*StampingJob.__table__.c)
    )
    return DriverStatement.compile(leased)


async def finish_job(
    connection: Any,
    job_id: uuid.UUID,
    *,
    worker_id: str,
    attempt: int,
    status: JobStatus,
    announce: Announcement,
    output_key: str | None = None,
    output_sha256: str | None = None,
    error_code: str | None = None,
    error_detail: str | None = None,
    last_error: str | None = None,
) -> StampingJob | None:
    """Record the outcome and queue its announcement (an outbox row), in one statement, if
    this worker still holds the lease of attempt number `attempt`; None, and nothing queued,
    if it lost it. `last_error` None keeps the one recorded. The row stays locked until the
    transaction ends. `connection`: asyncpg's, in a transaction (as for `lease_job`); the
    job returned is in no session."""
    statement = _finish_statement()
    row = await connection.fetchrow(
        statement.sql,
        *statement.arguments(
            {
                "job_id": job_id,
                "worker_id": worker_id,
                "attempt": attempt,
                "status": status,
                "output_key": output_key,
                "output_sha256": output_sha256,
                "error_code": error_code,
                "error_detail": error_detail,
                "last_error": last_error,
                "topic": announce.topic,
                "key": announce.key,
                # JSON goes to the driver as text (see DriverStatement).
                "payload": json.dumps(announce.payload),
                "headers": json.dumps(announce.headers),
            }
        ),
    )
    return _job_of(row)


@cache
def _finish_statement() -> DriverStatement:
    # Built and compiled once, as the lease is.
    finished = (
        update(StampingJob)
        .where(*_holding(bindparam("job_id"), bindparam("worker_id"), bindparam("attempt")))
        .values(
            status=bindparam("status"),
            output_key=bindparam("output_key"),
            output_sha256=bindparam("output_sha256"),
            error_code=bindparam("error_code"),
            error_detail=bindparam("error_detail"),
            last_error=func.coalesce(
                bindparam("last_error", type_=StampingJob.last_error.type),
                StampingJob.last_error,
            ),
            lease_owner=None,
            lease_expires_at=None,
            finished_at=func.now(),
            updated_at=func.now(),
        )
        .returning(*StampingJob.__table__.c)
        .cte("finished")
    )
    announced = (
        insert(OutboxMessage)
        .from_select(
            ["topic", "key", "payload", "headers"],
            select(
                bindparam("topic", type_=OutboxMessage.topic.type),
                bindparam("key", type_=OutboxMessage.key.type),
                bindparam("payload", type_=OutboxMessage.payload.type),
                bindparam("headers", type_=OutboxMessage.headers.type),
            ).select_from(finished),
        )
        .cte("announced")
    )
    return DriverStatement.compile(select(finished).add_cte(announced))  # the job as recorded


async def retry_later(
    session: AsyncSession,
    job_id: uuid.UUID,
    *,
    worker_id: str,
    attempt: int,
    error: str,
    delay: timedelta,
) -> StampingJob | None:
    """Give back a job whose attempt failed through no fault of its document: queued again,
    not to be tried before `delay` has passed, when the relay publishes it again. None if
    this worker no longer held the lease."""
    now = func.now()
    row = await session.execute(
        update(StampingJob)
        .where(*_holding(job_id, worker_id, attempt))
        .values(
            status=JobStatus.queued,
            lease_owner=None,
            lease_expires_at=None,
            last_error=error,
            not_before=now + delay,
            republish_at=now + delay,
            updated_at=now,
        )
        .returning(StampingJob)
    )
    return row.scalar_one_or_none()


def _holding(job_id: Any, worker_id: Any, attempt: Any) -> tuple[Any, ...]:
    # The attempt number fences a worker that lost its lease and got it back under the same
    # id (a restarted process keeps its name), or that was paused past its lease.
    return (
        StampingJob.id == job_id,
        StampingJob.status == JobStatus.signing,
        StampingJob.lease_owner == worker_id,
        StampingJob.attempts == attempt,
    )


async def add_dead_letter(connection: Any, job: StampingJob) -> None:
    """Record a job given up on (already `failed` with its reason), once; on asyncpg's
    connection, in the transaction that recorded the outcome (see `finish_job`)."""
    statement = _dead_letter_statement()
    await connection.execute(
        statement.sql,
        *statement.arguments(
            {
                "job_id": job.id,
                "owner": job.owner,
                "serial": job.serial,
                "reason": job.error_code or "unknown",
                "detail": job.error_detail or "",
                "attempts": job.attempts,
                "last_error": job.last_error,
            }
        ),
    )


@cache
def _dead_letter_statement() -> DriverStatement:
    columns = ("job_id", "owner", "serial", "reason", "detail", "attempts", "last_error")
    added = pg_insert(DeadLetter).values(
        {column: bindparam(column, type_=DeadLetter.__table__.c[column].type) for column in columns}
    )
    return DriverStatement.compile(added.on_conflict_do_nothing(index_elements=[DeadLetter.job_id]))


async def due_unfinished_jobs(session: AsyncSession, *, limit: int) -> list[StampingJob]:
    """Unfinished jobs due for publishing again (`republish_at`) whose lease, if any, ran out;
    locked so that relay replicas do not both take them."""
    rows = await session.execute(
        select(StampingJob)
        .where(
            StampingJob.status.in_(UNFINISHED),
            StampingJob.republish_at <= func.now(),
            or_(
                StampingJob.lease_expires_at.is_(None),
                StampingJob.lease_expires_at < func.now(),
            ),
        )
        .order_by(StampingJob.republish_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(rows.scalars().all())


async def postpone_republish(
    session: AsyncSession, job_ids: Sequence[uuid.UUID], *, first: timedelta, longest: timedelta
) -> None:
    """Next publication of these jobs after waiting as long as they already waited since they
    were queued or leased (at least `first`, at most `longest`): the waits double."""
    waited = func.now() - StampingJob.updated_at
    wait = func.least(func.greatest(literal(first), waited), literal(longest))
    await session.execute(
        update(StampingJob)
        .where(StampingJob.id.in_(job_ids))
        .values(republish_at=func.now() + wait)
    )


async def republish_queued_now(session: AsyncSession) -> int:
    """Make every queued job that is not backing off due for publishing at once."""
    result = await session.execute(
        update(StampingJob)
        .where(
            StampingJob.status == JobStatus.queued,
            StampingJob.republish_at > func.now(),
            or_(StampingJob.not_before.is_(None), StampingJob.not_before <= func.now()),
        )
        .values(republish_at=func.now())
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def jobs_finished_since(session: AsyncSession, since: datetime) -> list[StampingJob]:
    rows = await session.execute(
        select(StampingJob)
        .where(StampingJob.status.in_((JobStatus.done, JobStatus.failed)))
        .where(StampingJob.finished_at >= since)
        .order_by(StampingJob.finished_at)
    )
    return list(rows.scalars().all())


async def beat(session: AsyncSession, worker_id: str, jobs_done: int) -> None:
    """Record that a worker is alive."""
    statement = pg_insert(WorkerHeartbeat).values(worker_id=worker_id, jobs_done=jobs_done)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[WorkerHeartbeat.worker_id],
            set_={"seen_at": func.now(), "jobs_done": statement.excluded.jobs_done},
        )
    )


async def live_workers(session: AsyncSession, since: datetime) -> int:
    """How many workers reported since `since`."""
    count = await session.scalar(
        select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.seen_at >= since)
    )
    return int(count or 0)


async def jobs_for_serials(
    session: AsyncSession, serials: Collection[str]
) -> dict[str, StampingJob]:
    """The job that affixed (or is affixing) each of `serials`: a serial's one job that did
    not fail. Serials without one are left out."""
    rows = await session.execute(
        select(StampingJob).where(
            StampingJob.serial.in_(serials), StampingJob.status != JobStatus.failed
        )
    )
    return {job.serial: job for job in rows.scalars().all()}


async def claim_due_callbacks(
    session: AsyncSession, *, limit: int, claim_for: timedelta
) -> list[tuple[CallbackDelivery, StampingJob]]:
    """Take up to `limit` due callbacks (counting the attempt) with their jobs.

    A claimed callback is due again after `claim_for`: if its sender dies mid-attempt, another
    attempt follows then. SKIP LOCKED keeps several senders from claiming the same row.
    """
    due = (
        select(CallbackDelivery.id)
        .where(
            CallbackDelivery.state == CallbackState.pending,
            CallbackDelivery.next_attempt_at <= func.now(),
        )
        .order_by(CallbackDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = await session.execute(
        update(CallbackDelivery)
        .where(CallbackDelivery.id.in_(due))
        .values(
            attempts=CallbackDelivery.attempts + 1,
            last_attempt_at=func.now(),
            next_attempt_at=func.now() + claim_for,
        )
        .returning(CallbackDelivery)
        .execution_options(synchronize_session=False)
    )
    callbacks = list(rows.scalars().all())
    if not callbacks:
        return []
    jobs = await session.execute(
        select(StampingJob).where(StampingJob.id.in_([c.job_id for c in callbacks]))
    )
    by_id = {job.id: job for job in jobs.scalars().all()}
    return [(callback, by_id[callback.job_id]) for callback in callbacks]


async def record_callback_attempt(
    session: AsyncSession,
    callback_id: uuid.UUID,
    *,
    attempt: int,
    state: CallbackState,
    status_code: int | None,
    error: str | None,
    retry_at: datetime | None = None,
) -> bool:
    """Record how attempt number `attempt` went: `delivered`, `given_up`, or `pending` again
    until `retry_at`. False if a later claim owns the callback now (nothing recorded)."""
    finished = state is not CallbackState.pending
    row = await session.execute(
        update(CallbackDelivery)
        .where(CallbackDelivery.id == callback_id, CallbackDelivery.attempts == attempt)
        .values(
            state=state,
            last_status_code=status_code,
            last_error=error,
            next_attempt_at=retry_at if retry_at is not None else CallbackDelivery.next_attempt_at,
            finished_at=func.now() if finished else None,
        )
        .returning(CallbackDelivery.id)
        .execution_options(synchronize_session=False)
    )
    return row.scalar_one_or_none() is not None


async def callback_for_job(session: AsyncSession, job_id: uuid.UUID) -> CallbackDelivery | None:
    callback: CallbackDelivery | None = await session.scalar(
        select(CallbackDelivery).where(CallbackDelivery.job_id == job_id)
    )
    return callback


async def forget_delivered_callbacks(session: AsyncSession, *, older_than: datetime) -> int:
    """Drop callbacks delivered before `older_than` (given-up ones stay for operators)."""
    result = await session.execute(
        delete(CallbackDelivery).where(
            CallbackDelivery.state == CallbackState.delivered,
            CallbackDelivery.finished_at < older_than,
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
