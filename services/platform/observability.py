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

from services.platform.direct import Answer
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


@dataclass
class HttpMetrics:
    requests: Counter
    duration: Histogram
    in_flight: int = 0  # exported by a gauge that reads it at scrape time (no lock per request)


@cache
def http_metrics(service: str) -> HttpMetrics:
    """The HTTP metrics of one service, registered once per process."""
    prefix = f"meterai_{service}_http"
    metrics = HttpMetrics(
        requests=Counter(
            f"{prefix}_requests_total", "HTTP requests handled", ["method", "route", "status"]
        ),
        duration=Histogram(
            f"{prefix}_request_duration_seconds",
            "HTTP request duration from first byte in to last byte out",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
        ),
    )
    Gauge(f"{prefix}_requests_in_flight", "HTTP requests being handled").set_function(
        lambda: metrics.in_flight
    )
    return metrics


class HttpObserver:
    """What every request of a service gets: a request id (the caller's when well formed,
    else a new one) bound to its log lines; the in-flight gauge; and at the end the request
    counter, the duration histogram and one access-log line.

    Used by `ObservabilityMiddleware` and by the lean lane of `ServiceApp`, which calls
    `begin` and `end` itself.
    """

    def __init__(self, service: str) -> None:
        self.metrics = http_metrics(service)
        self.log = structlog.get_logger("meterai.access")
        # Asked before an access-log line is built: at WARNING it would only be dropped.
        self._log_level_of = logging.getLogger("meterai.access")
        # Labelled children by (method, route, status): `labels()` costs more than the count.
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def begin(self, scope: Scope, send: Send) -> ObservedSend:
        """Start observing an HTTP request; answer it through the `send` this returns."""
        request_id = _incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        self.metrics.in_flight += 1
        return ObservedSend(send, request_id)

    def end(self, scope: Scope, sent: ObservedSend) -> None:
        """Count and log the request (a 500 if it never answered)."""
        self.metrics.in_flight -= 1
        status = 500 if sent.status is None else sent.status
        self._record(scope, status, time.perf_counter() - sent.started)

    def answered_now(self, scope: Scope, answer: Answer, started: float) -> Answer:
        """Observe a request answered at once, as `begin` and `end` observe the others, for
        `ServiceApp.add_direct_route`: the answer gets the request id, and its log line carries
        it (no context is bound: nothing else runs meanwhile)."""
        request_id = _incoming_request_id(scope) or new_request_id()
        answer.headers.append((_REQUEST_ID_BYTES, request_id.encode()))
        self._record(scope, answer.status, time.perf_counter() - started, request_id)
        return answer

    def _record(
        self, scope: Scope, status: int, elapsed: float, request_id: str | None = None
    ) -> None:
        route = _route_template(scope)
        method = scope["method"]
        counted = self._counted.get((method, route, status))
        if counted is None:
            counted = self._children(method, route, status)
        counted[0].inc()
        counted[1].observe(elapsed)
        if (
            route not in _QUIET_ROUTES
            and self._log_level_of.isEnabledFor(logging.INFO)
            and _logged(scope, route, status, elapsed)
        ):
            # A request id bound to the context is the logger's already.
            bound = {} if request_id is None else {"request_id": request_id}
            self.log.info(
                "request",
                method=method,
                path=scope["path"],
                route=route,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                **bound,
            )

    def _children(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        children = (
            self.metrics.requests.labels(method, route, str(status)),
            self.metrics.duration.labels(method, route),
        )
        if len(self._counted) < _MAX_LABEL_SETS:  # methods and statuses are few, but unbounded
            self._counted[(method, route, status)] = children
        return children


class ObservedSend:
    """The server's `send` for one request, noting the response's status and adding the
    request id to its headers."""

    __slots__ = ("header", "send", "started", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.header = (_REQUEST_ID_BYTES, request_id.encode())
        self.started = time.perf_counter()
        self.status: int | None = None  # None until the response starts

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers", [])
            for name, _ in headers:
                if name == _REQUEST_ID_BYTES:
                    break  # a crash answered by the app's last-resort handler carries it already
            else:
                message = {**message, "headers": [*headers, self.header]}
        await self.send(message)


class ObservabilityMiddleware:
    """Request id, one access-log line and Prometheus metrics per request (pure ASGI, no copies)."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.observer = HttpObserver(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = self.observer.begin(scope, send)
        try:
            await self.app(scope, receive, sent)
        finally:
            self.observer.end(scope, sent)


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
