"""Messages on the topics stamping owns. Consumers elsewhere mirror the fields they read."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel

from services.stamping.models import JobStatus, StampingJob


class StampingRequested(BaseModel):
    """`stamping.requests`, keyed by job id: a job is ready for a signing worker."""

    job_id: uuid.UUID


class StampingFinished(BaseModel):
    """`stamping.results`, keyed by job id: the final status of a job."""

    job_id: uuid.UUID
    serial: str
    owner: str
    status: Literal["done", "failed"]
    sha256: str | None = None
    error_code: str | None = None
    error_detail: str | None = None

    @classmethod
    def of(cls, job: StampingJob) -> StampingFinished:
        """The message announcing a finished job."""
        return cls.outcome(
            job,
            job.status,
            sha256=job.output_sha256,
            error_code=job.error_code,
            error_detail=job.error_detail,
        )

    @classmethod
    def outcome(
        cls,
        job: StampingJob,
        status: JobStatus,
        *,
        sha256: str | None = None,
        error_code: str | None = None,
        error_detail: str | None = None,
    ) -> StampingFinished:
        """The message announcing that `job` ends with `status` (before it is recorded)."""
        return cls(
            job_id=job.id,
            serial=job.serial,
            owner=job.owner,
            status="done" if status is JobStatus.done else "failed",
            sha256=sha256,
            error_code=error_code,
            error_detail=error_detail,
        )
