"""The outbox relay: publishes committed outbox rows to Kafka, then deletes them.

Several replicas may run: each batch is locked with SKIP LOCKED, so a row is published by one
relay at a time (and at least once overall). The relay also re-publishes jobs that have not
finished when they are due (`republish_at`: when a lease ran out, when a backoff ended, or after
waits that double while a job is queued), so a broker that lost its memory loses no accepted
job; `replay_after_broker_loss` also re-announces results the broker may have lost.
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
from services.stamping.messages import StampingFinished, StampingRequested
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
        republish_max_interval: float = 300.0,
        batch: int = 200,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.requests_topic = requests_topic
        self.interval = interval
        self.republish_after = timedelta(seconds=republish_after)
        self.republish_max_interval = timedelta(
            seconds=max(republish_max_interval, republish_after)
        )
        # Due jobs are found by index: look often, so that backoffs end when they should.
        self.sweep_every = min(1.0, republish_after / 2)
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
                if loop.time() - self._last_sweep > self.sweep_every:
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
        """Publish one batch; returns how many messages went out. The batch is deleted from
        the outbox in the transaction that publishes it, committed once the broker has
        acknowledged every message."""
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
            await asyncio.gather(*futures)
        for message in messages:
            PUBLISHED.labels(message.topic).inc()
        return len(messages)

    async def forget_idempotency_keys(self, retention: timedelta = timedelta(hours=24)) -> int:
        """Drop upload Idempotency-Keys older than `retention` (clients retry in minutes)."""
        async with transaction(self.sessionmaker) as session:
            return await idempotency.purge_older_than(session, datetime.now(UTC) - retention)

    async def requeue_stale_jobs(self) -> int:
        """Queue another request for unfinished jobs that are due (see `republish_at`)."""
        async with transaction(self.sessionmaker) as session:
            jobs = await repo.due_unfinished_jobs(session, limit=self.batch)
            await repo.add_outbox_many(
                session,
                [
                    repo.Announcement(
                        self.requests_topic,
                        str(job.id),
                        StampingRequested(job_id=job.id).model_dump(mode="json"),
                    )
                    for job in jobs
                ],
            )
            if jobs:
                await repo.postpone_republish(
                    session,
                    [job.id for job in jobs],
                    first=self.republish_after,
                    longest=self.republish_max_interval,
                )
        if jobs:
            REPUBLISHED.inc(len(jobs))
            log.info("stale_jobs_requeued", count=len(jobs))
            self.wake()
        return len(jobs)


async def replay_after_broker_loss(
    sessionmaker: async_sessionmaker[AsyncSession], *, results_topic: str, finished_since: datetime
) -> tuple[int, int]:
    """After the broker lost its messages (an in-memory broker restarted): make every queued job
    due for publishing now, and queue again the result of every job finished since
    `finished_since` (its consumers apply results idempotently, per job). Returns both counts;
    the relays publish them."""
    async with transaction(sessionmaker) as session:
        queued = await repo.republish_queued_now(session)
        finished = await repo.jobs_finished_since(session, finished_since)
        await repo.add_outbox_many(
            session,
            [
                repo.Announcement(
                    results_topic, str(job.id), StampingFinished.of(job).model_dump(mode="json")
                )
                for job in finished
            ],
        )
    log.warning("broker_loss_replayed", queued_jobs=queued, results=len(finished))
    return queued, len(finished)
