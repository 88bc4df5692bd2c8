"""The stamping API: accepts PDFs, reports jobs, serves stamped documents, verifies stamps,
relays the outbox and sends callbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta

import httpx
import structlog
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.platform.app import create_service_app
from services.platform.blobs import blob_store_from_url
from services.platform.db import check_database, create_engine, create_sessionmaker
from services.platform.health import HealthChecks
from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalKind
from services.platform.kafka import check_kafka, create_producer
from services.stamping import repository as repo
from services.stamping.backlog import BacklogGuard
from services.stamping.backlog import internal as backlog_internal
from services.stamping.callbacks import CallbackSender, RetryPolicy
from services.stamping.callbacks_router import router as callbacks_router
from services.stamping.config import StampingSettings
from services.stamping.inventory_client import InventoryClient
from services.stamping.outcomes import internal as outcomes_internal
from services.stamping.relay import OutboxRelay
from services.stamping.router import router
from services.stamping.service import GiveBacks
from services.stamping.verification import StampVerifier, load_trust_roots
from services.stamping.verify_router import VerificationGate
from services.stamping.verify_router import router as verify_router

WORKER_SILENCE = timedelta(seconds=30)
log = structlog.get_logger(__name__)


def load_verifier(settings: StampingSettings) -> StampVerifier | None:
    """The verifier of stamp signatures, trusting `verify_trust_roots_paths` (default: the
    signing chain); None, logged, if they cannot be read (uploads then get a 503)."""
    paths = settings.verify_trust_roots_paths or settings.signing_chain_paths
    try:
        return StampVerifier(load_trust_roots(paths))
    except (OSError, ValueError) as exc:
        log.error(
            "verification_trust_roots_unreadable", paths=[str(p) for p in paths], error=str(exc)
        )
        return None


def create_callback_sender(
    settings: StampingSettings, sessionmaker: async_sessionmaker[AsyncSession]
) -> tuple[CallbackSender, httpx.AsyncClient]:
    """The callback sender and the HTTP client it owns (close it after the sender stopped)."""
    client = create_http_client(
        timeout=settings.callback_timeout_seconds,
        connect_timeout=min(5.0, settings.callback_timeout_seconds),
        max_connections=settings.callback_concurrency,
    )
    sender = CallbackSender(
        sessionmaker=sessionmaker,
        client=client,
        secret=settings.callback_secret.get_secret_value(),
        public_base_url=settings.public_base_url,
        policy=RetryPolicy(
            max_attempts=settings.callback_max_attempts,
            initial_seconds=settings.callback_backoff_initial_seconds,
            max_seconds=settings.callback_backoff_max_seconds,
        ),
        timeout=settings.callback_timeout_seconds,
        concurrency=settings.callback_concurrency,
        poll_interval=settings.callback_poll_interval_seconds,
        allow_private_addresses=settings.callbacks_may_reach_private_addresses,
    )
    return sender, client


def create_app(settings: StampingSettings | None = None) -> FastAPI:
    """Build the stamping API app; clients are created in the lifespan."""
    settings = settings or StampingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        app.state.sessionmaker = sessionmaker = create_sessionmaker(engine)
        app.state.blobs = blobs = blob_store_from_url(settings.blob_store_url)
        http = create_http_client(settings.inventory_url)
        app.state.inventory = inventory = InventoryClient(
            ServiceClient(
                http, app.state.principal_codec, Principal(PrincipalKind.service, "stamping")
            )
        )
        app.state.give_backs = give_backs = GiveBacks(sessionmaker, inventory)
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
        app.state.backlog_guard = guard = BacklogGuard(
            sessionmaker,
            limit=settings.max_backlog_jobs,
            refresh_seconds=settings.backlog_refresh_seconds,
        )
        await guard.read()
        guard_task = asyncio.create_task(guard.run(), name="backlog-guard")
        app.state.verifier = verifier = load_verifier(settings)
        app.state.verify_gate = VerificationGate(
            settings.verify_concurrency, settings.verify_queue_limit
        )
        callbacks, callback_http = create_callback_sender(settings, sessionmaker)
        callbacks_task = asyncio.create_task(callbacks.run(), name="callback-sender")

        async def verification() -> dict[str, int]:
            if verifier is None:
                raise RuntimeError("no trust roots: POST /api/v1/verify answers 503")
            return {"trust_roots": len(verifier.trust_roots)}

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
        health.add("verification", verification, readiness=False)
        try:
            yield
        finally:
            guard_task.cancel()
            with suppress(asyncio.CancelledError):
                await guard_task
            relay.stop()
            callbacks.stop()
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(relay_task, timeout=10)
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(callbacks_task, timeout=callbacks.grace_seconds + 5)
            await callback_http.aclose()
            await producer.stop()
            await give_backs.close()
            await http.aclose()
            await engine.dispose()

    return create_service_app(
        service="stamping",
        title="Meterai stamping",
        settings=settings,
        lifespan=lifespan,
        routers=[router, verify_router, callbacks_router, backlog_internal, outcomes_internal],
    )
