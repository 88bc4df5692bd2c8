"""Acceptance: 2,000 concurrent purchases from distributors and applicants against 1,000
serials, through the gateway. Exactly 1,000 sold, none twice, the rest `sold_out`, and the
books reconcile to the rupiah - also when clients retry with the same Idempotency-Keys."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from click.testing import CliRunner

from meterai.cli import main as meterai
from tests.harness import ServiceStack
from tests.paysim import PaymentProvider

pytestmark = [
    pytest.mark.workers(0),
    pytest.mark.timeout(400),
    # Every service shares this test's one process and core: requests queue for far longer
    # than in production, where a 10 s wait for a connection rightly becomes a 503, and the
    # gateway's in-flight budgets (sized for services on their own cores) would shed most of
    # the crowd. This test is about what is sold; shedding has its own (gateway/test_overload).
    pytest.mark.settings(
        inventory={"db_pool_timeout_seconds": 300},
        gateway={
            "upstream_timeout_seconds": 300,
            "max_in_flight_per_upstream": 4096,
            "max_in_flight_per_class": {"read": 4096, "room": 4096, "write": 4096, "upload": 64},
        },
    ),
]

SERIALS = 1_000
DISTRIBUTORS = 4
DISTRIBUTOR_REQUESTS = 1_000
APPLICANTS = 500  # two requests each, the most an applicant may hold
CONNECTIONS = 100  # per client (httpx's default): each distributor's 1,000 share theirs


@dataclass
class Outcome:
    key: str
    who: str
    responses: list[httpx.Response]


@dataclass
class Client:
    """An HTTP client and its connections: a request waits for one of them here, not in
    httpcore's pool, which scans every waiting request each time it hands one out (with a
    thousand of them waiting, that scan took most of this test's CPU and time)."""

    http: httpx.AsyncClient
    connections: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTIONS))


async def _post(client: Client, headers: dict[str, str]) -> httpx.Response:
    """One purchase, as a well-behaved client makes it: it resends when the connection breaks
    (which the Idempotency-Key makes safe), and when the gateway sheds or limits the request
    (503 `overloaded`, 429: never forwarded, so always safe) it comes back after Retry-After,
    with jitter so that the refused do not all return in the same instant."""
    deadline = time.monotonic() + 80
    while True:
        try:
            async with client.connections:
                response = await client.http.post(
                    "/api/v1/purchases", json={"quantity": 1}, headers=headers
                )
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        refused = response.status_code in (429, 503)
        if not refused or response.json().get("code") not in ("overloaded", "rate_limited"):
            return response
        if time.monotonic() > deadline:
            return response
        pause = float(response.headers["retry-after"]) * random.uniform(0.5, 1.5)  # noqa: S311
        await asyncio.sleep(pause)


async def _buy(client: Client, who: str, retries: bool, rng: random.Random) -> Outcome:
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    attempts = 1 + (rng.choice([0, 1, 1, 2]) if retries else 0)
    # Some retries race the first attempt (a client that timed out), others follow it.
    racing = [_post(client, headers)]
    if attempts > 1 and rng.random() < 0.5:
        racing.append(_post(client, headers))
    responses = list(await asyncio.gather(*racing))
    for _ in range(attempts - len(racing)):
        await asyncio.sleep(rng.random() / 10)
        responses.append(await _post(client, headers))
    return Outcome(key, who, responses)


async def _surge(stack: ServiceStack, *, retries: bool) -> None:
    rng = random.Random(20240903)
    await stack.mint(SERIALS)
    keys = [
        await stack.create_distributor(balance=DISTRIBUTOR_REQUESTS * 10_000)
        for _ in range(DISTRIBUTORS)
    ]
    limits = httpx.Limits(max_connections=CONNECTIONS)
    distributors = [
        Client(
            httpx.AsyncClient(
                base_url=stack.gateway_url,
                headers={"Authorization": f"Bearer {key}"},
                timeout=300,
                limits=limits,
            )
        )
        for key in keys
    ]
    applicants = [
        Client(stack.applicant(ticket, timeout=300)) for ticket in range(1, APPLICANTS + 1)
    ]
    try:
        tasks = [
            _buy(distributors[n % DISTRIBUTORS], f"d{n % DISTRIBUTORS}", retries, rng)
            for n in range(DISTRIBUTOR_REQUESTS)
        ] + [
            _buy(applicants[n % APPLICANTS], f"a{n % APPLICANTS}", retries, rng)
            for n in range(2 * APPLICANTS)
        ]
        rng.shuffle(tasks)
        outcomes = await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.http.aclose() for c in [*distributors, *applicants]))

    sold: list[str] = []
    statuses: Counter[int] = Counter()
    for outcome in outcomes:
        codes = {response.status_code for response in outcome.responses}
        assert codes <= {201, 409}, [r.text for r in outcome.responses]
        winners = [r.json() for r in outcome.responses if r.status_code == 201]
        # Every attempt that succeeded with one key shows the one and only purchase.
        assert len({w["id"] for w in winners}) <= 1
        if winners:
            statuses[201] += 1
            sold.extend(winners[0]["serials"])
        else:
            statuses[409] += 1
            assert {r.json()["code"] for r in outcome.responses} == {"sold_out"}
    assert statuses == {201: SERIALS, 409: 2_000 - SERIALS}, statuses
    assert len(sold) == len(set(sold)) == SERIALS

    # Applicants pay for some reservations through the provider; the rest stay pending.
    provider = PaymentProvider.for_stack(stack)
    paid = 0
    for outcome in outcomes:
        winners = [r.json() for r in outcome.responses if r.status_code == 201]
        if outcome.who.startswith("a") and winners and paid < 50:
            event = {
                "event_id": f"evt_{uuid.uuid4().hex}",
                "reference": winners[0]["payment_reference"],
                "amount": 10_000,
                "status": "paid",
            }
            delivery = await provider.deliver(event)
            assert delivery.body == {"outcome": "applied"}
            paid += 1

    # The operator's reconciliation agrees, to the rupiah and the stamp.
    result = await asyncio.to_thread(
        CliRunner().invoke,
        meterai,
        ["reconcile"],
        env={"METERAI_INVENTORY_DATABASE_URL": stack.inventory_db},
    )
    assert result.exit_code == 0, result.output
    assert "ledger, balances and serials agree" in result.output
    assert "serials_available" not in result.output  # every serial found its buyer


async def test_two_thousand_buyers_for_a_thousand_serials(stack: ServiceStack) -> None:
    await _surge(stack, retries=False)


async def test_the_same_outcome_when_clients_retry_with_their_keys(stack: ServiceStack) -> None:
    await _surge(stack, retries=True)
