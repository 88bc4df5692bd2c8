"""The waiting room's first version: tickets, positions, and the operators' controls."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.harness import OPS_TOKEN, ServiceStack, wait_for

pytestmark = pytest.mark.workers(0)


async def test_join_gives_increasing_numbers_and_a_refresh_keeps_the_place(
    stack: ServiceStack,
) -> None:
    async with stack.client() as ops:
        paused = await ops.patch(
            "/ops/queue",
            json={"paused": True},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
        assert paused.status_code == 200, paused.text
    clients = [httpx.AsyncClient(base_url=stack.gateway_url) for _ in range(5)]
    try:
        positions = []
        for client in clients:
            joined = await client.post("/queue/join")
            assert joined.status_code == 200, joined.text
            assert joined.json()["state"] == "paused"
            positions.append(joined.json()["position"])
        assert positions == sorted(positions) and len(set(positions)) == 5
        again = await clients[2].post("/queue/join")  # the cookie keeps the place
        assert again.json()["position"] == positions[2]
        status = await clients[2].get("/queue/status")
        assert status.json()["position"] == positions[2]
        async with httpx.AsyncClient(base_url=stack.gateway_url) as api_client:
            by_header = await api_client.get(
                "/queue/status", headers={"X-Queue-Ticket": again.json()["ticket"]}
            )
        assert by_header.json()["position"] == positions[2]
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


async def test_status_without_a_ticket_or_with_a_forged_one(stack: ServiceStack) -> None:
    async with stack.client() as client:
        response = await client.get("/queue/status")
        assert response.status_code == 404 and response.json()["code"] == "no_ticket"
        forged = await client.get("/queue/status", headers={"X-Queue-Ticket": "eyJ.forged.x"})
        assert forged.status_code == 404 and forged.json()["code"] == "no_ticket"


async def test_admission_advances_at_the_configured_rate(stack: ServiceStack) -> None:
    headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
    async with stack.client() as client:
        await client.patch("/ops/queue", json={"paused": True}, headers=headers)
        await client.post("/queue/join")
        view = (await client.get("/ops/queue", headers=headers)).json()
        assert view["length"] == 1 and view["paused"] is True
        await client.patch(
            "/ops/queue", json={"paused": False, "admit_per_minute": 600}, headers=headers
        )

        async def admitted() -> bool:
            return bool((await client.get("/queue/status")).json()["state"] == "admitted")

        await wait_for(admitted, within=10)
        view = (await client.get("/ops/queue", headers=headers)).json()
        assert view["admitted"] == 1 and view["length"] == 0


async def test_ops_needs_the_operations_token(stack: ServiceStack) -> None:
    async with stack.client() as client:
        assert (await client.get("/ops/queue")).json()["code"] == "missing_credentials"
        wrong = await client.get("/ops/queue", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_ops_token"
        bad = await client.patch(
            "/ops/queue",
            json={"admit_per_minute": -1},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"


async def test_the_page_is_served_in_bahasa_indonesia(stack: ServiceStack) -> None:
    async with stack.client() as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<html lang="id">' in page.text and "Antrean" in page.text
