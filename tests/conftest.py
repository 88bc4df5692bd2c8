"""Session-wide real infrastructure and a per-test stack of real services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Infrastructure, ServiceStack, running_stack, start_infrastructure


@pytest.fixture(scope="session")
async def infra(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Infrastructure]:
    """PostgreSQL, Redis and the Kafka-protocol broker, started once per session."""
    root = tmp_path_factory.mktemp("infra")
    infrastructure = await start_infrastructure(root)
    try:
        yield infrastructure
    finally:
        await infrastructure.supervisor.stop()


@pytest.fixture
async def stack(infra: Infrastructure, tmp_path: Path) -> AsyncIterator[ServiceStack]:
    """All services of Meterai with fresh databases, topics and room, one signing worker."""
    async with running_stack(infra, tmp_path) as started:
        yield started


@pytest.fixture(scope="module")
async def shared_stack(
    infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceStack]:
    """One stack for a whole module, for tests that isolate themselves (own distributors)."""
    async with running_stack(infra, tmp_path_factory.mktemp("shared")) as started:
        yield started
