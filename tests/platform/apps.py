"""Small service apps built with the platform's own factory, for HTTP-level tests in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI

from services.platform.app import ServiceApp, create_service_app
from services.platform.settings import ServiceSettings

INTERNAL_SECRET = "platform-tests-internal-secret-0123456789abcdef"
PROBLEM = "application/problem+json"


@asynccontextmanager
async def _no_clients(app: FastAPI) -> AsyncIterator[None]:
    yield


def service_app(
    service: str, routers: Sequence[APIRouter] = (), *, include_healthz: bool = True
) -> ServiceApp:
    """A service app as every Meterai service builds it, with no clients in its lifespan.

    `service` becomes part of metric names, so each test module uses its own.
    """
    settings = ServiceSettings(internal_secret=INTERNAL_SECRET, log_level="WARNING")
    return create_service_app(
        service=service,
        title=f"test {service}",
        settings=settings,
        lifespan=_no_clients,
        routers=routers,
        include_healthz=include_healthz,
    )


def asgi_client(app: FastAPI, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An httpx client talking to `app` in this process (no lifespan, no sockets)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """`response` is an RFC 9457 problem document with `status` and `code`; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"https://meterai.dev/problems/{code}"
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body
