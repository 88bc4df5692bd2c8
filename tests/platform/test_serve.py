"""How `services.platform.serve` runs a service: once started (its lifespan done), what startup
built is frozen out of the collector's sight and the youngest generation is collected less
often; a request is served as before."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.platform.serve import (
    GC_THRESHOLD,
    HOLD_BELOW_BYTES,
    HTTP,
    LOOP,
    CoalescingTransport,
    _Server,
)
from tests.harness import free_port


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def test_a_started_service_freezes_startup_objects_and_collects_less_often(
    collector_restored: None,
) -> None:
    built_at_startup: list[object] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        built_at_startup.extend({"row": index} for index in range(1000))
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    port = free_port()
    config = uvicorn.Config(app, port=port, loop=LOOP, http=HTTP, log_config=None)
    server = _Server(config, gc_threshold=GC_THRESHOLD)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the server stopped while starting"
        await asyncio.sleep(0.01)
    try:
        assert gc.get_threshold() == (GC_THRESHOLD, older, oldest)
        assert gc.get_freeze_count() >= len(built_at_startup) == 1000
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/hello")
        assert response.json() == {"hello": "world"}
    finally:
        server.should_exit = True
        await serving


class RecordingTransport:
    """Stands in for the event loop's socket transport: what was handed to the kernel."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.calls.append([data])

    def writelines(self, chunks: Iterable[bytes]) -> None:
        self.calls.append(list(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_a_small_write_waits_for_the_next_and_both_leave_in_one_call() -> None:
    transport = RecordingTransport()
    coalescing = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.calls == []
    coalescing.write(b"{}")
    assert transport.calls == [[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}"]]
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert len(transport.calls) == 1


async def test_a_lone_write_leaves_when_the_loop_turn_ends_and_large_ones_at_once() -> None:
    transport = RecordingTransport()
    coalescing = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    coalescing.write(b"head only")  # a HEAD response, or a body still to come
    await asyncio.sleep(0)
    assert transport.calls == [[b"head only"]]
    large = b"x" * HOLD_BELOW_BYTES
    coalescing.write(large)
    assert transport.calls[-1] == [large]
    # Closing sends what is held first; anything else is the transport's own.
    coalescing.write(b"last words")
    coalescing.close()
    assert transport.calls[-1] == [b"last words"] and transport.closed
    assert coalescing.get_extra_info("peername") == "info:peername"


async def test_a_write_held_when_the_connection_closes_is_dropped_not_written() -> None:
    transport = RecordingTransport()
    coalescing = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    coalescing.write(b"too late")
    transport.closed = True  # the peer went away within the turn
    await asyncio.sleep(0)
    assert transport.calls == []


async def test_a_served_response_arrives_whole_through_the_coalescing_protocol() -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    port = free_port()
    config = uvicorn.Config(app, port=port, http=HTTP, log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the server stopped while starting"
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            # Keep-alive: one connection, the responses one after another.
            answers = [await client.get(f"/items/{n}") for n in range(20)]
            head = await client.head("/items/7")
        assert [a.json() for a in answers] == [{"item": n} for n in range(20)]
        assert head.status_code == 405 and head.content == b""  # a head with no body
    finally:
        server.should_exit = True
        await serving
