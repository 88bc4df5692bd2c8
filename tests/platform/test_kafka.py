"""Kafka helpers against the real broker: topics, headers, and the at-least-once consumer loop."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeAlias

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY

from services.platform.kafka import (
    ConsumerLoop,
    MessageHandler,
    TopicSpec,
    check_kafka,
    create_producer,
    ensure_topics,
)
from tests.harness import Infrastructure, wait_for

Record: TypeAlias = ConsumerRecord[bytes, bytes]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def bootstrap(infra: Infrastructure) -> str:
    return infra.kafka.bootstrap_servers


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {meta["topic"]: len(meta["partitions"]) for meta in described}


async def produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes]]) -> None:
    """Send `(partition, value)` pairs in order and wait for every acknowledgement."""
    producer = create_producer(bootstrap, client_id="platform-tests")
    await producer.start()
    try:
        for partition, value in messages:
            await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, partitions: list[TopicPartition]) -> list[int]:
    """The group's committed offsets, read without joining the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [await consumer.committed(tp) for tp in partitions]
    finally:
        await consumer.stop()


async def read_as_group(
    bootstrap: str, group: str, partitions: list[TopicPartition]
) -> list[Record]:
    """What a new consumer of `group` reads from each partition, up to its current end.

    Partitions are assigned directly, so the consumer starts at the group's committed offsets
    without waiting for a group rebalance.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[Record] = []
        async with asyncio.timeout(10):
            while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        return sorted(records, key=lambda record: (record.partition, record.offset))
    finally:
        await consumer.stop()


class Running:
    """A ConsumerLoop running in a task, stopped and awaited on exit."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await self.loop.start()
        self.task = asyncio.create_task(self.loop.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.loop.request_stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=30)


def consumer_loop(
    bootstrap: str, topic: str, group: str, handler: MessageHandler, **options: Any
) -> ConsumerLoop:
    return ConsumerLoop(
        bootstrap_servers=bootstrap,
        topics=[topic],
        group_id=group,
        client_id=unique("client"),
        handler=handler,
        **options,
    )


async def test_ensure_topics_creates_missing_topics_and_is_idempotent(bootstrap: str) -> None:
    first, second = unique("requests"), unique("results")
    await ensure_topics(bootstrap, [TopicSpec(first, 3)])
    assert await partition_counts(bootstrap, [first]) == {first: 3}
    # Again, with the existing topic and a new one: only the new one is created.
    await ensure_topics(bootstrap, [TopicSpec(first, 3), TopicSpec(second, 2)])
    await ensure_topics(bootstrap, [TopicSpec(first, 3), TopicSpec(second, 2)])
    assert await partition_counts(bootstrap, [first, second]) == {first: 3, second: 2}


async def test_ensure_topics_survives_a_broker_that_cannot_grow_partitions(
    bootstrap: str,
) -> None:
    topic = unique("grow")
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    await ensure_topics(bootstrap, [TopicSpec(topic, 4)])  # the embedded broker cannot grow
    assert (await partition_counts(bootstrap, [topic]))[topic] in (1, 4)


async def test_after_a_broker_loss_a_topic_a_client_made_first_is_replaced_with_enough_partitions(
    bootstrap: str,
) -> None:
    # A producer asks about the topic before it was created again: the embedded broker makes it
    # with its default partition count, fewer than wanted, and cannot grow it.
    topic = unique("raced")
    producer = create_producer(bootstrap, client_id="platform-tests")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"early", key=b"k")
    finally:
        await producer.stop()
    auto_created = (await partition_counts(bootstrap, [topic]))[topic]
    wanted = auto_created + 3
    await ensure_topics(bootstrap, [TopicSpec(topic, wanted)], replace_smaller=True)
    assert await partition_counts(bootstrap, [topic]) == {topic: wanted}


async def test_messages_from_create_producer_carry_their_headers(bootstrap: str) -> None:
    topic = unique("headers")
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    producer = create_producer(bootstrap, client_id="platform-tests")
    await producer.start()
    try:
        await check_kafka(producer, topic)
        await producer.send_and_wait(
            topic,
            b'{"job": 1}',
            key=b"job-1",
            headers=[("request_id", b"trace-123456"), ("type", b"stamping.requested")],
        )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        record = await asyncio.wait_for(consumer.getone(), timeout=10)
    finally:
        await consumer.stop()
    assert record.key == b"job-1"
    assert record.value == b'{"job": 1}'
    assert list(record.headers) == [
        ("request_id", b"trace-123456"),
        ("type", b"stamping.requested"),
    ]


