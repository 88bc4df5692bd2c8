"""How far behind the signing workers are: the waiting room slows admission when this grows."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from prometheus_client import Gauge
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from services.platform.db import SessionDep
from services.platform.identity import CallingService
from services.stamping.models import UNFINISHED, StampingJob

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
async def backlog(session: SessionDep, _: CallingService) -> Backlog:
    """One indexed aggregate over the unfinished jobs (asked about once a second)."""
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
