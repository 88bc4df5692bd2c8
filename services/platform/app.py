"""The FastAPI application every service is built on: errors, logs, metrics, health."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI

from services.platform.errors import install_error_handlers
from services.platform.health import HealthChecks, health_router
from services.platform.identity import PrincipalCodec
from services.platform.observability import (
    ObservabilityMiddleware,
    configure_logging,
    metrics_endpoint,
)
from services.platform.settings import ServiceSettings

VERSION = "0.1.0"


class Lifespan(Protocol):
    def __call__(self, app: FastAPI) -> AbstractAsyncContextManager[None]: ...


def create_service_app(
    *,
    service: str,
    title: str,
    settings: ServiceSettings,
    lifespan: Lifespan,
    routers: Sequence[APIRouter],
    description: str = "",
    include_healthz: bool = True,
    **fastapi_options: Any,
) -> FastAPI:
    """A service app; `lifespan` builds the clients (engine, Kafka, httpx) and disposes of them.

    Nothing here opens a connection: that happens in the lifespan, after the process started.
    """
    configure_logging(service, level=settings.log_level, json=settings.log_json)
    app = FastAPI(
        title=title,
        description=description,
        version=VERSION,
        lifespan=lifespan,
        **fastapi_options,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.principal_codec = PrincipalCodec(settings.internal_secret.get_secret_value())
    app.state.health = HealthChecks()
    install_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware, service=service)
    app.include_router(health_router(service=service, include_healthz=include_healthz))
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    for router in routers:
        app.include_router(router)
    return app
