"""The inventory service: serials, distributors' balances, purchases and payments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from services.inventory.config import InventorySettings
from services.inventory.consumer import StampingResultHandler
from services.inventory.router import create_purchase_hot, internal, router
from services.inventory.service import DistributorPurchases
from services.inventory.sweeper import run_sweeper
from services.platform.app import create_service_app
from services.platform.db import check_database, create_engine, create_sessionmaker
from services.platform.health import HealthChecks
from services.platform.kafka import ConsumerLoop


def create_app(settings: InventorySettings | None = None) -> FastAPI:
    """Build the inventory app; clients are created in the lifespan, not here."""
    settings = settings or InventorySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker = create_sessionmaker(engine)
        auth_engine = create_engine(
            settings.database_url, pool_size=2, pool_timeout=settings.db_pool_timeout_seconds
        )
        app.state.auth_sessionmaker = create_sessionmaker(auth_engine)
        app.state.distributor_purchases = purchases = DistributorPurchases(
            engine,
            unit_price=settings.stamp_price_rupiah,
            max_batch=settings.purchase_batch_size,
            max_in_flight=settings.purchase_batches_in_flight,
        )
        consumer = ConsumerLoop(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topics=[settings.stamping_results_topic],
            group_id=settings.consumer_group,
            client_id="inventory",
            handler=StampingResultHandler(sessionmaker),
            concurrency=8,
            max_batch=64,
        )
        await consumer.start_in_background()
        sweeper = asyncio.create_task(
            run_sweeper(sessionmaker, settings.sweep_interval_seconds), name="reservation-sweeper"
        )
        health: HealthChecks = app.state.health
        health.add("database", lambda: check_database(engine))
        health.add("kafka_consumer", consumer.check_running)
        try:
            yield
        finally:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
            await consumer.stop_background()
            await purchases.drain()
            await engine.dispose()
            await auth_engine.dispose()

    app = create_service_app(
        service="inventory",
        title="Meterai inventory",
        settings=settings,
        lifespan=lifespan,
        routers=[router, internal],
    )
    app.add_hot_route("POST", "/api/v1/purchases", create_purchase_hot)
    return app
