"""What became of given jobs, for inventory: it asks about serials whose job has not reported
back through `stamping.results` for a while (a result lost with the broker, say)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.platform.db import SessionDep
from services.platform.identity import CallingService
from services.stamping.models import JobStatus, StampingJob

MAX_JOBS_PER_QUESTION = 500

internal = APIRouter(prefix="/internal/v1", include_in_schema=False)


class OutcomesQuestion(BaseModel):
    job_ids: list[uuid.UUID] = Field(max_length=MAX_JOBS_PER_QUESTION)


class JobOutcome(BaseModel):
    job_id: uuid.UUID
    serial: str
    status: JobStatus


class Outcomes(BaseModel):
    jobs: list[JobOutcome] = Field(description="The jobs that exist; unknown ids are left out.")


@internal.post("/jobs/outcomes", response_model=Outcomes)
async def job_outcomes(
    question: OutcomesQuestion, session: SessionDep, _: CallingService
) -> Outcomes:
    rows = await session.execute(
        select(StampingJob.id, StampingJob.serial, StampingJob.status).where(
            StampingJob.id.in_(question.job_ids)
        )
    )
    return Outcomes(
        jobs=[JobOutcome(job_id=row.id, serial=row.serial, status=row.status) for row in rows]
    )
