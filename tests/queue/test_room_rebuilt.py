"""Redis comes back without the room (a failover to a replica that had not caught up): the room
is rebuilt from what the queue service last saw, not restarted. Nobody who holds a ticket loses
their place or their admission, no queue number is given twice, and admission resumes once the
waiting have polled again (issue 8)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.harness import OPS_TOKEN, ServiceStack, wait_for

pytestmark = [
    pytest.mark.workers(0),
    pytest.mark.settings(queue={"rebuild_hold_seconds": 3.0}),
]

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


def number_of(ticket: str) -> int:
    kind, number, _ = ticket.split(".")
    assert kind == "n"
    return int(number)


async def status(client: httpx.AsyncClient) -> dict[str, object]:
    response = await client.get("/queue/status")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_a_room_redis_lost_is_rebuilt_without_losing_or_reordering_anyone(
    stack: ServiceStack,
) -> None:
    clients = [httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) for _ in range(6)]
    try:
        async with stack.client() as ops:
            await ops.patch("/ops/queue", json={"paused": True}, headers=OPS)
            numbers = []
            for client in clients[:5]:
                joined = await client.post("/queue/join")
                assert joined.status_code == 200, joined.text
                numbers.append(number_of(joined.json()["ticket"]))
            assert numbers == sorted(numbers)
            # Two are admitted; three wait behind them.
            await ops.patch(
                "/ops/queue",
                json={"paused": False, "admit_per_minute": 6000, "max_active": 2},
                headers=OPS,
            )

            async def two_admitted() -> bool:
                states = [(await status(client))["state"] for client in clients[:5]]
                return states == ["admitted"] * 2 + ["waiting"] * 3

            await wait_for(two_admitted, within=15, interval=0.2)
            before = (await ops.get("/ops/queue", headers=OPS)).json()
            positions = [(await status(client))["position"] for client in clients[2:5]]
            assert positions == [1, 2, 3]

            # Redis loses every key of the room.
            redis = aioredis.from_url(stack.infra.redis.url())
            try:
                keys = [key async for key in redis.scan_iter(match=f"room:{{{stack.event}}}:*")]
                assert keys
                await redis.delete(*keys)
            finally:
                await redis.aclose()
            rebuilt_before = REGISTRY.get_sample_value("meterai_queue_rebuilt_total") or 0.0

            # A newcomer gets a number after everyone's, never one already given.
            joined = await clients[5].post("/queue/join")
            assert joined.status_code == 200, joined.text
            newcomer = number_of(joined.json()["ticket"])
            assert newcomer > max(numbers)
            after = (await ops.get("/ops/queue", headers=OPS)).json()
            assert after["admitted"] >= before["admitted"]
            assert after["max_active"] == 2 and after["admit_per_minute"] == 6000
            # The admitted keep their admission; the waiting keep their places.
            for client in clients[:2]:
                again = await status(client)
                assert again["state"] == "admitted", again
                assert again["admission_token"]
            assert [(await status(client))["position"] for client in clients[2:5]] == [1, 2, 3]
            rebuilt = REGISTRY.get_sample_value("meterai_queue_rebuilt_total") or 0.0
            assert rebuilt == rebuilt_before + 1

            # Admission resumes after the hold, in order, and still within max_active.
            await ops.patch("/ops/queue", json={"max_active": 3}, headers=OPS)

            async def third_admitted() -> bool:
                return (await status(clients[2]))["state"] == "admitted"

            await wait_for(third_admitted, within=20, interval=0.3)
            await asyncio.sleep(1.0)
            states = [(await status(client))["state"] for client in clients]
            assert states == ["admitted"] * 3 + ["waiting"] * 3, states
            assert [(await status(client))["position"] for client in clients[3:5]] == [1, 2]
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
