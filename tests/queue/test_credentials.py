"""An admission credential stays with the ticket it was issued for (issue 5, acceptance 3).

Whatever ticket travels with it, a credential buys as its own ticket's applicant; another
ticket's poll neither extends it nor turns it into that ticket's credential; a credential is
not a place in the queue; and the ticket written in it cannot be rewritten. (Forged, expired,
tampered and other-event credentials: tests/inventory/test_payments.py.)
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from tests.harness import OPS_TOKEN, ServiceStack, wait_for

pytestmark = pytest.mark.workers(0)

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
TICKET_COOKIE = "meterai_ticket"
ADMISSION_COOKIE = "meterai_admission"


@dataclass
class Applicant:
    ticket: str  # the queue ticket, as the room gave it
    number: int
    credential: str | None = None


async def send(
    stack: ServiceStack,
    method: str,
    path: str,
    *,
    ticket: str | None = None,
    credential: str | None = None,
    ticket_cookie: str | None = None,
    credential_cookie: str | None = None,
    json_body: dict[str, Any] | None = None,
) -> httpx.Response:
    """One request through the gateway with exactly these tickets and credentials (a fresh
    client each time, so that no cookie jar adds anything)."""
    headers = {}
    if ticket is not None:
        headers["X-Queue-Ticket"] = ticket
    if credential is not None:
        headers["X-Admission-Token"] = credential
    cookies = {TICKET_COOKIE: ticket_cookie, ADMISSION_COOKIE: credential_cookie}
    cookie = "; ".join(f"{name}={value}" for name, value in cookies.items() if value is not None)
    if cookie:
        headers["Cookie"] = cookie
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        return await client.request(method, path, headers=headers, json=json_body)


def ticket_number(ticket: str) -> int:
    kind, value, _ = ticket.split(".")
    assert kind == "n"
    return int(value)


def claims(credential: str) -> dict[str, Any]:
    """What a credential says (read without the secret, as anyone holding it can)."""
    read: dict[str, Any] = jwt.decode(credential, options={"verify_signature": False})
    return read


def set_cookies(response: httpx.Response) -> str:
    return " | ".join(response.headers.get_list("set-cookie"))


async def set_room(stack: ServiceStack, **changes: Any) -> None:
    async with stack.client() as client:
        response = await client.patch("/ops/queue", json=changes, headers=OPS)
        assert response.status_code == 200, response.text


async def admitted(stack: ServiceStack, applicant: Applicant) -> Applicant:
    """Poll as `applicant` (their own ticket only) until the room admits them."""

    async def poll() -> dict[str, Any] | None:
        response = await send(stack, "GET", "/queue/status", ticket=applicant.ticket)
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        return status if status["state"] == "admitted" else None

    status = await wait_for(poll, within=15, interval=0.2)
    applicant.credential = status["admission_token"]
    assert applicant.credential
    return applicant


async def alice_admitted_and_bob_waiting(stack: ServiceStack) -> tuple[Applicant, Applicant]:
    """Two applicants, Alice first in line; only one may be admitted at a time, so Alice is
    admitted and Bob, right behind her, waits."""
    await set_room(stack, paused=True)
    joined = []
    for _ in range(2):
        response = await send(stack, "POST", "/queue/join")
        assert response.status_code == 200, response.text
        ticket = response.json()["ticket"]
        joined.append(Applicant(ticket, ticket_number(ticket)))
    alice, bob = joined
    assert alice.number < bob.number
    await set_room(stack, paused=False, admit_per_minute=6000, max_active=1)
    await admitted(stack, alice)
    return alice, bob


def moved(credential: str, number: int) -> str:
    """`credential` with the ticket it names rewritten to `number`, its signature kept."""
    header, payload, signature = credential.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["tk"] = number
    rewritten = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode())
    return f"{header}.{rewritten.rstrip(b'=').decode()}.{signature}"


async def test_another_tickets_poll_neither_extends_nor_takes_over_a_credential(
    stack: ServiceStack,
) -> None:
    alice, bob = await alice_admitted_and_bob_waiting(stack)
    assert alice.credential is not None
    assert claims(alice.credential)["tk"] == alice.number
    assert claims(alice.credential)["ev"] == stack.event

    # Bob polls with his ticket and Alice's credential, as header and as cookie, or with both
    # as cookies: he still waits, right behind her, and gets no credential, neither a new one
    # of his own nor Alice's renewed.
    ways: list[dict[str, Any]] = [
        {"ticket": bob.ticket, "credential": alice.credential},
        {"ticket": bob.ticket, "credential_cookie": alice.credential},
        {"ticket_cookie": bob.ticket, "credential_cookie": alice.credential},
    ]
    for presented in ways:
        response = await send(stack, "GET", "/queue/status", **presented)
        assert response.status_code == 200, response.text
        status = response.json()
        assert status["state"] == "waiting" and status["position"] == 1, (presented, status)
        assert status["admission_token"] is None
        assert status["ticket"] == bob.ticket
        assert ADMISSION_COOKIE not in set_cookies(response)
        joined = await send(stack, "POST", "/queue/join", **presented)  # a re-join, the same
        assert joined.json()["ticket"] == bob.ticket and joined.json()["admission_token"] is None

    # A credential is not a place in the queue: alone, it has no status and joins at the back.
    alone = await send(stack, "GET", "/queue/status", credential_cookie=alice.credential)
    assert alone.status_code == 404 and alone.json()["code"] == "no_ticket"
    newcomer = await send(stack, "POST", "/queue/join", credential=alice.credential)
    assert newcomer.status_code == 200, newcomer.text
    assert newcomer.json()["state"] == "waiting" and newcomer.json()["admission_token"] is None
    assert ticket_number(newcomer.json()["ticket"]) > bob.number

    # Bob's turn comes (Alice's credential still with him): his credential names his ticket.
    await set_room(stack, max_active=2)

    async def bob_admitted() -> httpx.Response | None:
        response = await send(
            stack, "GET", "/queue/status", ticket=bob.ticket, credential_cookie=alice.credential
        )
        return response if response.json()["state"] == "admitted" else None

    response = await wait_for(bob_admitted, within=15, interval=0.2)
    bob.credential = response.json()["admission_token"]
    assert bob.credential is not None
    assert claims(bob.credential)["tk"] == bob.number
    assert f"{ADMISSION_COOKIE}={bob.credential}" in set_cookies(response)

    # And Alice's poll, with Bob's credential next to her ticket, renews hers, never his.
    response = await send(
        stack, "GET", "/queue/status", ticket=alice.ticket, credential=bob.credential
    )
    renewed = response.json()["admission_token"]
    assert response.json()["state"] == "admitted" and renewed is not None
    assert claims(renewed)["tk"] == alice.number
    assert f"{ADMISSION_COOKIE}={renewed}" in set_cookies(response)


async def test_a_credential_buys_only_as_its_own_ticket(stack: ServiceStack) -> None:
    await stack.mint(4)
    alice, bob = await alice_admitted_and_bob_waiting(stack)
    assert alice.credential is not None

    # Alice's credential, sent along with Bob's ticket (header and cookie), buys as Alice: the
    # stamps count against her limit of two, whichever ticket comes with the credential.
    bought = await send(
        stack,
        "POST",
        "/api/v1/purchases",
        credential=alice.credential,
        ticket=bob.ticket,
        ticket_cookie=bob.ticket,
        json_body={"quantity": 2},
    )
    assert bought.status_code == 201, bought.text
    alices = bought.json()
    over = await send(
        stack,
        "POST",
        "/api/v1/purchases",
        credential_cookie=alice.credential,
        ticket_cookie=bob.ticket,
        json_body={"quantity": 1},
    )
    assert over.status_code == 409 and over.json()["code"] == "applicant_limit", over.text
    assert over.json()["held"] == 2

    # Rewriting the ticket in Alice's credential to Bob's does not make it Bob's.
    as_bob = moved(alice.credential, bob.number)
    assert claims(as_bob)["tk"] == bob.number
    for method, path, body in (
        ("POST", "/api/v1/purchases", {"quantity": 1}),
        ("GET", f"/api/v1/purchases/{alices['id']}", None),
        ("GET", "/api/v1/serials", None),
    ):
        refused = await send(
            stack, method, path, credential=as_bob, ticket=bob.ticket, json_body=body
        )
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["code"] == "invalid_admission"

    # Bob, admitted in turn, is another applicant, whichever ticket he sends along: he does
    # not see Alice's purchase or serials, and his own limit is untouched by her purchase.
    await set_room(stack, max_active=2)
    await admitted(stack, bob)
    assert bob.credential is not None
    hidden = await send(
        stack,
        "GET",
        f"/api/v1/purchases/{alices['id']}",
        credential=bob.credential,
        ticket_cookie=alice.ticket,
    )
    assert hidden.status_code == 404 and hidden.json()["code"] == "not_found"
    own = await send(stack, "GET", f"/api/v1/purchases/{alices['id']}", credential=alice.credential)
    assert own.status_code == 200 and own.json()["serials"] == alices["serials"]
    bobs = await send(
        stack,
        "POST",
        "/api/v1/purchases",
        credential=bob.credential,
        ticket_cookie=alice.ticket,
        json_body={"quantity": 2},
    )
    assert bobs.status_code == 201, bobs.text

    async def serials(credential: str) -> set[str]:
        listed = await send(stack, "GET", "/api/v1/serials", credential=credential)
        assert listed.status_code == 200, listed.text
        return {item["serial"] for item in listed.json()["items"]}

    assert await serials(alice.credential) == set(alices["serials"])
    assert await serials(bob.credential) == set(bobs.json()["serials"])
