"""The waiting room under a crowd: unique numbers in join order, admission at the configured
rate and never above `max_active`, abandoned places skipped, the pre-queue drawn at random,
proof of work and per-address limits."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import pytest

from services.platform.http import create_http_client
from services.queue.tickets import solve
from tests.harness import OPS_TOKEN, ServiceStack, wait_for

pytestmark = pytest.mark.workers(0)
OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


async def set_room(stack: ServiceStack, **changes: Any) -> dict[str, Any]:
    async with stack.client() as client:
        response = await client.patch("/ops/queue", json=changes, headers=OPS)
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view


async def room_view(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/ops/queue", headers=OPS)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def queue_client(stack: ServiceStack) -> httpx.AsyncClient:
    """Straight to the queue service (as the gateway forwards public room routes), for a
    crowd: no cookie jar, so every request is a different person unless it sends a ticket."""
    return create_http_client(stack.servers["queue"].url, timeout=60)


async def join(client: httpx.AsyncClient, **headers: str) -> dict[str, Any]:
    response = await client.post("/queue/join", headers=headers)
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    return status


def number(status: dict[str, Any]) -> int:
    kind, value, _ = status["ticket"].split(".")
    assert kind == "n"
    return int(value)


@pytest.mark.settings(queue={"join_limit_per_ip": 0})
async def test_twenty_thousand_join_in_order_and_a_rejoin_keeps_the_place(
    stack: ServiceStack,
) -> None:
    await set_room(stack, paused=True)
    waves: list[list[int]] = []
    # aiohttp: the crowd shares this process (and its event loop) with the servers, and an
    # httpx request costs several times an aiohttp one.
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(
        stack.servers["queue"].url, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as crowd:

        async def join_fast() -> dict[str, Any]:
            async with crowd.post("/queue/join") as response:
                assert response.status == 200, await response.text()
                status: dict[str, Any] = await response.json()
                return status

        started = time.monotonic()
        for _ in range(10):  # each wave starts once the previous one has its numbers
            statuses = await asyncio.gather(*(join_fast() for _ in range(2_000)))
            waves.append([number(status) for status in statuses])
        took = time.monotonic() - started
    numbers = [n for wave in waves for n in wave]
    assert sorted(numbers) == list(range(1, 20_001))  # unique, no gaps
    for earlier, later in zip(waves, waves[1:], strict=False):
        assert max(earlier) < min(later)
    assert all(s["state"] == "paused" for s in statuses)
    async with queue_client(stack) as client:
        # Re-joining with the ticket (header or cookie) keeps the place.
        last = statuses[-5:]
        for status in last:
            again = await join(client, **{"X-Queue-Ticket": status["ticket"]})
            assert number(again) == number(status)
        by_cookie = await client.post(
            "/queue/join", headers={"Cookie": f"meterai_ticket={last[0]['ticket']}"}
        )
        assert number(by_cookie.json()) == number(last[0])
    async with stack.client() as gateway:
        view = await room_view(gateway)
    assert view["issued"] == 20_000 and view["length"] == 20_000
    print(f"20,000 joins in {took:.1f} s")


@pytest.mark.settings(queue={"admit_per_minute": 0, "join_limit_per_ip": 0})
async def test_admission_over_a_minute_stays_within_five_percent_of_the_rate(
    stack: ServiceStack,
) -> None:
    rate = 1_200
    await set_room(stack, paused=True)
    async with queue_client(stack) as client:
        # In waves no larger than the client's pool: requests queued in httpx's pool cost it
        # time that grows with the queue's length, enough on a slow machine to time them out.
        for _ in range(8):
            await asyncio.gather(*(join(client) for _ in range(200)))
    await set_room(stack, paused=False, admit_per_minute=rate, max_active=100_000)
    async with stack.client() as gateway:
        first = await room_view(gateway)
        started = time.monotonic()
        await asyncio.sleep(60)
        last = await room_view(gateway)
        elapsed = time.monotonic() - started
    admitted = last["admitted"] - first["admitted"]
    per_minute = admitted / elapsed * 60
    assert abs(per_minute - rate) <= 0.05 * rate, (admitted, elapsed)
    assert last["active"] == last["admitted"] <= 100_000


@pytest.mark.settings(queue={"session_seconds": 1.5, "join_limit_per_ip": 0})
async def test_max_active_is_never_exceeded(stack: ServiceStack) -> None:
    await set_room(stack, paused=True)
    async with queue_client(stack) as client:
        await asyncio.gather(*(join(client) for _ in range(300)))
    await set_room(stack, paused=False, admit_per_minute=60_000, max_active=25)
    peak = 0
    async with stack.client() as gateway:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, (await room_view(gateway))["active"])
            await asyncio.sleep(0.05)
        view = await room_view(gateway)
    assert peak == 25  # reached, never passed
    # Sessions that nobody extends end, and their slots go to the next people.
    assert view["admitted"] > 50


@pytest.mark.settings(queue={"ticket_ttl_seconds": 1.0, "join_limit_per_ip": 0})
async def test_abandoned_places_hold_nobody_up(stack: ServiceStack) -> None:
    await set_room(stack, paused=True)
    async with queue_client(stack) as client:
        tickets = [(await join(client))["ticket"] for _ in range(10)]
        present, gone = tickets[1::2], tickets[0::2]
        stop = asyncio.Event()

        async def keep_polling(ticket: str) -> None:
            while not stop.is_set():
                response = await client.get("/queue/status", headers={"X-Queue-Ticket": ticket})
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.2)

        pollers = [asyncio.create_task(keep_polling(ticket)) for ticket in present]
        await asyncio.sleep(2.5)  # the others miss their polls
        await set_room(stack, paused=False, admit_per_minute=6_000)

        async def everyone_present_admitted() -> bool:
            states = [
                (await client.get("/queue/status", headers={"X-Queue-Ticket": t})).json()
                for t in present
            ]
            return all(state["state"] == "admitted" for state in states)

        await wait_for(everyone_present_admitted, within=15)
        stop.set()
        await asyncio.gather(*pollers)
        for ticket in gone:
            response = await client.get("/queue/status", headers={"X-Queue-Ticket": ticket})
            assert response.status_code == 410
            assert response.json()["code"] == "ticket_expired"
    async with stack.client() as gateway:
        assert (await room_view(gateway))["admitted"] == 5


@pytest.mark.settings(queue={"join_limit_per_ip": 0})
async def test_the_prequeue_is_drawn_at_random_at_the_opening(stack: ServiceStack) -> None:
    opens_at = datetime.now(UTC) + timedelta(seconds=3)
    await set_room(stack, paused=True, opens_at=opens_at.isoformat())
    async with queue_client(stack) as client:
        early = [await join(client) for _ in range(40)]
        assert {status["state"] for status in early} == {"prequeue"}
        assert all(0 < status["opens_in_seconds"] <= 3 for status in early)

        async def drawn() -> list[int] | None:
            statuses = [
                (await client.get("/queue/status", headers={"X-Queue-Ticket": s["ticket"]})).json()
                for s in early
            ]
            if any(status["state"] == "prequeue" for status in statuses):
                return None
            return [number(status) for status in statuses]

        numbers = await wait_for(drawn, within=15)
        assert sorted(numbers) == list(range(1, 41))
        assert numbers != sorted(numbers)  # drawn at random, not by arrival
        latecomer = await join(client)
        assert number(latecomer) == 41


@pytest.mark.settings(queue={"join_limit_per_ip": 0})
async def test_proof_of_work_when_operators_ask_for_it(stack: ServiceStack) -> None:
    await set_room(stack, pow_difficulty=10)
    await asyncio.sleep(0.5)  # every replica's view refreshes within 250 ms
    async with queue_client(stack) as client:
        asked = await client.post("/queue/join")
        assert asked.status_code == 428
        problem = asked.json()
        assert problem["code"] == "pow_required" and problem["difficulty"] == 10
        proof = solve(problem["challenge"], 10)
        assert (await client.post("/queue/join", headers={"X-Queue-Proof": proof})).is_success
        # One solution buys one place.
        reused = await client.post("/queue/join", headers={"X-Queue-Proof": proof})
        assert reused.status_code == 428
        wrong = f"{problem['challenge']}:not-a-solution"
        assert (
            await client.post("/queue/join", headers={"X-Queue-Proof": wrong})
        ).status_code == 428
    await set_room(stack, pow_difficulty=0)


@pytest.mark.settings(queue={"join_limit_per_ip": 3, "join_limit_window_seconds": 60})
async def test_joins_are_limited_per_address(stack: ServiceStack) -> None:
    # Through the gateway, which forwards the caller's address; no cookies kept.
    async with create_http_client(stack.gateway_url) as client:
        for _ in range(3):
            assert (await client.post("/queue/join")).status_code == 200
        refused = await client.post("/queue/join")
        assert refused.status_code == 429
        assert refused.json()["code"] == "join_limited"
        assert refused.headers["retry-after"] == "60"
    async with queue_client(stack) as direct:  # another address still gets in
        other = await direct.post("/queue/join", headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 200


@pytest.mark.settings(
    queue={"join_limit_per_ip": 2, "join_limit_window_seconds": 60, "trusted_proxy_hops": 2},
    gateway={"trusted_proxy_hops": 1},
)
async def test_behind_a_load_balancer_each_applicant_has_its_own_join_limit(
    stack: ServiceStack,
) -> None:
    # The load balancer (here at 127.0.0.2, which uvicorn does not trust by itself) says who
    # called in X-Forwarded-For and the gateway appends its peer, the balancer: without
    # counting that hop, every applicant would share the balancer's join limit.
    balancer = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=stack.gateway_url, transport=balancer) as client:

        async def join_from(address: str) -> httpx.Response:
            client.cookies.clear()  # a new applicant each time, not a refresh
            return await client.post("/queue/join", headers={"X-Forwarded-For": address})

        for _ in range(2):
            assert (await join_from("198.51.100.1")).status_code == 200
        refused = await join_from("198.51.100.1")
        assert refused.status_code == 429 and refused.json()["code"] == "join_limited"
        other = await join_from("198.51.100.2")
        assert other.status_code == 200, other.text


async def test_a_tampered_ticket_is_no_ticket(stack: ServiceStack) -> None:
    async with queue_client(stack) as client:
        await join(client)
        ticket = (await join(client))["ticket"]  # number 2: number 1 exists, so "n.1." does
        kind, value, signature = ticket.split(".")
        for forged in (f"{kind}.{int(value) + 1}.{signature}", f"{kind}.1.{signature}", "n.1.x"):
            response = await client.get("/queue/status", headers={"X-Queue-Ticket": forged})
            assert response.status_code == 404 and response.json()["code"] == "no_ticket"
