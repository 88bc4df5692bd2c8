"""The inventory service: serials, distributors' balances, purchases and payments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from services.inventory.claims import ClaimChecker
from services.inventory.config import InventorySettings
from services.inventory.consumer import StampingResultHandler
from services.inventory.router import create_purchase_hot, internal, router
from services.inventory.service import DistributorPurchases
from services.inventory.sweeper import run_sweeper
from services.platform.app import create_service_app
from services.platform.db import check_database, create_engine, create_sessionmaker
from services.platform.health import HealthChecks
from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalKind
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
            batch_handler=StampingResultHandler(sessionmaker),
            max_batch=256,
        )
        await consumer.start_in_background()
        stamping = create_http_client(settings.stamping_url, timeout=10)
        claims = ClaimChecker(
            sessionmaker,
            ServiceClient(
                stamping, app.state.principal_codec, Principal(PrincipalKind.service, "inventory")
            ),
            check_after=timedelta(seconds=settings.claim_check_after_seconds),
            orphan_after=timedelta(seconds=settings.orphan_claim_after_seconds),
        )
        background = [
            asyncio.create_task(
                run_sweeper(sessionmaker, settings.sweep_interval_seconds),
                name="reservation-sweeper",
            ),
            asyncio.create_task(
                claims.run(settings.claim_check_interval_seconds), name="claim-checker"
            ),
        ]
        health: HealthChecks = app.state.health
        health.add("database", lambda: check_database(engine))
        health.add("kafka_consumer", consumer.check_running)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await stamping.aclose()
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
