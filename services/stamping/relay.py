"""The outbox relay: publishes committed outbox rows to Kafka, then deletes them.

Several replicas may run: each batch is locked with SKIP LOCKED, so a row is published by one
relay at a time (and at least once overall). The relay also re-publishes jobs that have not
finished for a while, so a broker that lost its memory loses no accepted job.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import structlog
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.platform.db import transaction
from services.stamping import repository as repo
from services.stamping.messages import StampingRequested
from services.stamping.service import idempotency

log = structlog.get_logger(__name__)

PUBLISHED = Counter(
    "meterai_stamping_outbox_published_total", "Outbox messages published to Kafka", ["topic"]
)
REPUBLISHED = Counter(
    "meterai_stamping_jobs_republished_total", "Unfinished jobs published to Kafka again"
)


class OutboxRelay:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        requests_topic: str,
        interval: float,
        republish_after: float,
        batch: int = 200,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.requests_topic = requests_topic
        self.interval = interval
        self.republish_after = republish_after
        self.batch = batch
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_sweep = 0.0
        self._next_purge = 0.0

    def wake(self) -> None:
        """Publish soon: a new message was committed in this process."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Relay until stopped; a failing broker or database only delays, never drops."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                sent = await self.publish_pending()
                if loop.time() - self._last_sweep > min(10.0, self.republish_after / 2):
                    self._last_sweep = loop.time()
                    await self.requeue_stale_jobs()
                if loop.time() >= self._next_purge:
                    self._next_purge = loop.time() + 3600
                    await self.forget_idempotency_keys()
            except Exception as exc:  # noqa: BLE001 - keep relaying after outages
                log.warning("outbox_relay_error", error=repr(exc))
                sent = 0
                await asyncio.sleep(1.0)
            if sent < self.batch:
                self._wake.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval * 10)

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many messages went out."""
        async with transaction(self.sessionmaker) as session:
            messages = await repo.take_outbox_batch(session, self.batch)
            if not messages:
                return 0
            futures = [
                await self.producer.send(
                    message.topic,
                    key=message.key.encode(),
                    value=json.dumps(message.payload).encode(),
                    headers=[(name, value.encode()) for name, value in message.headers.items()],
                )
                for message in messages
            ]
            # Delete only after the broker acknowledged every message of the batch.
            await asyncio.gather(*futures)
            await repo.delete_outbox(session, [message.id for message in messages])
        for message in messages:
            PUBLISHED.labels(message.topic).inc()
        return len(messages)

    async def forget_idempotency_keys(self, retention: timedelta = timedelta(hours=24)) -> int:
        """Drop upload Idempotency-Keys older than `retention` (clients retry in minutes)."""
        async with transaction(self.sessionmaker) as session:
            return await idempotency.purge_older_than(session, datetime.now(UTC) - retention)

    async def requeue_stale_jobs(self) -> int:
        """Queue another request for unfinished jobs nobody has worked on for a while."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.republish_after)
        async with transaction(self.sessionmaker) as session:
            jobs = await repo.stale_unfinished_jobs(session, older_than=cutoff, limit=self.batch)
            for job in jobs:
                await repo.add_outbox(
                    session,
                    self.requests_topic,
                    str(job.id),
                    StampingRequested(job_id=job.id).model_dump(mode="json"),
                )
            if jobs:
                await repo.touch_jobs(session, [job.id for job in jobs])
        if jobs:
            REPUBLISHED.inc(len(jobs))
            log.info("stale_jobs_requeued", count=len(jobs))
            self.wake()
        return len(jobs)
