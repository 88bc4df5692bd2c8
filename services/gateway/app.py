"""The gateway: the single public entry to Meterai."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from services.gateway import openapi
from services.gateway.auth import DistributorAuthenticator
from services.gateway.breaker import CircuitBreaker
from services.gateway.config import GatewaySettings
from services.gateway.proxy import Forwarder, Guards, Limits, proxy_session
from services.gateway.ratelimit import LocalRateLimiter, Policy, RateLimiter, create_redis
from services.gateway.routes import ROUTES, Upstream
from services.gateway.shedding import Budgets
from services.platform.admission import AdmissionCodec
from services.platform.app import SecurityHeadersMiddleware, create_service_app
from services.platform.errors import ServiceUnavailable
from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalKind


async def _service_health(client: httpx.AsyncClient) -> dict[str, Any]:
    try:
        response = await client.get("/healthz", timeout=3)
        report: dict[str, Any] = response.json()
        return report
    except (httpx.HTTPError, ValueError) as exc:
        return {"status": "fail", "error": f"unreachable: {type(exc).__name__}"}


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the gateway app; upstream clients are created in the lifespan."""
    settings = settings or GatewaySettings()
    urls = {
        Upstream.inventory: settings.inventory_url,
        Upstream.queue: settings.queue_url,
        Upstream.stamping: settings.stamping_url,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The proxy path uses aiohttp: its pool stays cheap with hundreds of requests in
        # flight, where httpcore's pool cost grows with every waiting request (measured).
        app.state.upstreams = upstreams = {
            name: proxy_session(url, timeout=settings.upstream_timeout_seconds)
            for name, url in urls.items()
        }
        clients = {name: create_http_client(url, timeout=10) for name, url in urls.items()}
        app.state.clients = clients
        app.state.authenticator = DistributorAuthenticator(
            ServiceClient(
                clients[Upstream.inventory],
                app.state.principal_codec,
                Principal(PrincipalKind.service, "gateway"),
            ),
            ttl_seconds=settings.auth_cache_seconds,
            stale_seconds=settings.auth_stale_seconds,
        )
        app.state.admission_codec = AdmissionCodec(settings.admission_secret.get_secret_value())
        app.state.openapi_document = None
        redis = None
        app.state.rate_limiter = None
        app.state.public_limiter = None
        if settings.rate_limit_enabled:
            app.state.public_limiter = LocalRateLimiter()
            redis = create_redis(
                settings.redis_url, timeout=settings.rate_limit_redis_timeout_seconds
            )
            app.state.rate_limiter = RateLimiter(
                redis,
                prefix=settings.rate_limit_key_prefix,
                pause_seconds=settings.rate_limit_pause_seconds,
                lease_seconds=settings.rate_limit_lease_seconds,
                lease_max_tokens=settings.rate_limit_lease_max_tokens,
            )
        try:
            yield
        finally:
            await asyncio.gather(
                *(session.close() for session in upstreams.values()),
                *(client.aclose() for client in clients.values()),
                *([redis.aclose()] if redis is not None else []),
            )

    app = create_service_app(
        service="gateway",
        title="Meterai gateway",
        settings=settings,
        lifespan=lifespan,
        routers=[],
        include_healthz=False,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.add_edge_middleware(SecurityHeadersMiddleware, hsts_seconds=settings.hsts_seconds)
    if settings.cors_allow_origins:
        app.add_edge_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["Location", "Retry-After", "RateLimit", "RateLimit-Policy"],
            max_age=600,
        )

    @app.get("/healthz", include_in_schema=False)
    async def system_health(request: Request) -> JSONResponse:
        """The whole system: every service's own report, with its dependencies."""
        upstreams: dict[Upstream, httpx.AsyncClient] = request.app.state.clients
        names = list(upstreams)
        reports = await asyncio.gather(*(_service_health(upstreams[name]) for name in names))
        services = {"gateway": {"status": "ok"}} | {
            name.value: report for name, report in zip(names, reports, strict=True)
        }
        ok = all(report.get("status") == "ok" for report in services.values())
        return JSONResponse(
            {"status": "ok" if ok else "fail", "services": services},
            status_code=200 if ok else 503,
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        """The public API, merged from the services (cached once every service answered)."""
        state = request.app.state
        if state.openapi_document is None:
            documents = await openapi.fetch_documents(state.clients)
            if not documents:
                raise ServiceUnavailable("No service answered; try again shortly.")
            merged = openapi.merge(documents)
            if len(documents) == len(state.upstreams):
                state.openapi_document = merged
            return JSONResponse(merged)
        return JSONResponse(state.openapi_document)

    budgets = Budgets(
        per_upstream=settings.max_in_flight_per_upstream,
        shares=settings.in_flight_share,
        per_class=settings.max_in_flight_per_class,
        retry_after=settings.shed_retry_after_seconds,
    )
    breakers = {
        name: CircuitBreaker(
            name.value,
            failure_threshold=settings.breaker_failure_threshold,
            open_seconds=settings.breaker_open_seconds,
        )
        for name in Upstream
    }
    limits = Limits(
        distributor=Policy(
            "distributor", settings.distributor_rate_per_second, settings.distributor_burst
        ),
        public=Policy("public", settings.public_rate_per_second, settings.public_burst),
        trusted_proxy_hops=settings.trusted_proxy_hops,
    )
    app.state.budgets = budgets
    app.state.breakers = breakers
    for route in ROUTES:
        guards = Guards(
            budget=budgets.get(route.upstream, route.route_class),
            breaker=breakers[route.upstream],
            cost=settings.route_class_weights.get(route.route_class.value, 1),
            limits=limits,
        )
        app.add_hot_route(route.method, route.path, Forwarder(route, guards))
    app.sample_access_log("/queue/status", settings.status_access_log_sample)
    return app
