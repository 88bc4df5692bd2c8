"""A scratch database with the platform's throwaway tables, on the session's real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.platform.db import create_engine
from tests.harness import Infrastructure
from tests.platform.scratch import metadata


@pytest.fixture(scope="session")
async def scratch_database(infra: Infrastructure) -> AsyncIterator[str]:
    """The URL of a fresh database holding `tests.platform.scratch.metadata`."""
    name = f"t_platform_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.postgres.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = infra.postgres.url(name)
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
    finally:
        await engine.dispose()
    try:
        yield url
    finally:
        await infra.drop_database(url)