async def test_every_message_is_processed_and_committed_so_a_new_consumer_skips_it(
    bootstrap: str,
) -> None:
    topic, group = unique("loop"), unique("group")
    await ensure_topics(bootstrap, [TopicSpec(topic, 2)])
    sent = [(index % 2, f"m{index}".encode()) for index in range(10)]
    await produce(bootstrap, topic, sent)
    first_seen: list[Record] = []

    async def first_handler(record: Record) -> None:
        first_seen.append(record)

    loop = consumer_loop(bootstrap, topic, group, first_handler, concurrency=4)
    async with Running(loop):

        async def all_seen() -> bool:
            return len(first_seen) >= len(sent)

        await wait_for(all_seen, within=30, interval=0.05)
    assert sorted(record.value for record in first_seen) == sorted(value for _, value in sent)
    partitions = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    # offset + 1 of the last processed message of each partition: 5 messages each.
    assert await committed(bootstrap, group, partitions) == [5, 5]

    # A new consumer of the group starts from its committed offsets: only new messages.
    await produce(bootstrap, topic, [(0, b"after-0"), (1, b"after-1")])
    assert [record.value for record in await read_as_group(bootstrap, group, partitions)] == [
        b"after-0",
        b"after-1",
    ]


async def test_a_slow_message_holds_back_the_commit_but_not_the_messages_after_it(
    bootstrap: str,
) -> None:
    topic, group = unique("pipeline"), unique("group")
    partition = TopicPartition(topic, 0)
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    values = [b"m0", b"slow", *(f"m{index}".encode() for index in range(2, 12))]
    await produce(bootstrap, topic, [(0, value) for value in values])
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(record: Record) -> None:
        assert record.value is not None
        if record.value == b"slow":
            await release.wait()
        handled.append(record.value)

    # Two at a time: while "slow" holds one slot, the other goes through everything after it
    # (a loop that waited for a whole fetch of 4 would stop at m3).
    loop = consumer_loop(
        bootstrap, topic, group, handler, concurrency=2, max_batch=4, commit_every_seconds=0.05
    )
    async with Running(loop):

        async def the_rest_done() -> bool:
            return len(handled) == len(values) - 1

        await wait_for(the_rest_done, within=30, interval=0.05)
        assert b"slow" not in handled
        # Committed up to the slow message, not past it: a crash now redelivers it.
        assert await committed(bootstrap, group, [partition]) == [1]
        release.set()

        async def all_done() -> bool:
            return len(handled) == len(values)

        await wait_for(all_done, within=30, interval=0.05)
    assert await committed(bootstrap, group, [partition]) == [len(values)]


async def test_a_failing_message_is_retried_not_skipped_and_the_loop_keeps_running(
    bootstrap: str,
) -> None:
    topic, group = unique("retry"), unique("group")
    partition = TopicPartition(topic, 0)
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    await produce(bootstrap, topic, [(0, b"m0"), (0, b"m1"), (0, b"poison"), (0, b"m3")])
    attempts: list[tuple[bytes, str]] = []
    committed_when_retried: list[int] = []

    async def handler(record: Record) -> None:
        assert record.value is not None
        if record.value == b"poison":
            if (b"poison", "failed") not in attempts:
                attempts.append((record.value, "failed"))
                raise ConnectionError("database unavailable")
            committed_when_retried.extend(await committed(bootstrap, group, [partition]))
        attempts.append((record.value, "ok"))

    def succeeded() -> set[bytes]:
        return {value for value, outcome in attempts if outcome == "ok"}

    loop = consumer_loop(bootstrap, topic, group, handler, retry_backoff_seconds=0.1)
    async with Running(loop) as running:

        async def first_messages_done() -> bool:
            return {b"m0", b"m1", b"poison", b"m3"} <= succeeded()

        await wait_for(first_messages_done, within=30, interval=0.05)
        assert running.task is not None and not running.task.done()
        await produce(bootstrap, topic, [(0, b"m4")])

        async def later_message_done() -> bool:
            return b"m4" in succeeded()

        await wait_for(later_message_done, within=30, interval=0.05)
        assert not running.task.done()
    assert [outcome for value, outcome in attempts if value == b"poison"] == ["failed", "ok"]
    # While the failed message waited for its retry, the group's offset stayed on it (2).
    assert committed_when_retried == [2]
    assert await committed(bootstrap, group, [partition]) == [5]


async def test_stopping_while_still_joining_the_group_returns_promptly(bootstrap: str) -> None:
    topic, group = unique("join"), unique("group")
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])

    async def handler(record: Record) -> None:
        return None

    loop = consumer_loop(bootstrap, topic, group, handler)
    await loop.start()
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.2)
    assert not loop.consumer.assignment()  # still joining (the broker answers after seconds)
    clock = asyncio.get_running_loop()
    started = clock.time()
    loop.request_stop()
    try:
        await asyncio.wait_for(task, timeout=30)
    finally:
        elapsed = clock.time() - started
    # A stop that waited for the join would take as long as the broker holds the JoinGroup
    # request (about 3 s with the embedded broker, up to the rebalance timeout with Kafka).
    assert elapsed < 1.0, f"run() took {elapsed:.1f}s to return after request_stop()"


