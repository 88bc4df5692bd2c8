"""Stamping tables: jobs, the outbox that hands them to Kafka, callbacks to distributors, and
the jobs given up on."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import make_metadata
from services.platform.idempotency import idempotency_table


class Base(DeclarativeBase):
    metadata = make_metadata()


idempotency_keys = idempotency_table(Base.metadata)


class JobStatus(StrEnum):
    queued = "queued"
    signing = "signing"
    done = "done"
    failed = "failed"


UNFINISHED = (JobStatus.queued, JobStatus.signing)


class StampingJob(Base):
    __tablename__ = "stamping_jobs"
    __table_args__ = (
        # A serial is affixed by one job; a failed job gives it back for another try.
        Index(
            "uq_stamping_jobs_serial",
            "serial",
            unique=True,
            postgresql_where=text("status <> 'failed'"),
        ),
        # The relay's sweep for jobs the broker may have lost looks only at unfinished ones.
        Index(
            "ix_stamping_jobs_republish_at",
            "republish_at",
            postgresql_where=text("status IN ('queued', 'signing')"),
        ),
        Index("ix_stamping_jobs_owner_created", "owner", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    serial: Mapped[str] = mapped_column(String(22))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=True), default=JobStatus.queued
    )
    page: Mapped[int] = mapped_column(Integer, doc="0-based page index, resolved at upload")
    llx: Mapped[float] = mapped_column(Float)
    lly: Mapped[float] = mapped_column(Float)
    urx: Mapped[float] = mapped_column(Float)
    ury: Mapped[float] = mapped_column(Float)
    input_key: Mapped[str] = mapped_column(String(200))
    input_sha256: Mapped[str] = mapped_column(String(64))
    input_bytes: Mapped[int] = mapped_column(BigInteger)
    output_key: Mapped[str | None] = mapped_column(String(200))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    callback_url: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # What went wrong in the last attempt that failed without being the document's fault.
    last_error: Mapped[str | None] = mapped_column(Text)
    # No attempt before this time: the backoff after such a failure.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the relay publishes the job again if it is still unfinished (its message may be
    # lost, or its worker dead): the lease's end while leased, later and later otherwise.
    republish_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OutboxMessage(Base):
    """A Kafka message written in the same transaction as the change it announces."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeadLetter(Base):
    """A job the system gave up on, through no fault of its document (the job is `failed`
    with the same reason and its serial went back): for operators to look into and retry."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("stamping_jobs.id", ondelete="CASCADE"), unique=True
    )
    owner: Mapped[str] = mapped_column(String(100))
    serial: Mapped[str] = mapped_column(String(22))
    reason: Mapped[str] = mapped_column(String(64), doc="the job's error code")
    detail: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WorkerHeartbeat(Base):
    """Signing workers say they are alive, so health reports can count them."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    jobs_done: Mapped[int] = mapped_column(BigInteger, default=0)


class CallbackState(StrEnum):
    pending = "pending"
    delivered = "delivered"
    given_up = "given_up"


class CallbackDelivery(Base):
    """The final status of a job, owed to the job's `callback_url` (an outbox for webhooks).

    A row is added by the database trigger `stamping_jobs_enqueue_callback` (see the
    migration) in the same transaction that records a job `done` or `failed`, whichever code
    path records it; the sender in services.stamping.callbacks delivers it. `id` is the event
    id receivers deduplicate on; it stays the same on every attempt.
    """

    __tablename__ = "callbacks"
    __table_args__ = (
        # The sender's poll for due deliveries looks only at pending ones.
        Index(
            "ix_callbacks_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("stamping_jobs.id", ondelete="CASCADE"), unique=True
    )
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[CallbackState] = mapped_column(
        Enum(CallbackState, name="callback_state", native_enum=True),
        default=CallbackState.pending,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; while an attempt runs, when its claim expires.
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
