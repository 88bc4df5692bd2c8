"""Direct routes (`ServiceApp.add_direct_route`): the server answers them itself, at once or
after an await, with the request id, metrics and problem documents of the other lanes; what
it does not answer directly goes the usual way, and answers on a connection keep their order.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable

import httpx
import pytest
from fastapi import APIRouter
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from services.platform.app import SecurityHeadersMiddleware, ServiceApp
from services.platform.direct import Answer, json_answer
from services.platform.errors import Conflict
from tests.harness import Served
from tests.platform.apps import asgi_client, assert_problem, service_app
from tests.platform.test_observability import sample

REQUESTS = "meterai_direct_http_requests_total"

router = APIRouter()


@router.get("/slow")
async def slow() -> dict[str, str]:
    await asyncio.sleep(0.3)
    return {"lane": "slow"}


def header(scope: Scope, name: bytes) -> str:
    return next((v.decode() for n, v in scope["headers"] if n == name), "")


class Direct:
    """The direct answers, counting the calls the server made."""

    def __init__(self) -> None:
        self.calls = 0

    def now(self, scope: Scope) -> Answer | None:
        self.calls += 1
        mode = header(scope, b"x-mode")
        if mode == "none":
            return None  # e.g. the answer needs the store: the hot route answers
        if mode == "raise":
            raise RuntimeError("not now")
        return json_answer({"lane": "direct"}, [(b"x-extra", b"1")])

    def later(self, scope: Scope) -> Awaitable[Answer]:
        self.calls += 1
        return self._later(header(scope, b"x-mode"))

    async def _later(self, mode: str) -> Answer:
        await asyncio.sleep(0.5 if mode == "slow" else 0.05)
        if mode == "conflict":
            raise Conflict("Taken.", extra={"item": "x"})
        if mode == "crash":
            raise RuntimeError("boom")
        return json_answer({"lane": "later"})


async def hot(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"lane": "hot"})(scope, receive, send)


@pytest.fixture(scope="module")
def direct() -> Direct:
    return Direct()


@pytest.fixture(scope="module")
def app(direct: Direct) -> ServiceApp:
    app = service_app("direct", [router])
    app.add_hot_route("GET", "/now", hot)
    app.add_direct_route("GET", "/now", direct.now)
    app.add_hot_route("POST", "/later", hot)
    app.add_direct_route("POST", "/later", direct.later)
    return app


@pytest.fixture
async def served(app: ServiceApp) -> AsyncIterator[Served]:
    server = Served(app)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def count(client: httpx.AsyncClient, method: str, route: str, status: int) -> float:
    labels = {"method": method, "route": route, "status": str(status)}
    return sample((await client.get("/metrics")).text, REQUESTS, **labels)


async def test_the_server_answers_a_direct_route_with_request_id_date_and_metrics(
    served: Served, direct: Direct
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as client:
        before, calls = await count(client, "GET", "/now", 200), direct.calls
        answers = [await client.get("/now") for _ in range(20)]  # one keep-alive connection
        mine = await client.get("/now", headers={"x-request-id": "edge-request-0003"})
        assert await count(client, "GET", "/now", 200) - before == 21
    assert direct.calls - calls == 21
    for answer in answers:
        assert answer.status_code == 200
        assert answer.json() == {"lane": "direct"}
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-extra"] == "1"
        assert answer.headers["date"].endswith(" GMT")
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    assert len({answer.headers["x-request-id"] for answer in answers}) == 20
    assert mine.headers["x-request-id"] == "edge-request-0003"


async def test_what_a_direct_route_cannot_answer_at_once_goes_the_usual_way(
    served: Served, direct: Direct
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as client:
        before, calls = await count(client, "GET", "/now", 200), direct.calls
        declined = await client.get("/now", headers={"x-mode": "none"})
        raised = await client.get("/now", headers={"x-mode": "raise"})
        assert await count(client, "GET", "/now", 200) - before == 2  # each counted once
    assert direct.calls - calls == 2
    assert declined.json() == raised.json() == {"lane": "hot"}
    assert "x-extra" not in declined.headers
    assert re.fullmatch(r"[0-9a-f]{32}", raised.headers["x-request-id"])


async def test_requests_the_server_does_not_answer_directly(served: Served, direct: Direct) -> None:
    calls = direct.calls
    async with httpx.AsyncClient(base_url=served.url) as client:
        with_query = await client.get("/now", params={"q": "1"})
        with_body = await client.request("GET", "/now", content=b"{}")
        closing = await client.get("/now", headers={"connection": "close"})
        head = await client.head("/now")
        posted = await client.post("/later", json={"a": 1})
    assert [a.json() for a in (with_query, with_body, closing, posted)] == [{"lane": "hot"}] * 4
    assert head.status_code == 200 and head.content == b""
    old = await raw(served.port, b"GET /now HTTP/1.0\r\nHost: x\r\n\r\n", answers=1)
    assert old[0][1] == b'{"lane":"hot"}'
    assert direct.calls == calls


async def test_an_awaited_direct_answer_and_its_errors_as_problem_documents(
    served: Served, direct: Direct
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as client:
        before = await count(client, "POST", "/later", 200)
        later = await client.post("/later", headers={"content-length": "0"})
        taken = await client.post("/later", headers={"x-mode": "conflict"})
        crash = await client.post(
            "/later", headers={"x-mode": "crash", "x-request-id": "edge-request-0004"}
        )
        assert await count(client, "POST", "/later", 200) - before == 1
        assert await count(client, "POST", "/later", 409) >= 1
        assert await count(client, "POST", "/later", 500) >= 1
        still = await client.post("/later")  # the connection still serves
    assert later.json() == still.json() == {"lane": "later"}
    assert re.fullmatch(r"[0-9a-f]{32}", later.headers["x-request-id"])
    assert assert_problem(taken, 409, "conflict")["item"] == "x"
    assert_problem(crash, 500, "internal_error")
    assert crash.headers["x-request-id"] == "edge-request-0004"


async def test_answers_on_a_connection_keep_the_order_of_its_requests(served: Served) -> None:
    # Pipelined: a direct answer awaited, then a slow usual one, then a direct one; and a
    # slow usual one first, which the direct route behind it waits for.
    answers = await raw(
        served.port,
        b"POST /later HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /later HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n",
        answers=6,
    )
    lanes = [body.decode() for _, body in answers]
    assert lanes == [
        '{"lane":"later"}',
        '{"lane":"slow"}',
        '{"lane":"hot"}',  # behind an answer in progress: the usual way, in its turn
        '{"lane":"slow"}',
        '{"lane":"hot"}',
        '{"lane":"hot"}',
    ]


async def test_a_client_gone_before_its_awaited_answer_does_not_stop_the_server(
    served: Served,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /later HTTP/1.1\r\nHost: x\r\nX-Mode: slow\r\n\r\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.7)  # the answer is ready after the connection is gone
    async with httpx.AsyncClient(base_url=served.url) as client:
        assert (await client.post("/later")).json() == {"lane": "later"}


async def test_a_stopping_server_finishes_an_awaited_answer_then_closes(app: ServiceApp) -> None:
    server = Served(app)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /later HTTP/1.1\r\nHost: x\r\nX-Mode: slow\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop())
        head, body = await read_answer(reader)
        assert body == b'{"lane":"later"}'
        assert b"\r\nconnection: close\r\n" in head.lower()
        assert await reader.read() == b""  # then the server closes the connection
        writer.close()
        await stopping
    finally:
        await server.stop()


async def test_over_the_servers_concurrency_limit_the_usual_503(
    app: ServiceApp, direct: Direct
) -> None:
    calls = direct.calls
    server = Served(app)
    server.server.config.limit_concurrency = 1  # every connection is one too many
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            refused = await client.get("/now")
    finally:
        await server.stop()
    assert refused.status_code == 503
    assert refused.text == "Service Unavailable"  # uvicorn's own answer
    assert direct.calls == calls


async def test_in_process_a_direct_route_goes_the_usual_way(
    app: ServiceApp, direct: Direct
) -> None:
    calls = direct.calls
    async with asgi_client(app) as client:
        assert (await client.get("/now")).json() == {"lane": "hot"}
    assert direct.calls == calls


def test_a_direct_route_has_a_fixed_path_and_no_edge_middleware() -> None:
    with pytest.raises(ValueError, match="fixed path"):
        service_app("directpath").add_direct_route("GET", "/items/{item_id}", Direct().now)
    guarded = service_app("directedge")
    guarded.add_edge_middleware(SecurityHeadersMiddleware, hsts_seconds=0)
    with pytest.raises(ValueError, match="edge middleware"):
        guarded.add_direct_route("GET", "/now", Direct().now)
    direct = service_app("directfirst")
    direct.add_direct_route("GET", "/now", Direct().now)
    with pytest.raises(ValueError, match="edge middleware"):
        direct.add_edge_middleware(SecurityHeadersMiddleware, hsts_seconds=0)


async def raw(port: int, requests: bytes, *, answers: int) -> list[tuple[bytes, bytes]]:
    """Send `requests` in one write and read `answers` responses: (head, body) each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(requests)
        await writer.drain()
        return [await asyncio.wait_for(read_answer(reader), 10) for _ in range(answers)]
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
    assert length is not None, head
    return head, await reader.readexactly(int(length.group(1)))
