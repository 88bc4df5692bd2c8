"""Session-wide real infrastructure and a per-test stack of real services."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Infrastructure, ServiceStack, running_stack, start_infrastructure
from tests.leaks import trace_stream_writers
from tests.paysim import PaymentProvider


@pytest.fixture(scope="session")
async def infra() -> AsyncIterator[Infrastructure]:
    """PostgreSQL, Redis and the Kafka-protocol broker, started once per session.

    Their data lives outside pytest's temporary folders: another pytest session on the same
    machine prunes old folders there, and would delete a running server's data.
    """
    root = Path(tempfile.mkdtemp(prefix="meterai-test-infra-"))
    try:
        infrastructure = await start_infrastructure(root)
        try:
            yield infrastructure
        finally:
            await infrastructure.supervisor.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    trace_stream_writers()
    config.addinivalue_line("markers", "workers(n): signing workers the `stack` fixture starts")
    config.addinivalue_line(
        "markers", "settings(**per_service): setting overrides for the `stack` fixture"
    )


@pytest.fixture
async def stack(
    infra: Infrastructure, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceStack]:
    """All services of Meterai with fresh databases, topics and room, and signing workers
    (one unless the test is marked `@pytest.mark.workers(n)`)."""
    marker = request.node.get_closest_marker("workers")
    workers = marker.args[0] if marker else 1
    settings = request.node.get_closest_marker("settings")
    overrides = settings.kwargs if settings else {}
    async with running_stack(infra, tmp_path, workers=workers, overrides=overrides) as started:
        yield started


@pytest.fixture(scope="module")
async def shared_stack(
    infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceStack]:
    """One stack for a whole module, for tests that isolate themselves (own distributors)."""
    async with running_stack(infra, tmp_path_factory.mktemp("shared")) as started:
        yield started


@pytest.fixture
async def provider(stack: ServiceStack) -> AsyncIterator[httpx.AsyncClient]:
    """The payment provider (a real HTTP server), pointed at the stack's notify URL; a client
    of its own API (`POST /charges` pays a reference and sends the callback)."""
    simulator = PaymentProvider.for_stack(stack)
    url = await simulator.start()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client
    finally:
        await simulator.stop()
