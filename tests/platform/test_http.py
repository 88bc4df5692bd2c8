"""Calls between services carry the caller's principal token and the current request id."""

from __future__ import annotations

import httpx
import pytest
import structlog
from fastapi import APIRouter, FastAPI, Request

from services.platform.http import ServiceClient, create_http_client, forwarded_client
from services.platform.identity import CallingService, Principal, PrincipalCodec, PrincipalKind
from tests.platform.apps import INTERNAL_SECRET, service_app

router = APIRouter()


@router.get("/internal/echo")
async def echo(caller: CallingService, request: Request) -> dict[str, str | None]:
    return {"caller": caller.owner_key, "request_id": request.headers.get("x-request-id")}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return service_app("pthttp", [router])


async def test_the_default_client_has_timeouts_everywhere() -> None:
    async with create_http_client("http://inventory", timeout=7.0, connect_timeout=1.5) as client:
        assert client.timeout == httpx.Timeout(7.0, connect=1.5)
        assert str(client.base_url) == "http://inventory"


async def test_a_service_client_sends_its_principal_and_the_bound_request_id(app: FastAPI) -> None:
    codec = PrincipalCodec(INTERNAL_SECRET)
    caller = Principal(PrincipalKind.service, "stamping")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://inventory") as http:
        client = ServiceClient(http, codec, caller)
        structlog.contextvars.clear_contextvars()
        without_id = await client.request("GET", "/internal/echo")
        structlog.contextvars.bind_contextvars(request_id="job-1234-abcdef")
        try:
            with_id = await client.request("GET", "/internal/echo")
            overridden = await client.request(
                "GET", "/internal/echo", headers={"x-request-id": "explicit-id-0001"}
            )
        finally:
            structlog.contextvars.clear_contextvars()
    assert without_id.status_code == 200, without_id.text
    assert without_id.json() == {"caller": "service:stamping", "request_id": None}
    assert with_id.json() == {"caller": "service:stamping", "request_id": "job-1234-abcdef"}
    assert overridden.json()["request_id"] == "explicit-id-0001"


@pytest.mark.parametrize(
    ("forwarded", "hops", "expected"),
    [
        (None, 1, "10.0.0.9"),  # no header: the peer
        ("203.0.113.7", 0, "10.0.0.9"),  # no proxy trusted: the header is ignored
        ("203.0.113.7", 1, "203.0.113.7"),  # what the gateway saw
        ("1.2.3.4, 203.0.113.7, 10.1.1.1", 2, "203.0.113.7"),  # behind a balancer
        ("forged, 203.0.113.7", 1, "203.0.113.7"),  # the caller's own entries do not count
        ("203.0.113.7", 3, "203.0.113.7"),  # fewer entries than hops: the first
        (" " + "a" * 100, 1, "a" * 64),  # bounded: it keys rate limits
    ],
)
def test_the_caller_is_the_entry_the_trusted_proxies_saw(
    forwarded: str | None, hops: int, expected: str
) -> None:
    assert forwarded_client("10.0.0.9", forwarded, hops) == expected
