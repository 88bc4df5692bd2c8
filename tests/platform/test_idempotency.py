"""Idempotency keys on the real PostgreSQL: replays, misuse, and concurrent duplicates."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.platform.db import create_engine, create_sessionmaker, transaction
from services.platform.idempotency import (
    MAX_KEY_LENGTH,
    IdempotencyKeyReused,
    IdempotencyStore,
    InvalidIdempotencyKey,
    StoredResponse,
    canonical_json,
    request_fingerprint,
)
from tests.harness import wait_for
from tests.platform.scratch import idempotency_keys

store = IdempotencyStore(idempotency_keys)
HASH = request_fingerprint("POST", "/api/v1/purchases", canonical_json({"quantity": 2}))
OTHER_HASH = request_fingerprint("POST", "/api/v1/purchases", canonical_json({"quantity": 3}))


@pytest.fixture
async def engine(scratch_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(scratch_database, pool_size=4)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


@pytest.fixture
def owner() -> str:
    return f"distributor:{uuid.uuid4().hex}"


async def claim(
    sessions: async_sessionmaker[AsyncSession], owner: str, key: str, request_hash: str = HASH
) -> StoredResponse | None:
    async with transaction(sessions) as session:
        return await store.claim(session, owner=owner, key=key, request_hash=request_hash)


async def test_first_claim_goes_ahead_and_a_repeat_replays_the_recorded_response(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    body = {"purchase_id": "p-1", "serials": ["A", "B"], "amount": 20_000}
    async with transaction(sessions) as session:
        assert await store.claim(session, owner=owner, key="k-1", request_hash=HASH) is None
        await store.record(session, owner=owner, key="k-1", status_code=201, body=body)
    assert await claim(sessions, owner, "k-1") == StoredResponse(status_code=201, body=body)
    assert await claim(sessions, owner, "k-1") == StoredResponse(status_code=201, body=body)


async def test_the_same_key_with_another_request_is_refused(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    async with transaction(sessions) as session:
        assert await store.claim(session, owner=owner, key="k-2", request_hash=HASH) is None
        await store.record(session, owner=owner, key="k-2", status_code=201, body={"id": 1})
    with pytest.raises(IdempotencyKeyReused) as raised:
        await claim(sessions, owner, "k-2", OTHER_HASH)
    assert raised.value.status == 422
    assert raised.value.code == "idempotency_key_reused"


async def test_keys_are_scoped_to_their_owner(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    async with transaction(sessions) as session:
        assert await store.claim(session, owner=owner, key="shared", request_hash=HASH) is None
        await store.record(session, owner=owner, key="shared", status_code=201, body={"id": 1})
    assert await claim(sessions, f"{owner}-other", "shared", OTHER_HASH) is None


@pytest.mark.parametrize("key", ["", "k" * (MAX_KEY_LENGTH + 1), "line\nbreak", "tab\tkey"])
async def test_invalid_keys_are_refused(
    sessions: async_sessionmaker[AsyncSession], owner: str, key: str
) -> None:
    with pytest.raises(InvalidIdempotencyKey) as raised:
        await claim(sessions, owner, key)
    assert raised.value.status == 400


async def test_the_longest_allowed_key_is_accepted(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    assert await claim(sessions, owner, "k" * MAX_KEY_LENGTH) is None


async def test_a_rolled_back_claim_leaves_the_key_free(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    with pytest.raises(RuntimeError):
        async with transaction(sessions) as session:
            assert await store.claim(session, owner=owner, key="k-3", request_hash=HASH) is None
            raise RuntimeError("the purchase failed")
    assert await claim(sessions, owner, "k-3", OTHER_HASH) is None


async def waiting_on_a_lock(engine: AsyncEngine) -> int:
    """How many sessions of this database wait for a lock while inserting a key."""
    async with engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO idempotency_keys%'"
            )
        )
    return int(waiting or 0)


async def test_a_concurrent_duplicate_waits_for_the_first_commit_then_replays(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    loop = asyncio.get_running_loop()
    first_claimed = asyncio.Event()
    finish_first = asyncio.Event()
    times: dict[str, float] = {}

    async def first_request() -> None:
        async with transaction(sessions) as session:
            assert await store.claim(session, owner=owner, key="dup", request_hash=HASH) is None
            first_claimed.set()
            await finish_first.wait()
            await store.record(session, owner=owner, key="dup", status_code=201, body={"id": 7})
            times["first_commits"] = loop.time()
        times["first_committed"] = loop.time()

    async def second_request() -> StoredResponse | None:
        await first_claimed.wait()
        async with transaction(sessions) as session:
            replay = await store.claim(session, owner=owner, key="dup", request_hash=HASH)
            times["second_claimed"] = loop.time()
            return replay

    first = asyncio.create_task(first_request())
    second = asyncio.create_task(second_request())
    try:
        # The second request is parked inside PostgreSQL on the first one's uncommitted row.
        await wait_for(lambda: waiting_on_a_lock(engine), within=10, interval=0.02)
        await asyncio.sleep(0.3)
        assert not second.done()
        assert "second_claimed" not in times
        finish_first.set()
        replay = await asyncio.wait_for(second, timeout=10)
        await first
    finally:
        finish_first.set()
        await asyncio.gather(first, second, return_exceptions=True)
    assert replay == StoredResponse(status_code=201, body={"id": 7})
    assert times["first_commits"] <= times["second_claimed"]


async def test_a_concurrent_duplicate_proceeds_as_first_when_the_first_rolls_back(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    loop = asyncio.get_running_loop()
    first_claimed = asyncio.Event()
    fail_first = asyncio.Event()
    times: dict[str, float] = {}

    async def first_request() -> None:
        async with transaction(sessions) as session:
            assert await store.claim(session, owner=owner, key="dup", request_hash=HASH) is None
            first_claimed.set()
            await fail_first.wait()
            times["first_fails"] = loop.time()
            raise RuntimeError("payment provider down")

    async def second_request() -> StoredResponse | None:
        await first_claimed.wait()
        async with transaction(sessions) as session:
            claimed = await store.claim(session, owner=owner, key="dup", request_hash=HASH)
            times["second_claimed"] = loop.time()
            await store.record(session, owner=owner, key="dup", status_code=201, body={"id": 8})
            return claimed

    first = asyncio.create_task(first_request())
    second = asyncio.create_task(second_request())
    try:
        await wait_for(lambda: waiting_on_a_lock(engine), within=10, interval=0.02)
        assert not second.done()
        fail_first.set()
        claimed = await asyncio.wait_for(second, timeout=10)
        with pytest.raises(RuntimeError, match="payment provider down"):
            await first
    finally:
        fail_first.set()
        await asyncio.gather(first, second, return_exceptions=True)
    assert claimed is None  # the second request went ahead as if it were the first
    assert times["first_fails"] <= times["second_claimed"]
    assert await claim(sessions, owner, "dup") == StoredResponse(status_code=201, body={"id": 8})


async def test_purge_forgets_only_old_keys(
    sessions: async_sessionmaker[AsyncSession], owner: str
) -> None:
    async with transaction(sessions) as session:
        for key in ("old-1", "old-2", "new-1"):
            await store.claim(session, owner=owner, key=key, request_hash=HASH)
        await session.execute(
            idempotency_keys.update()
            .where(idempotency_keys.c.owner == owner, idempotency_keys.c.key.like("old-%"))
            .values(created_at=datetime.now(UTC) - timedelta(days=2))
        )
    async with transaction(sessions) as session:
        purged = await store.purge_older_than(session, datetime.now(UTC) - timedelta(days=1))
    assert purged == 2
    assert await claim(sessions, owner, "old-1", OTHER_HASH) is None
    with pytest.raises(IdempotencyKeyReused):
        await claim(sessions, owner, "new-1", OTHER_HASH)


def test_fingerprints_are_canonical_and_unambiguous() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert canonical_json({"a": 1}) == '{"a":1}'
    assert request_fingerprint("ab", "c") != request_fingerprint("a", "bc")
    assert request_fingerprint("x", b"y") == request_fingerprint(b"x", "y")
    assert len(HASH) == 64 and HASH != OTHER_HASH
