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

log = structlog.get_logger(__name__)


class StampingResult(BaseModel):
    """The fields inventory reads from a `stamping.results` message (owned by stamping)."""

    job_id: uuid.UUID
    serial: str
    status: Literal["done", "failed"]


class StampingResultHandler:
    """Applies a whole fetch of results in one transaction: the finished jobs' serials marked
    used together (see `service.mark_used_batch`), the failed jobs' given back one by one."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def __call__(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        done: list[tuple[uuid.UUID, str]] = []
        failed: list[StampingResult] = []
        for record in records:
            try:
                result = StampingResult.model_validate_json(record.value or b"")
            except ValidationError as exc:
                # A malformed message will never parse; skipping it must not block the partition.
                log.error("bad_stamping_result", offset=record.offset, error=str(exc))
                continue
            if result.status == "done":
                done.append((result.job_id, result.serial))
            else:
                failed.append(result)
        async with transaction(self.sessionmaker) as session:
            counts = await service.mark_used_batch(session, done)
            for result in failed:
                released = await service.release_serial(session, result.job_id)
                log.info("serial_released", serial=released, job_id=str(result.job_id))
        if done:
            log.info("serials_used", **counts)