async def test_consumer_lag_is_exported_per_partition_after_each_batch(bootstrap: str) -> None:
    topic, group = unique("lag"), unique("group")
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    await produce(bootstrap, topic, [(0, f"m{index}".encode()) for index in range(6)])
    release = asyncio.Event()
    seen: list[Record] = []

    async def slow_handler(record: Record) -> None:
        seen.append(record)
        await release.wait()

    def lag() -> float | None:
        return REGISTRY.get_sample_value(
            "meterai_kafka_consumer_lag_messages",
            {"group": group, "topic": topic, "partition": "0"},
        )

    # One message per batch, held by the handler: the first batch leaves five behind it.
    loop = consumer_loop(bootstrap, topic, group, slow_handler, max_batch=1)
    async with Running(loop):

        async def first_batch_recorded() -> bool:
            return bool(seen) and lag() is not None

        await wait_for(first_batch_recorded, within=30, interval=0.05)
        assert lag() == 5
        release.set()

        async def caught_up() -> bool:
            return len(seen) >= 6 and lag() == 0

        await wait_for(caught_up, within=30, interval=0.05)


async def test_stopping_finishes_what_runs_and_leaves_what_has_not_started(
    bootstrap: str,
) -> None:
    topic, group = unique("drain"), unique("group")
    partition = TopicPartition(topic, 0)
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    await produce(bootstrap, topic, [(0, f"m{index}".encode()) for index in range(6)])
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def handler(record: Record) -> None:
        assert record.value is not None
        started.set()
        await release.wait()
        handled.append(record.value)

    # One at a time, and the whole backlog fetched in one batch: m0 runs, m1..m5 wait.
    loop = consumer_loop(bootstrap, topic, group, handler, concurrency=1, max_batch=6)
    async with Running(loop):
        await asyncio.wait_for(started.wait(), timeout=30)
        loop.request_stop()
        await asyncio.sleep(0.2)
        release.set()
    # The message in flight finished and was committed; the others were not started and are
    # left for the partition's next owner.
    assert handled == [b"m0"]
    assert await committed(bootstrap, group, [partition]) == [1]
    remaining = await read_as_group(bootstrap, group, [partition])
    assert [record.value for record in remaining] == [f"m{index}".encode() for index in range(1, 6)]


async def test_a_batch_handler_gets_whole_fetches_and_a_failed_one_is_fetched_again_whole(
    bootstrap: str,
) -> None:
    topic, group = unique("batches"), unique("group")
    partition = TopicPartition(topic, 0)
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    await produce(bootstrap, topic, [(0, f"m{index}".encode()) for index in range(6)])
    calls: list[list[bytes]] = []
    committed_when_retried: list[int] = []

    async def handler(records: list[Record]) -> None:
        values = [record.value or b"" for record in records]
        calls.append(values)
        if len(calls) == 1:
            raise ConnectionError("database unavailable")  # nothing of it counts as done
        if len(calls) == 2:
            committed_when_retried.extend(await committed(bootstrap, group, [partition]))

    loop = ConsumerLoop(
        bootstrap_servers=bootstrap,
        topics=[topic],
        group_id=group,
        client_id=unique("client"),
        batch_handler=handler,
        max_batch=6,
        retry_backoff_seconds=0.1,
    )
    async with Running(loop) as running:

        async def all_done() -> bool:
            return sum(len(values) for values in calls[1:]) >= 6

        await wait_for(all_done, within=30, interval=0.05)
        assert running.task is not None and not running.task.done()
    everything = [f"m{index}".encode() for index in range(6)]
    # The first fetch failed whole and came back whole (from its first message), in order.
    assert calls[1] == calls[0] and calls[0] == everything[: len(calls[0])]
    assert [value for values in calls[1:] for value in values] == everything
    assert committed_when_retried == [0]  # nothing of the failed fetch committed
    assert await committed(bootstrap, group, [partition]) == [6]


def test_a_consumer_loop_takes_one_kind_of_handler() -> None:
    async def one(record: Record) -> None:
        return None

    async def many(records: list[Record]) -> None:
        return None

    for handlers in ({}, {"handler": one, "batch_handler": many}):
        with pytest.raises(ValueError, match="either a handler or a batch handler"):
            ConsumerLoop(
                bootstrap_servers="127.0.0.1:1",
                topics=["t"],
                group_id="g",
                client_id="c",
                **handlers,  # type: ignore[arg-type]
            )
