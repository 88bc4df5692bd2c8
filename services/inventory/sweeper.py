"""Releases reservations whose payment did not arrive in time (safe in every replica)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.inventory import service
from services.inventory.repository import idempotency
from services.platform.db import transaction

log = structlog.get_logger(__name__)

EXPIRED = Counter(
    "meterai_inventory_reservations_expired_total", "Unpaid reservations released to the pool"
)


async def sweep_once(sessionmaker: async_sessionmaker[AsyncSession], batch: int = 500) -> int:
    """Release every expired reservation now; how many were released."""
    total = 0
    while True:
        async with transaction(sessionmaker) as session:
            released = await service.expire_reservations(session, limit=batch)
        total += released
        if released < batch:
            break
    if total:
        EXPIRED.inc(total)
        log.info("reservations_expired", count=total)
    return total


async def forget_idempotency_keys(
    sessionmaker: async_sessionmaker[AsyncSession], retention: timedelta
) -> int:
    """Drop Idempotency-Keys older than `retention`: clients retry within minutes."""
    async with transaction(sessionmaker) as session:
        purged = await idempotency.purge_older_than(session, datetime.now(UTC) - retention)
    if purged:
        log.info("idempotency_keys_purged", count=purged)
    return purged


async def run_sweeper(
    sessionmaker: async_sessionmaker[AsyncSession],
    interval: float,
    *,
    key_retention: timedelta = timedelta(hours=24),
) -> None:
    """Sweep every `interval` seconds (and old idempotency keys hourly) until cancelled;
    outages only delay it."""
    loop = asyncio.get_running_loop()
    next_purge = loop.time()
    while True:
        try:
            await sweep_once(sessionmaker)
            if loop.time() >= next_purge:
                await forget_idempotency_keys(sessionmaker, key_retention)
                next_purge = loop.time() + 3600
        except Exception as exc:  # noqa: BLE001 - try again next round
            log.warning("sweep_failed", error=repr(exc))
        await asyncio.sleep(interval)
