"""How `services.platform.serve` runs a service: once started (its lifespan done), what startup
built is frozen out of the collector's sight and the youngest generation is collected less
often; a request is served as before."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.platform.serve import GC_THRESHOLD, HTTP, LOOP, _Server
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
