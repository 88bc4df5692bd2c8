"""Distributor purchases through the gateway: all or nothing, never oversold, idempotent."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from services.inventory import repository as repo
from services.inventory.models import Distributor, LedgerEntry, Serial, SerialState
from services.inventory.service import new_serial
from services.inventory.sweeper import forget_idempotency_keys
from services.platform.db import create_engine, create_sessionmaker
from tests.harness import ServiceStack

SERIAL = re.compile(r"^[0-9A-Z]{22}$")

# Purchases need no signing workers.
pytestmark = pytest.mark.workers(0)


async def ledger_and_balances(stack: ServiceStack) -> dict[str, Any]:
    """What the books say: every ledger transaction balances, and the accounts match."""
    engine = create_engine(stack.inventory_db, pool_size=1)
    try:
        async with create_sessionmaker(engine)() as session:
            unbalanced = (
                await session.execute(
                    select(LedgerEntry.txn_id)
                    .group_by(LedgerEntry.txn_id)
                    .having(func.sum(LedgerEntry.amount) != 0)
                )
            ).all()
            accounts = dict(
                (
                    await session.execute(
                        select(LedgerEntry.account, func.sum(LedgerEntry.amount)).group_by(
                            LedgerEntry.account
                        )
                    )
                ).all()
            )
            balances = {
                f"distributor:{row.id}": row.balance
                for row in (await session.execute(select(Distributor))).scalars()
            }
            states = Counter(
                state for state in (await session.execute(select(Serial.state))).scalars()
            )
    finally:
        await engine.dispose()
    return {"unbalanced": unbalanced, "accounts": accounts, "balances": balances, "states": states}


async def test_a_purchase_debits_the_balance_and_allocates_serials(stack: ServiceStack) -> None:
    await stack.mint(5)
    api_key = await stack.create_distributor(balance=100_000)
    async with stack.client(api_key) as client:
        response = await client.post("/api/v1/purchases", json={"quantity": 3})
        assert response.status_code == 201, response.text
        purchase = response.json()
        assert purchase["status"] == "paid"
        assert purchase["amount"] == 30_000 and purchase["unit_price"] == 10_000
        assert len(set(purchase["serials"])) == 3
        assert all(SERIAL.match(serial) for serial in purchase["serials"])

        again = await client.get(f"/api/v1/purchases/{purchase['id']}")
        assert again.json()["serials"] == purchase["serials"]
        balance = (await client.get("/api/v1/balance")).json()
        assert balance["balance"] == 70_000
        assert balance["stamps"] == {"reserved": 0, "sold": 3, "used": 0}
        listing = (await client.get("/api/v1/serials", params={"state": "sold"})).json()
        assert sorted(item["serial"] for item in listing["items"]) == sorted(purchase["serials"])

    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []
    for account, balance in books["balances"].items():
        assert books["accounts"][account] == balance
    assert books["accounts"]["revenue:stamps"] == 30_000


async def test_insufficient_balance_buys_nothing(stack: ServiceStack) -> None:
    await stack.mint(5)
    api_key = await stack.create_distributor(balance=25_000)
    async with stack.client(api_key) as client:
        response = await client.post("/api/v1/purchases", json={"quantity": 3})
        assert response.status_code == 409
        problem = response.json()
        assert problem["code"] == "insufficient_balance"
        assert problem["balance"] == 25_000 and problem["amount"] == 30_000
        assert (await client.get("/api/v1/balance")).json()["balance"] == 25_000
    assert (await ledger_and_balances(stack))["states"][SerialState.available] == 5


async def test_sold_out_is_all_or_nothing(stack: ServiceStack) -> None:
    await stack.mint(2)
    api_key = await stack.create_distributor(balance=100_000)
    async with stack.client(api_key) as client:
        response = await client.post("/api/v1/purchases", json={"quantity": 3})
        assert response.status_code == 409
        assert response.json()["code"] == "sold_out"
        assert response.json()["available"] == 2
        assert (await client.get("/api/v1/balance")).json()["balance"] == 100_000
        assert (await client.post("/api/v1/purchases", json={"quantity": 2})).status_code == 201
    books = await ledger_and_balances(stack)
    assert books["states"] == {SerialState.sold: 2}
    assert books["unbalanced"] == []


async def test_concurrent_purchases_never_oversell(stack: ServiceStack) -> None:
    """A small version of the surge: 90 concurrent buyers of one stamp, 40 serials."""
    await stack.mint(40)
    keys = [await stack.create_distributor(balance=500_000) for _ in range(3)]
    clients = [stack.client(key) for key in keys]
    try:
        responses = await asyncio.gather(
            *(clients[n % 3].post("/api/v1/purchases", json={"quantity": 1}) for n in range(90))
        )
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 40, 409: 50}, statuses
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"sold_out"}
    sold = [serial for r in responses if r.status_code == 201 for serial in r.json()["serials"]]
    assert len(sold) == len(set(sold)) == 40
    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []
    assert books["states"] == {SerialState.sold: 40}
    for account, balance in books["balances"].items():
        assert books["accounts"][account] == balance
    assert sum(books["balances"].values()) == 3 * 500_000 - 40 * 10_000


async def test_concurrent_purchases_spend_the_balance_exactly(stack: ServiceStack) -> None:
    """Purchases of one distributor arriving together run in shared batches; the balance
    still covers exactly as many as it can pay for."""
    await stack.mint(50)
    api_key = await stack.create_distributor(balance=70_000)
    async with stack.client(api_key) as client:
        responses = await asyncio.gather(
            *(client.post("/api/v1/purchases", json={"quantity": 1}) for _ in range(20))
        )
        balance = (await client.get("/api/v1/balance")).json()["balance"]
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 7, 409: 13}, statuses
    refusals = [r.json() for r in responses if r.status_code == 409]
    assert {problem["code"] for problem in refusals} == {"insufficient_balance"}
    assert all(problem["amount"] == 10_000 and problem["balance"] < 10_000 for problem in refusals)
    assert balance == 0
    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []
    assert books["states"] == {SerialState.sold: 7, SerialState.available: 43}


async def test_one_batch_runs_its_purchases_one_after_another(stack: ServiceStack) -> None:
    """In one statement, each purchase sees what the ones before it did, and a refused one
    leaves the others alone."""
    await stack.mint(6)
    await stack.create_distributor(balance=50_000)
    engine = create_engine(stack.inventory_db, pool_size=1)
    try:
        async with engine.connect() as connection:
            owner = (await connection.execute(text("SELECT id FROM distributors"))).scalar_one()
            orders = [
                repo.DistributorOrder(uuid.uuid4(), owner, quantity)
                for quantity in (3, 9, 3, 1, 1, 1)
            ]
            rows = await repo.buy_for_distributors(connection, orders, unit_price=10_000)
            await connection.commit()
    finally:
        await engine.dispose()
    # 3 bought (Rp 20,000 and 3 serials left); 9 are more than exist; 3 cost more than the
    # balance; 1 and 1 fit; the last finds the balance empty.
    assert [(row.outcome, len(row.serials)) for row in rows] == [
        ("ok", 3),
        ("sold_out", 0),
        ("insufficient_balance", 0),
        ("ok", 1),
        ("ok", 1),
        ("insufficient_balance", 0),
    ]
    assert rows[1].available == 3
    sold = [serial for row in rows for serial in row.serials]
    assert len(set(sold)) == 5
    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []
    assert books["states"] == {SerialState.sold: 5, SerialState.available: 1}
    assert list(books["balances"].values()) == [0]


async def test_concurrent_batches_of_several_distributors_never_deadlock(
    stack: ServiceStack,
) -> None:
    """Batches (of several replicas, or two in flight in one) lock the distributors' rows in
    one order, whatever order their purchases arrived in. Without that, this interleaving is
    a deadlock: A holds `a` and waits for `c` (held here), B holds `b` and waits for `a`, and
    once `c` is free A wants `b`; PostgreSQL would abort one batch and fail all its buyers."""
    await stack.mint(10)
    for _ in range(3):
        await stack.create_distributor(balance=100_000)
    engine = create_engine(stack.inventory_db, pool_size=4)

    def order(distributor: uuid.UUID) -> repo.DistributorOrder:
        return repo.DistributorOrder(uuid.uuid4(), distributor, 1)

    async def batch(distributors: list[uuid.UUID]) -> list[str]:
        async with engine.connect() as connection:
            rows = await repo.buy_for_distributors(
                connection, [order(d) for d in distributors], unit_price=10_000
            )
            await connection.commit()
        return [row.outcome for row in rows]

    async def lock_waits(count: int) -> None:
        async with engine.connect() as connection:
            for _ in range(200):
                waiting = (
                    await connection.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                    )
                ).scalar_one()
                await connection.commit()  # the activity view is a snapshot per transaction
                if waiting >= count:
                    return
                await asyncio.sleep(0.02)
        raise AssertionError(f"expected {count} purchases waiting for a lock")

    try:
        async with engine.connect() as holder:
            rows = await holder.execute(text("SELECT id FROM distributors ORDER BY id"))
            a, b, c = rows.scalars().all()
            await holder.commit()
            await holder.execute(
                text("SELECT 1 FROM distributors WHERE id = :id FOR UPDATE"), {"id": c}
            )
            first = asyncio.create_task(batch([a, c, b]))
            await lock_waits(1)
            second = asyncio.create_task(batch([b, a]))
            await lock_waits(2)
            await holder.commit()
            outcomes = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    finally:
        await engine.dispose()
    assert outcomes == [["ok", "ok", "ok"], ["ok", "ok"]]
    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []
    assert sorted(books["balances"].values()) == [80_000, 80_000, 90_000]


async def test_idempotency_key_replays_and_refuses_another_body(stack: ServiceStack) -> None:
    await stack.mint(10)
    api_key = await stack.create_distributor()
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    async with stack.client(api_key) as client:
        responses = await asyncio.gather(
            *(
                client.post("/api/v1/purchases", json={"quantity": 2}, headers=headers)
                for _ in range(8)
            )
        )
        assert {response.status_code for response in responses} == {201}
        assert len({response.json()["id"] for response in responses}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
        balance = (await client.get("/api/v1/balance")).json()
        assert balance["balance"] == 1_000_000 - 20_000

        other = await client.post("/api/v1/purchases", json={"quantity": 3}, headers=headers)
        assert other.status_code == 422
        assert other.json()["code"] == "idempotency_key_reused"


async def test_a_failed_request_does_not_burn_its_idempotency_key(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    headers = {"Idempotency-Key": "retry-after-restock"}
    async with stack.client(api_key) as client:
        first = await client.post("/api/v1/purchases", json={"quantity": 1}, headers=headers)
        assert first.json()["code"] == "sold_out"
        await stack.mint(1)
        retry = await client.post("/api/v1/purchases", json={"quantity": 1}, headers=headers)
        assert retry.status_code == 201


@pytest.mark.parametrize("limit", [1, 3])
async def test_serials_are_listed_in_pages(stack: ServiceStack, limit: int) -> None:
    await stack.mint(7)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        bought = (await client.post("/api/v1/purchases", json={"quantity": 7})).json()["serials"]
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["after"] = cursor
            page = (await client.get("/api/v1/serials", params=params)).json()
            seen.extend(item["serial"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(bought)


def test_serials_are_unguessable_in_shape() -> None:
    serials = [new_serial() for _ in range(20_000)]
    assert len(set(serials)) == len(serials)
    assert all(SERIAL.match(serial) for serial in serials)
    # Every character position uses the whole alphabet (no fixed prefix or counter).
    for position in range(22):
        assert len({serial[position] for serial in serials}) == 36


async def test_old_idempotency_keys_are_forgotten(stack: ServiceStack) -> None:
    await stack.mint(2)
    api_key = await stack.create_distributor()
    headers = {"Idempotency-Key": "yesterday"}
    async with stack.client(api_key) as client:
        first = await client.post("/api/v1/purchases", json={"quantity": 1}, headers=headers)
        assert first.status_code == 201
        engine = create_engine(stack.inventory_db, pool_size=1)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text("UPDATE idempotency_keys SET created_at = now() - interval '2 days'")
                )
            assert await forget_idempotency_keys(create_sessionmaker(engine), timedelta(hours=24))
        finally:
            await engine.dispose()
        # The key is free again: the same request makes a new purchase instead of a replay.
        again = await client.post("/api/v1/purchases", json={"quantity": 1}, headers=headers)
        assert again.status_code == 201 and again.json()["id"] != first.json()["id"]
