"""How far behind the signing workers are: the waiting room slows admission when this grows,
and uploads are refused while it is at its bound (`BacklogGuard`)."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime

import structlog
from fastapi import APIRouter, Request
from prometheus_client import Gauge
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.platform.db import transaction
from services.platform.errors import ServiceUnavailable
from services.platform.identity import CallingService
from services.stamping.models import UNFINISHED, StampingJob

log = structlog.get_logger(__name__)

# Set whenever the backlog is asked for: the waiting room does so about once a second.
BACKLOG_JOBS = Gauge("meterai_stamping_backlog_jobs", "Stamping jobs accepted and not yet finished")
BACKLOG_OLDEST = Gauge(
    "meterai_stamping_backlog_oldest_seconds", "Age of the oldest unfinished stamping job"
)

internal = APIRouter(prefix="/internal/v1", include_in_schema=False)


class Backlog(BaseModel):
    unfinished: int = Field(description="Jobs accepted and not yet done or failed.")
    oldest_seconds: float = Field(description="Age of the oldest unfinished job (0 if none).")


@internal.get("/backlog", response_model=Backlog)
async def backlog(request: Request, _: CallingService) -> Backlog:
    """Asked about once a second by each waiting-room replica: answered from the guard's last
    read (at most `backlog_refresh_seconds` old), not with another aggregate per question."""
    guard: BacklogGuard = request.app.state.backlog_guard
    return guard.current()


async def read_backlog(session: AsyncSession) -> Backlog:
    """One indexed aggregate over the unfinished jobs."""
    count, oldest = (
        await session.execute(
            select(func.count(), func.min(StampingJob.created_at)).where(
                StampingJob.status.in_(UNFINISHED)
            )
        )
    ).one()
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    BACKLOG_JOBS.set(int(count))
    BACKLOG_OLDEST.set(max(0.0, age))
    return Backlog(unfinished=int(count), oldest_seconds=max(0.0, age))


class BacklogFull(ServiceUnavailable):
    code = "backlog_full"
    title = "Stamping is at capacity"


class BacklogGuard:
    """Bounds the backlog: while `limit` jobs or more are unfinished, uploads are refused with
    503 `backlog_full` and a Retry-After from the rate at which jobs are finishing, so that what
    is accepted is stamped in minutes, not hours, and the rest comes back when there is room.

    The count is read every `refresh_seconds` (one aggregate for the whole process) plus what
    this process accepted since, so checking costs no I/O. Other replicas' uploads show up at
    the next read: the bound may be passed by what they accept within one interval.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        limit: int,
        refresh_seconds: float = 0.5,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.limit = limit
        self.refresh_seconds = refresh_seconds
        self.unfinished = 0
        self.oldest_seconds = 0.0
        self.accepted_since_read = 0
        # Jobs finished per second, smoothed; None until two reads were made.
        self.finish_rate: float | None = None
        self._read_at: float | None = None

    def check(self) -> None:
        """Raise `BacklogFull` if an upload now would pass the bound."""
        if self.limit <= 0:
            return
        waiting = self.unfinished + self.accepted_since_read
        if waiting < self.limit:
            return
        raise BacklogFull(
            f"{waiting:,} documents are waiting to be stamped, the most this service queues; "
            "send this one again after the Retry-After.",
            retry_after=self.retry_after(waiting),
        )

    def retry_after(self, waiting: int) -> int:
        """Seconds until a tenth of the bound has been worked off, at the measured rate."""
        to_finish = waiting - 0.9 * self.limit
        if not self.finish_rate:
            return 30
        return max(1, min(60, math.ceil(to_finish / self.finish_rate)))

    def accepted(self) -> None:
        self.accepted_since_read += 1

    def republish_after(self, shortest: float, longest: float) -> float:
        """Seconds after which a job accepted now is published again should it not have
        finished: twice what the jobs ahead of it take at the rate jobs are finishing (the
        rate swings), at least `shortest`, at most `longest`; `shortest` while no job is
        finishing or no rate was measured yet.

        Before, every job that waited `shortest` behind a long backlog was published again,
        and again after each doubling: a duplicate for the workers to skip and the broker to
        carry, several per job in a deadline rush, for a message that was not lost, just
        queued. Where the jobs ahead are being worked off, the wait they explain is expected.
        """
        rate = self.finish_rate
        if not rate:
            return shortest
        ahead = self.unfinished + self.accepted_since_read
        return max(shortest, min(longest, 2 * ahead / rate))

    def current(self) -> Backlog:
        """The backlog as last read, with what this process accepted since."""
        return Backlog(
            unfinished=self.unfinished + self.accepted_since_read,
            oldest_seconds=self.oldest_seconds,
        )

    async def read(self) -> None:
        accepted = self.accepted_since_read
        async with transaction(self.sessionmaker) as session:
            backlog = await read_backlog(session)
        now = time.monotonic()
        if self._read_at is not None and now > self._read_at:
            # Finished since the last read: what was there, plus what came in, minus what is.
            finished = max(0, self.unfinished + accepted - backlog.unfinished)
            rate = finished / (now - self._read_at)
            previous = self.finish_rate
            self.finish_rate = rate if previous is None else 0.8 * previous + 0.2 * rate
        self.unfinished, self.oldest_seconds = backlog.unfinished, backlog.oldest_seconds
        self._read_at = now
        self.accepted_since_read -= accepted

    async def run(self) -> None:
        """Read every `refresh_seconds` until cancelled; a failed read keeps the last count."""
        while True:
            try:
                await self.read()
            except Exception as exc:  # noqa: BLE001 - the next read may succeed
                log.warning("backlog_read_failed", error=repr(exc))
            await asyncio.sleep(self.refresh_seconds)
