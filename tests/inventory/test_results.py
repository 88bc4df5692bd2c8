"""Inventory applies stamping's results a fetch at a time: finished jobs use their serials
(once, whatever is delivered again), failed ones give theirs back, and nothing a batch holds
(a duplicate, a conflict, a malformed message) stops the rest or unbalances the books."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.inventory import service as inventory_service
from tests.harness import ServiceStack, wait_for
from tests.inventory.helpers import as_stamping, serial_row


def _result(job_id: uuid.UUID, serial: str, status: str) -> bytes:
    return json.dumps({"job_id": str(job_id), "serial": serial, "status": status}).encode()


async def _used_entries(stack: ServiceStack) -> int:
    connection = await asyncpg.connect(stack.inventory_db)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE memo LIKE '% affixed by job %'"
        )
        return count
    finally:
        await connection.close()


@pytest.mark.workers(0)
async def test_a_batch_of_results_uses_each_serial_once_and_skips_what_cannot_apply(
    stack: ServiceStack,
) -> None:
    await stack.mint(5)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        bought = (await client.post("/api/v1/purchases", json={"quantity": 5})).json()["serials"]
    first, second, failed, unclaimed, late = sorted(bought)
    owner = (await serial_row(stack, first))["owner"]
    jobs = {serial: uuid.uuid4() for serial in bought}
    async with as_stamping(stack) as inventory:
        for serial in (first, second, failed, late):
            await inventory.claim_serial(owner=owner, job_id=jobs[serial], serial=serial)
    messages = [
        _result(jobs[first], first, "done"),
        _result(jobs[first], first, "done"),  # delivered twice in one batch
        b"not a result",
        _result(uuid.uuid4(), second, "done"),  # another job's claim: a conflict, kept apart
        _result(jobs[second], second, "done"),
        _result(jobs[failed], failed, "failed"),
        _result(jobs[unclaimed], unclaimed, "done"),  # sold, no claim on record: used by it
    ]
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka.bootstrap_servers)
    await producer.start()
    try:
        for message in messages:
            await producer.send_and_wait(f"stamping.results.{stack.suffix}", message, key=b"k")

        expected = {
            first: ("used", jobs[first]),
            second: ("used", jobs[second]),
            failed: ("sold", None),
            unclaimed: ("used", jobs[unclaimed]),
            late: ("sold", jobs[late]),  # its job has not finished
        }

        async def applied() -> bool:
            for serial, state in expected.items():
                row = await serial_row(stack, serial)
                if (row["state"], row["job_id"]) != state:
                    return False
            return True

        await wait_for(applied, within=30)
        assert await _used_entries(stack) == 2 * 3  # two legs per stamp used

        # Everything again, and the late job's result: only the late job changes anything.
        for message in [*messages, _result(jobs[late], late, "done")]:
            await producer.send_and_wait(f"stamping.results.{stack.suffix}", message, key=b"k")
        expected[late] = ("used", jobs[late])
        await wait_for(applied, within=30)
    finally:
        await producer.stop()

    async def four_used() -> bool:
        return await _used_entries(stack) == 2 * 4

    await wait_for(four_used, within=10)
    books = await stack._inventory(inventory_service.reconcile)
    assert books.ok, books.discrepancies
    async with stack.client(api_key) as client:
        stamps = (await client.get("/api/v1/balance")).json()["stamps"]
    assert stamps == {"reserved": 0, "sold": 1, "used": 4}
