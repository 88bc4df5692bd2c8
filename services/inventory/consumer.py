"""Inventory's reaction to stamping results: a finished job uses its serial, a failed one
gives it back. Delivery is at least once; both effects are idempotent per job."""

from __future__ import annotations

import uuid
from typing import Literal

import structlog
from aiokafka import ConsumerRecord
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.inventory import service
from services.platform.db import transaction
from services.platform.errors import MeteraiError

log = structlog.get_logger(__name__)


class StampingResult(BaseModel):
    """The fields inventory reads from a `stamping.results` message (owned by stamping)."""

    job_id: uuid.UUID
    serial: str
    status: Literal["done", "failed"]


class StampingResultHandler:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def __call__(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            result = StampingResult.model_validate_json(record.value or b"")
        except ValidationError as exc:
            # A malformed message will never parse; skipping it must not block the partition.
            log.error("bad_stamping_result", offset=record.offset, error=str(exc))
            return
        structlog.contextvars.bind_contextvars(job_id=str(result.job_id))
        try:
            async with transaction(self.sessionmaker) as session:
                if result.status == "done":
                    first = await service.mark_used(session, result.job_id, result.serial)
                    log.info("serial_used", serial=result.serial, first_time=first)
                else:
                    released = await service.release_serial(session, result.job_id)
                    log.info("serial_released", serial=released)
        except MeteraiError as exc:
            # Inconsistent with what inventory knows: keep going, but loudly (reconcile finds it).
            log.error("stamping_result_rejected", serial=result.serial, error=exc.detail)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")
