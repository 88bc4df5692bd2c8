"""The stamping API: accepts PDFs, reports jobs, serves stamped documents, relays the outbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI

from services.platform.app import create_service_app
from services.platform.blobs import blob_store_from_url
from services.platform.db import check_database, create_engine, create_sessionmaker
from services.platform.health import HealthChecks
from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalKind
from services.platform.kafka import check_kafka, create_producer
from services.stamping import repository as repo
from services.stamping.config import StampingSettings
from services.stamping.inventory_client import InventoryClient
from services.stamping.relay import OutboxRelay
from services.stamping.router import router

WORKER_SILENCE = timedelta(seconds=30)


def create_app(settings: StampingSettings | None = None) -> FastAPI:
    """Build the stamping API app; clients are created in the lifespan."""
    settings = settings or StampingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        app.state.sessionmaker = sessionmaker = create_sessionmaker(engine)
        app.state.blobs = blobs = blob_store_from_url(settings.blob_store_url)
        http = create_http_client(settings.inventory_url)
        app.state.inventory = InventoryClient(
            ServiceClient(
                http, app.state.principal_codec, Principal(PrincipalKind.service, "stamping")
            )
        )
        producer = create_producer(settings.kafka_bootstrap_servers, client_id="stamping-relay")
        await producer.start()
        app.state.relay = relay = OutboxRelay(
            sessionmaker=sessionmaker,
            producer=producer,
            requests_topic=settings.requests_topic,
            interval=settings.relay_interval_seconds,
            republish_after=settings.republish_after_seconds,
            republish_max_interval=settings.republish_max_interval_seconds,
        )
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")

        async def signing_workers() -> dict[str, int]:
            async with sessionmaker() as session:
                live = await repo.live_workers(session, datetime.now(UTC) - WORKER_SILENCE)
            if live == 0:
                raise RuntimeError("no signing worker reported in the last 30 s")
            return {"live": live}

        health: HealthChecks = app.state.health
        health.add("database", lambda: check_database(engine))
        health.add("kafka", lambda: check_kafka(producer, settings.requests_topic))
        health.add("blob_store", blobs.check)
        # Uploads are still accepted (and queued) without workers: report, don't go unready.
        health.add("signing_workers", signing_workers, readiness=False)
        try:
            yield
        finally:
            relay.stop()
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(relay_task, timeout=10)
            await producer.stop()
            await http.aclose()
            await engine.dispose()

    return create_service_app(
        service="stamping",
        title="Meterai stamping",
        settings=settings,
        lifespan=lifespan,
        routers=[router],
    )
