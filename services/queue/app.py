"""The queue service: the virtual waiting room."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis
from fastapi import FastAPI

from services.platform.admission import AdmissionCodec
from services.platform.app import create_service_app
from services.platform.health import HealthChecks
from services.queue.config import QueueSettings
from services.queue.pages import pages
from services.queue.room import Room
from services.queue.router import ops, router


def create_app(settings: QueueSettings | None = None) -> FastAPI:
    """Build the queue app; the Redis client is created in the lifespan."""
    settings = settings or QueueSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        app.state.room = room = Room(redis, settings.event, settings.admit_per_minute)
        app.state.admission_codec = AdmissionCodec(
            settings.admission_secret.get_secret_value(),
            ttl_seconds=settings.admission_ttl_seconds,
        )
        admission = asyncio.create_task(
            room.run_admission(settings.tick_seconds, f"{socket.gethostname()}-{os.getpid()}"),
            name="admission",
        )
        health: HealthChecks = app.state.health
        health.add("redis", redis.ping)
        try:
            yield
        finally:
            admission.cancel()
            with suppress(asyncio.CancelledError):
                await admission
            await redis.aclose()

    return create_service_app(
        service="queue",
        title="Meterai waiting room",
        settings=settings,
        lifespan=lifespan,
        # The pages come first: their `GET /` is the applicant's page.
        routers=[pages, router, ops],
    )
