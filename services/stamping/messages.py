"""Messages on the topics stamping owns. Consumers elsewhere mirror the fields they read."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel


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
