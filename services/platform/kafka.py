"""aiokafka helpers: topic creation, a producer with safe defaults, and a consumer loop that
commits only after processing (at-least-once; handlers must be idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IncompatibleBrokerVersion,
    KafkaError,
    TopicAlreadyExistsError,
)
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

CONSUMER_LAG = Gauge(
    "meterai_kafka_consumer_lag_messages",
    "Messages on a partition not yet fetched by its consumer (high watermark minus position), "
    "updated after every batch",
    ["group", "topic", "partition"],
)

MessageHandler = Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]]
# Takes a whole fetch (every partition's records, in offset order per partition) and returns
# once all of them are applied; raising means none is to be counted done.
BatchHandler = Callable[[list[ConsumerRecord[bytes, bytes]]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class TopicSpec:
    """A topic the owning service needs; `partitions` bounds how many consumers can share it."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


async def ensure_topics(
    bootstrap_servers: str, topics: Iterable[TopicSpec], *, replace_smaller: bool = False
) -> None:
    """Create missing topics and grow partitions that are too few; idempotent.

    Some Kafka-protocol brokers (the embedded one) cannot grow a topic, and create any topic a
    client asks about with their default partition count. With `replace_smaller`, a topic with
    too few partitions that cannot be grown is deleted and created again: only for a broker that
    has just come back empty, where a client raced the topic creation and whatever the topic holds
    is published again anyway. Otherwise keys would go to partitions the consumers never see.
    """
    wanted = {spec.name: spec for spec in topics}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="meterai-admin")
    await admin.start()
    try:
        for _ in range(5):
            current = await _partition_counts(admin, wanted)
            await _create_missing(admin, [s for n, s in wanted.items() if n not in current])
            smaller = {
                name: spec.partitions
                for name, spec in wanted.items()
                if 0 < current.get(name, spec.partitions) < spec.partitions
            }
            if not smaller:
                return
            try:
                await admin.create_partitions(
                    {name: NewPartitions(total_count=count) for name, count in smaller.items()}
                )
                return
            except IncompatibleBrokerVersion:
                if not replace_smaller:
                    # More consumers than partitions then sit idle: worth a loud warning.
                    log.warning("cannot_grow_partitions", topics=sorted(smaller))
                    return
            log.warning("replacing_topics_with_too_few_partitions", topics=smaller)
            await admin.delete_topics(sorted(smaller))
            await _create_missing(admin, [wanted[name] for name in smaller])
        log.error("topics_still_have_too_few_partitions", topics=sorted(wanted))
    finally:
        await admin.close()


async def _partition_counts(
    admin: AIOKafkaAdminClient, wanted: dict[str, TopicSpec]
) -> dict[str, int]:
    # List before describing: describing a missing topic makes brokers with topic
    # auto-creation create it with their default partition count.
    present = set(await admin.list_topics()) & set(wanted)
    return {
        meta["topic"]: len(meta.get("partitions", []))
        for meta in (await admin.describe_topics(sorted(present)) if present else [])
        if meta.get("error_code", 0) == 0
    }


async def _create_missing(admin: AIOKafkaAdminClient, missing: list[TopicSpec]) -> None:
    if not missing:
        return
    try:
        await admin.create_topics(
            [
                NewTopic(
                    name=spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    topic_configs=spec.config,
                )
                for spec in missing
            ]
        )
    except TopicAlreadyExistsError:
        pass  # another replica won the race


