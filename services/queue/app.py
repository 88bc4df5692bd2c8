"""The queue service: the virtual waiting room."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI

from services.platform.admission import AdmissionCodec
from services.platform.app import create_service_app
from services.platform.health import HealthChecks
from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalKind
from services.queue.config import QueueSettings
from services.queue.pages import pages
from services.queue.pressure import BackendPressure
from services.queue.room import Room, RoomConfig
from services.queue.router import (
    join_direct,
    join_hot,
    ops,
    router,
    status_direct,
    status_hot,
)
from services.queue.service import WaitingRoom
from services.queue.tickets import ProofOfWork, TicketCodec

log = structlog.get_logger(__name__)


async def keep_fresh(room: Room, interval: float) -> None:
    """Refresh this replica's view of the room and write the polls it saw, every `interval`."""
    while True:
        try:
            await room.flush_seen()
            await room.refresh()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("room_refresh_failed", error=repr(exc))
        await asyncio.sleep(interval)


def create_app(settings: QueueSettings | None = None) -> FastAPI:
    """Build the queue app; the Redis client is created in the lifespan."""
    settings = settings or QueueSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        defaults = RoomConfig(
            admit_per_minute=settings.admit_per_minute,
            max_active=settings.max_active,
            paused=settings.paused,
            pow_difficulty=settings.pow_difficulty,
        )
        room = Room(
            redis,
            settings.event,
            defaults,
            join_limit_per_ip=settings.join_limit_per_ip,
            join_limit_window_seconds=settings.join_limit_window_seconds,
            ticket_ttl_seconds=settings.ticket_ttl_seconds,
            session_seconds=settings.session_seconds,
            rebuild_hold_seconds=settings.rebuild_hold_seconds,
        )
        secret = settings.admission_secret.get_secret_value()
        app.state.waiting_room = WaitingRoom(
            room,
            settings,
            tickets=TicketCodec(secret, settings.event),
            admissions=AdmissionCodec(
                secret,
                ttl_seconds=settings.admission_ttl_seconds,
                keep_seconds=settings.admission_keep_seconds,
            ),
            proof_of_work=ProofOfWork(secret),
        )
        with suppress(aioredis.RedisError, OSError):
            await room.refresh()  # readiness reports Redis if this fails
        stamping = create_http_client(settings.stamping_url, timeout=5)
        pressure = BackendPressure(
            ServiceClient(
                stamping, app.state.principal_codec, Principal(PrincipalKind.service, "queue")
            ),
            backlog_jobs=settings.backlog_target_jobs,
            backlog_seconds=settings.backlog_target_seconds,
        )
        tasks = [
            asyncio.create_task(
                keep_fresh(room, settings.serving_refresh_seconds), name="room-refresh"
            ),
            asyncio.create_task(
                room.run_admission(
                    tick=settings.tick_seconds,
                    identity=f"{socket.gethostname()}-{os.getpid()}-{id(room)}",
                    pressure=pressure,
                ),
                name="admission",
            ),
        ]
        health: HealthChecks = app.state.health
        health.add("redis", redis.ping)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # A task cancelled inside a Redis call may take a moment to unwind; never hang
            # the shutdown on it.
            await asyncio.wait(tasks, timeout=5)
            with suppress(TimeoutError):
                await asyncio.wait_for(room.drain(), timeout=5)
            await redis.aclose()
            await stamping.aclose()

    app = create_service_app(
        service="queue",
        title="Meterai waiting room",
        settings=settings,
        lifespan=lifespan,
        # The pages come first: their `GET /` is the applicant's page.
        routers=[pages, router, ops],
    )
    app.add_hot_route("POST", "/queue/join", join_hot)
    app.add_hot_route("GET", "/queue/status", status_hot)
    # Most joins and polls are answered by the server itself; the hot routes answer the rest.
    app.add_direct_route("POST", "/queue/join", join_direct)
    app.add_direct_route("GET", "/queue/status", status_direct)
    app.sample_access_log("/queue/status", settings.status_access_log_sample)
    return app
