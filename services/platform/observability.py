"""Structured logs, request ids and Prometheus HTTP metrics, the same in every service."""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.platform.ids import new_hex_id

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
# Buckets from 1 ms to 30 s: purchases are milliseconds, uploads and signing can be seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def configure_logging(service: str, *, level: str = "INFO", json: bool = True) -> None:
    """One JSON event per line on stderr, with the service name and the bound request/job ids.

    Standard-library loggers (uvicorn, sqlalchemy, aiokafka) go through the same renderer.
    """
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # Drop events below the level before any work is done on them (one per request).
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                _add_service(service),
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours.
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _add_service(service: str) -> structlog.typing.Processor:
    def add(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.setdefault("service", service)
        return event

    return add


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return new_hex_id()


@dataclass(frozen=True)
class HttpMetrics:
    requests: Counter
    duration: Histogram
    in_flight: Gauge


@cache
def http_metrics(service: str) -> HttpMetrics:
    """The HTTP metrics of one service, registered once per process."""
    prefix = f"meterai_{service}_http"
    return HttpMetrics(
        requests=Counter(
            f"{prefix}_requests_total", "HTTP requests handled", ["method", "route", "status"]
        ),
        duration=Histogram(
            f"{prefix}_request_duration_seconds",
            "HTTP request duration from first byte in to last byte out",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
        ),
        in_flight=Gauge(f"{prefix}_requests_in_flight", "HTTP requests being handled"),
    )


class ObservabilityMiddleware:
    """Request id, one access-log line and Prometheus metrics per request (pure ASGI, no copies)."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.metrics = http_metrics(service)
        self.log = structlog.get_logger("meterai.access")
        # Labelled children by (method, route, status): `labels()` costs more than the count.
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                # A crash answered by the app's last-resort handler already carries it.
                if not any(name == _REQUEST_ID_BYTES for name, _ in headers):
                    headers.append((_REQUEST_ID_BYTES, request_id.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope["method"]
            counted = self._counted.get((method, route, status))
            if counted is None:
                counted = self._children(method, route, status)
            counted[0].inc()
            counted[1].observe(elapsed)
            if route not in _QUIET_ROUTES and _logged(scope, route, status, elapsed):
                self.log.info(
                    "request",
                    method=method,
                    path=scope["path"],
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )

    def _children(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        children = (
            self.metrics.requests.labels(method, route, str(status)),
            self.metrics.duration.labels(method, route),
        )
        if len(self._counted) < _MAX_LABEL_SETS:  # methods and statuses are few, but unbounded
            self._counted[(method, route, status)] = children
        return children


# Label sets whose children are kept at hand (the routes times the methods and statuses seen).
_MAX_LABEL_SETS = 4096
_QUIET_ROUTES = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})
# Answers slower than this are always logged, even on sampled routes.
_SLOW_SECONDS = 1.0


def _logged(scope: Scope, route: str, status: int, elapsed: float) -> bool:
    """Whether this request gets its access-log line (see `ServiceApp.sample_access_log`)."""
    rate = getattr(scope.get("app"), "access_log_sampling", {}).get(route)
    if rate is None or status >= 400 or elapsed >= _SLOW_SECONDS:
        return True
    return bool(random.random() < rate)  # noqa: S311 - sampling, not security


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID_OK.match(text) else None
    return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    # Label by template, never by raw path: raw paths would make one time series per id.
    return path if isinstance(path, str) else "<unmatched>"


def request_id_of(request: Request) -> str:
    """The id the edge assigned to this request."""
    value = getattr(request.state, "request_id", None)
    return value if isinstance(value, str) else new_request_id()


async def metrics_endpoint(_: Request) -> Response:
    """Prometheus exposition of this process's registry."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
