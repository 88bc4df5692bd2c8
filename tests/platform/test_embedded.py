"""The embedded servers are real: Redis keeps its data across a restart (append-only file)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.platform.embedded import EmbeddedRedis, free_port, tcp_open
from services.platform.supervisor import Supervisor


async def test_embedded_redis_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    key, value = f"counter:{uuid.uuid4().hex}", b"41"

    first = Supervisor(lambda message: None)
    try:
        await first.start_group([server.spec(tmp_path / "logs" / "redis.log")])
        client = aioredis.Redis.from_url(server.url())
        try:
            await client.set(key, value)
            assert await client.incr(key) == 42
        finally:
            await client.aclose()
    finally:
        await first.stop()
    assert first.find("redis").returncode is not None  # really stopped: the data is on disk
    assert any((tmp_path / "redis").rglob("*.aof")), "no append-only file was written"

    second = Supervisor(lambda message: None)
    try:
        await second.start_group([server.spec(tmp_path / "logs" / "redis.log")])
        client = aioredis.Redis.from_url(server.url())
        try:
            assert await client.get(key) == b"42"
        finally:
            await client.aclose()
    finally:
        await second.stop()


async def test_tcp_open_tells_a_listening_port_from_a_closed_one(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    supervisor = Supervisor(lambda message: None)
    try:
        await supervisor.start_group([server.spec()])
        await tcp_open(server.host, server.port)
    finally:
        await supervisor.stop()
    with pytest.raises(OSError):
        await tcp_open(server.host, server.port)