def create_producer(bootstrap_servers: str, *, client_id: str) -> AIOKafkaProducer:
    """A producer that waits for all in-sync replicas.

    Idempotence stays off: the embedded test broker rejects it, and every consumer here is
    idempotent anyway (the truth lives in PostgreSQL, not in the log).
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        linger_ms=2,
        request_timeout_ms=15_000,
        enable_idempotence=False,
    )


async def check_kafka(producer: AIOKafkaProducer, topic: str) -> None:
    """Health check: the broker answers a metadata request for `topic`."""
    partitions = await producer.partitions_for(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic} has no partitions")


@dataclass
class _Progress:
    """A partition's messages in the one-message loop: the offsets running and one past the
    highest that finished. Offsets below the lowest running one (or below `done`, with none
    running) are committable. `epoch` numbers the times the partition was fetched again
    after a failure: messages started before then no longer count."""

    running: set[int] = field(default_factory=set)
    done: int = -1
    epoch: int = 0


@dataclass(frozen=True)
class _Running:
    record: ConsumerRecord[bytes, bytes]
    tp: TopicPartition
    assignment: int
    epoch: int


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.loop.commit_processed()

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.loop.new_assignment()
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned),
        )


class ConsumerLoop:
    """Process each message with `handler`, at most `concurrency` at once, fetching the next
    one as soon as one finishes: a message never waits for a slow one fetched with it, and a
    worker never idles between batches. With a `batch_handler` instead, each fetch (up to
    `max_batch` messages) is handed over whole (one database transaction for the lot, say),
    and it is retried whole if the handler raises.

    Offsets are committed only below the first message of a partition whose handler has not
    returned, so a crash at any point leads to redelivery, never to loss; with a `handler`,
    commits go out every `commit_every_seconds` while messages finish, and after a failure.
    `request_stop()` stops fetching and starting messages (fetched ones that have not started
    are left to the partition's next owner), lets in-flight ones finish within
    `grace_seconds`, commits and closes the consumer.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topics: Sequence[str],
        group_id: str,
        client_id: str,
        handler: MessageHandler | None = None,
        batch_handler: BatchHandler | None = None,
        concurrency: int = 1,
        max_batch: int = 16,
        grace_seconds: float = 20.0,
        retry_backoff_seconds: float = 1.0,
        commit_every_seconds: float = 1.0,
        close_timeout: float = 0.5,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give either a handler or a batch handler")
        self.topics = list(topics)
        self.handler = handler
        self.batch_handler = batch_handler
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.grace_seconds = grace_seconds
        self.retry_backoff_seconds = retry_backoff_seconds
        self.commit_every_seconds = commit_every_seconds
        self.close_timeout = close_timeout
        options: dict[str, Any] = {
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": max_batch,
            # 6 s is the smallest session Kafka brokers accept by default; joining a group
            # takes about half of it on the embedded broker.
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
            # Signing a large document can take a while; stay in the group meanwhile.
            "max_poll_interval_ms": 300_000,
            # ...but a rebalance must not wait minutes for a member that stopped answering.
            "rebalance_timeout_ms": 30_000,
        }
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            client_id=client_id,
            **{**options, **(consumer_options or {})},
        )
        self.group_id = group_id
        self._processed: dict[TopicPartition, int] = {}
        # One message at a time: what is running and done per partition (see `_Progress`).
        self._progress: dict[TopicPartition, _Progress] = {}
        # Next offset to fetch per partition, as far as this loop has seen (for the lag gauge).
        self._position: dict[TopicPartition, int] = {}
        # Numbers the assignments; offsets processed under an earlier one are never committed.
        self._assignment = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and join the consumer group."""
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=_CommitOnRevoke(self))

    async def start_in_background(self) -> None:
        """Join the group and run the loop as a task of this event loop (an app's lifespan)."""
        await self.start()
        self._task = asyncio.create_task(self.run(), name=f"consume-{'-'.join(self.topics)}")

    async def check_running(self) -> None:
        """Health check: the background loop is still running."""
        if self._task is None or self._task.done():
            raise RuntimeError(f"the consumer of {', '.join(self.topics)} stopped")

    async def stop_background(self) -> None:
        """Stop the background loop: in-flight messages get the grace period, then commit."""
        if self._task is None:
            return
        self.request_stop()
        done, _ = await asyncio.wait({self._task}, timeout=self.grace_seconds + 10)
        if not done:
            self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def request_stop(self) -> None:
        """Stop fetching new batches (safe to call from a signal handler)."""
        self._stopping.set()

    async def run(self) -> None:
        """Process until `request_stop()`; always commits what finished and stops the consumer."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            if self.batch_handler is not None:
                await self._run_batches(stopping, self.batch_handler)
            else:
                await self._run_messages(stopping)
        finally:
            stopping.cancel()
            try:
                await self.commit_processed()
            finally:
                await self._close()

    async def _run_batches(self, stopping: asyncio.Future[Any], handler: BatchHandler) -> None:
        while not self._stopping.is_set():
            # A fetch can block for seconds (joining the group); stopping must not wait.
            fetch = asyncio.ensure_future(
                self.consumer.getmany(timeout_ms=500, max_records=self.max_batch)
            )
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                return
            batches = fetch.result()
            self._record_lag(batches)
            if not batches:
                continue
            failed = await self._process_whole(batches, stopping, self._assignment, handler)
            await self.commit_processed()
            if failed and not self._stopping.is_set():
                await asyncio.sleep(self.retry_backoff_seconds)

    async def _run_messages(self, stopping: asyncio.Future[Any]) -> None:
        """The one-message handler's loop: keep `concurrency` messages in hand, fetching as
        many as have finished, and commit as they finish (see `_Progress`)."""
        clock = asyncio.get_running_loop()
        running: dict[asyncio.Task[bool], _Running] = {}
        fetch: asyncio.Future[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] | None
        fetch = None
        resume_at = next_commit = 0.0
        uncommitted = False  # a message finished since the last commit
        try:
            while not self._stopping.is_set():
                free = min(self.concurrency - len(running), self.max_batch)
                if fetch is None and free > 0 and clock.time() >= resume_at:
                    # A fetch can block for seconds (joining the group); stopping must not wait.
                    fetch = asyncio.ensure_future(
                        self.consumer.getmany(timeout_ms=500, max_records=free)
                    )
                waiting: set[asyncio.Future[Any]] = {stopping, *running}
                timeout = None
                if fetch is not None:
                    waiting.add(fetch)
                elif free > 0:
                    # A slot is free but a retry's backoff holds the fetch: until it ends.
                    timeout = max(resume_at - clock.time(), 0.0)
                await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                failed = False
                for task in [task for task in running if task.done()]:
                    failed |= self._settle(task, running.pop(task))
                    uncommitted = True
                if failed:
                    # An outage (the handler raised): let it pass before fetching again.
                    resume_at = clock.time() + self.retry_backoff_seconds
                if fetch is not None and fetch.done():
                    batches = fetch.result()
                    fetch = None
                    self._record_lag(batches)
                    for records in batches.values():
                        for record in records:
                            task = asyncio.create_task(self._handle(record))
                            running[task] = self._started(record)
                if failed or (uncommitted and clock.time() >= next_commit):
                    await self.commit_processed()
                    uncommitted = False
                    next_commit = clock.time() + self.commit_every_seconds
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
            if running:
                # Stopping: messages in flight get the grace period to finish.
                await asyncio.wait(running, timeout=self.grace_seconds)
            for task in running:
                # Past the grace period: abandon; uncommitted messages are redelivered elsewhere.
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            for task, started in running.items():
                self._settle(task, started)

    def _started(self, record: ConsumerRecord[bytes, bytes]) -> _Running:
        """Count a message as running (not committable) on its partition."""
        tp = TopicPartition(record.topic, record.partition)
        progress = self._progress.setdefault(tp, _Progress())
        progress.running.add(record.offset)
        return _Running(record, tp, self._assignment, progress.epoch)

    def _settle(self, task: asyncio.Task[bool], started: _Running) -> bool:
        """Account for a message whose handler ended; True if it failed (to be fetched
        again, with every later message of its partition)."""
        progress = self._progress.get(started.tp)
        if (
            started.assignment != self._assignment
            or progress is None
            or progress.epoch != started.epoch
        ):
            return False  # reassigned or fetched again meanwhile: its offset no longer counts
        offset = started.record.offset
        handled = not task.cancelled() and task.exception() is None
        if handled and not task.result():
            return False  # stopping came before its turn: left uncommitted
        if handled:
            progress.running.discard(offset)
            progress.done = max(progress.done, offset + 1)
            committable = min(progress.running, default=progress.done)
            self._processed[started.tp] = committable
            return False
        if not task.cancelled():
            log.error(
                "message_handler_failed",
                topic=started.tp.topic,
                partition=started.tp.partition,
                offset=offset,
                error=repr(task.exception()),
            )
        if self._stopping.is_set() and task.cancelled():
            return False  # abandoned past the grace period: redelivered to the next owner
        # Later messages of the partition that are running now finish, or not, uncounted:
        # they are delivered again after this one (idempotent handlers absorb that).
        self._progress[started.tp] = _Progress(epoch=progress.epoch + 1, done=offset)
        self._fetch_again(started.tp, offset)
        return True

    def _record_lag(
        self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        """Set the lag gauge of the assigned partitions from what the fetch responses said
        (the high watermark comes with every fetch: no request to the broker here)."""
        for tp, records in batches.items():
            if records:
                self._position[tp] = records[-1].offset + 1
        assigned = self.consumer.assignment()
        for tp in set(self._position) - assigned:
            # Revoked: its new owner reports it now.
            del self._position[tp]
            with suppress(KeyError):
                CONSUMER_LAG.remove(self.group_id, tp.topic, str(tp.partition))
        for tp in assigned:
            highwater = self.consumer.highwater(tp)
            position = self._position.get(tp)
            if highwater is None or position is None:
                continue
            CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )

    async def _close(self) -> None:
        """Leave the group; if a join is still in flight, do not wait for the broker to answer.

        aiokafka's `stop()` first awaits an unfinished JoinGroup, which the broker may hold for
        seconds (up to the rebalance timeout). Nothing was assigned yet, so nothing is lost by
        closing the connections instead; the broker expires the member after its session.
        """
        try:
            await asyncio.wait_for(self.consumer.stop(), timeout=self.close_timeout)
        except TimeoutError:
            log.warning("consumer_closed_while_joining", topics=self.topics)
            # No public way to abort a join; these are aiokafka 0.14's own close steps.
            await self.consumer._fetcher.close()
            await self.consumer._client.close()

    def _fetch_again(self, tp: TopicPartition, offset: int) -> None:
        """Commit no further than `offset` on `tp` and fetch from it again."""
        self._processed[tp] = offset
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)
            self._position[tp] = offset

    async def _process_whole(
        self,
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        stopping: asyncio.Future[Any],
        assignment: int,
        handler: BatchHandler,
    ) -> bool:
        """`_process` for a batch handler: the fetch is done as a whole, or not at all."""
        batches = {tp: records for tp, records in batches.items() if records}
        task = asyncio.create_task(
            handler([record for records in batches.values() for record in records])
        )
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=self.grace_seconds)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        failed = task.cancelled() or task.exception() is not None
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "message_batch_failed",
                topics=self.topics,
                messages=sum(len(records) for records in batches.values()),
                error=repr(task.exception()),
            )
        if assignment != self._assignment:
            return False  # reassigned meanwhile: the new owners start from committed offsets
        for tp, records in batches.items():
            if not failed:
                self._processed[tp] = max(self._processed.get(tp, -1), records[-1].offset + 1)
                continue
            # The whole batch again (what was applied of it is applied again, harmlessly).
            self._fetch_again(tp, records[0].offset)
        return failed

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Handle one message; False if stopping began before its turn came (it is left
        uncommitted, for the partition's next owner)."""
        if self._stopping.is_set():
            return False
        # The handler owns retries and failure bookkeeping for bad messages; an exception
        # escaping it is an outage (database, storage) and the message must be retried.
        assert self.handler is not None  # noqa: S101 - the one-by-one mode has one
        await self.handler(record)
        return True

    def new_assignment(self) -> None:
        """A new assignment: offsets of messages fetched under the previous one are dropped,
        not committed (their messages may be redelivered; handlers are idempotent). They may
        belong to a log that is gone: after an in-memory broker restarted empty, committing
        them would make the next owner of a partition skip the new log's first messages."""
        self._assignment += 1
        self._processed.clear()
        self._progress.clear()

    def _member(self) -> bool:
        # aiokafka has no public accessor: a coordinator that lost our membership (the group
        # forgot us) is back at the "no generation" id until the group is joined again.
        coordinator = self.consumer._coordinator
        return coordinator is not None and coordinator.generation >= 0

    async def commit_processed(self) -> None:
        """Commit `offset + 1` of every processed message for still-assigned partitions, if
        this consumer is still a member of the group that assigned them.

        Without a membership, brokers take a commit as one of a consumer outside any group;
        after the embedded broker restarted empty, such a commit would record offsets of a
        log that is gone, and the partition's next owner would skip the new log's first
        messages. The offsets are dropped instead: their messages are delivered again.
        """
        if not self._member():
            self._processed.clear()
            return
        assigned = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in self._processed.items() if tp in assigned}
        self._processed.clear()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partition away; the new owner re-processes (idempotently).
            log.warning("commit_failed", error=repr(exc))
