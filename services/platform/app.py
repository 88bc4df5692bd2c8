"""The FastAPI application every service is built on: errors, logs, metrics, health, and a
lean lane for the few routes that carry a surge."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.platform.direct import Answer, DirectAnswer
from services.platform.errors import install_error_handlers
from services.platform.health import HealthChecks, health_router
from services.platform.identity import PrincipalCodec
from services.platform.observability import (
    HttpObserver,
    ObservabilityMiddleware,
    configure_logging,
    metrics_endpoint,
)
from services.platform.settings import ServiceSettings

VERSION = "0.1.0"


class Lifespan(Protocol):
    def __call__(self, app: FastAPI) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True)
class HotRoute:
    """A route served by the lean lane; `path` is its template (the metrics label)."""

    method: str
    path: str
    endpoint: ASGIApp
    regex: re.Pattern[str] | None  # None: the path has no parameters


@dataclass(frozen=True)
class DirectRoute:
    """A route the server answers directly when it can (`ServiceApp.add_direct_route`)."""

    method: str
    path: str
    answer: DirectAnswer


class ServiceApp(FastAPI):
    """FastAPI with a lean lane in front of it.

    Routes added with :meth:`add_hot_route` are plain ASGI endpoints matched before Starlette's
    router, middleware stack and dependency injection (which cost several times what a proxied
    purchase costs the gateway). They keep what matters: the request id, the access log, the
    metrics, and problem+json for every error through the app's own exception handlers.
    Everything else (health, metrics, documented FastAPI routes) goes the usual way.
    """

    def __init__(self, *, service: str, **options: Any) -> None:
        super().__init__(**options)
        self._hot_static: dict[tuple[str, str], HotRoute] = {}
        self._hot_templated: list[HotRoute] = []
        self._direct: dict[tuple[str, str], DirectRoute] = {}
        # (method, path) of the direct routes, as the server reads them off a request.
        self.direct_routes: frozenset[tuple[bytes, bytes]] = frozenset()
        self._observer = HttpObserver(service)
        self._edge: ASGIApp = self._dispatch
        # Route template -> share of its quick successes written to the access log.
        self.access_log_sampling: dict[str, float] = {}

    def sample_access_log(self, route: str, rate: float) -> None:
        """Write only about `rate` of the access-log lines of `route`'s quick successes (polls
        that millions repeat); its errors and slow answers are always written, and its
        metrics always count every request."""
        self.access_log_sampling[route] = min(1.0, max(0.0, rate))

    def add_hot_route(self, method: str, path: str, endpoint: ASGIApp) -> None:
        """Serve `method path` (a Starlette path template) with the ASGI `endpoint`; path
        parameters arrive in ``scope["path_params"]`` as strings.

        The route is registered with the router too, so that other methods on the path get
        Starlette's 405 (and HEAD of a GET works) the usual way. A hot route may shadow a
        FastAPI route of the same method and path, which then only documents it (OpenAPI).
        """
        self.router.routes.append(
            Route(path, _AsgiEndpoint(endpoint), methods=[method], include_in_schema=False)
        )
        regex, _, convertors = compile_path(path)
        if convertors:
            self._hot_templated.append(HotRoute(method, path, endpoint, regex))
        else:
            self._hot_static[(method, path)] = HotRoute(method, path, endpoint, None)

    def add_direct_route(self, method: str, path: str, answer: DirectAnswer) -> None:
        """Let the server answer `method path` (a fixed path) with `answer(scope)` as soon as
        the request's head is parsed, with no ASGI messages or response cycle (see
        `services.platform.direct`). The request id, metrics and access log are kept.

        `answer` returns an `Answer` made at once, without waiting for anything (no task at
        all); or an awaitable of one, which the server awaits in a task of its own, and whose
        errors become the app's problem documents as on the other lanes; or None when it
        cannot answer now. A request `answer` returned None for, or raised on at once, goes
        the usual way: so the path must also be served by a hot or a FastAPI route. The
        server answers directly only requests without a body or a query string, on
        keep-alive HTTP/1.1; the others, and every request to an app served in process
        (tests), go the usual way. No ASGI middleware wraps a direct route: neither edge
        middleware (an app has one or the other) nor uvicorn's X-Forwarded-For rewriting
        (``scope["client"]`` is the socket's peer; read the header with trusted hops).
        """
        if "{" in path:
            raise ValueError(f"a direct route has a fixed path: {path}")
        if self._edge != self._dispatch:
            raise ValueError("a direct route would skip the app's edge middleware")
        self._direct[(method, path)] = DirectRoute(method, path, answer)
        self.direct_routes = frozenset((m.encode(), p.encode()) for m, p in self._direct)

    def answer_directly(self, scope: Scope) -> Answer | Awaitable[Answer] | None:
        """For the server: the direct route's answer to the request in `scope`, or None."""
        route = self._direct.get((scope["method"], scope["path"]))
        if route is None:
            return None
        scope["app"] = self
        scope["route"] = route
        started = time.perf_counter()
        try:
            answered = route.answer(scope)
        except Exception:  # noqa: BLE001 - the usual lane answers it again, and reports it
            return None
        if answered is None:
            return None
        if isinstance(answered, Answer):
            return self._observer.answered_now(scope, answered, started)
        return self._answer_later(scope, answered)

    async def _answer_later(self, scope: Scope, answering: Awaitable[Answer]) -> Answer:
        # What `_serve_hot` does, around an answer instead of ASGI messages.
        observed = self._observer.begin(scope, _unsent)
        try:
            try:
                answer = await answering
            except Exception as exc:  # noqa: BLE001 - every error has a handler (a 500 at last)
                response = await self._problem(exc, Request(scope))
                answer = Answer(
                    response.status_code, list(response.raw_headers), bytes(response.body)
                )
            observed.status = answer.status
            if all(name != observed.header[0] for name, _ in answer.headers):
                answer.headers.append(observed.header)
            return answer
        finally:
            self._observer.end(scope, observed)

    def _match_hot(self, scope: Scope) -> HotRoute | None:
        method, path = scope["method"], scope["path"]
        route = self._hot_static.get((method, path))
        if route is not None:
            return route
        for candidate in self._hot_templated:
            if candidate.method != method or candidate.regex is None:
                continue
            matched = candidate.regex.match(path)
            if matched:
                scope["path_params"] = matched.groupdict()
                return candidate
        return None

    def add_edge_middleware(self, middleware: Callable[..., ASGIApp], **options: Any) -> None:
        """Wrap every request of both lanes (CORS, security headers); the last one added runs
        first. Starlette's `add_middleware` would wrap only the FastAPI lane. Not with direct
        routes, which no ASGI middleware wraps."""
        if self._direct:
            raise ValueError("edge middleware would not wrap the direct routes")
        self._edge = middleware(self._edge, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._edge(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (route := self._match_hot(scope)) is not None:
            scope["app"] = self
            scope["route"] = route
            await self._serve_hot(route, scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _serve_hot(self, route: HotRoute, scope: Scope, receive: Receive, send: Send) -> None:
        # What the FastAPI lane's middleware does, in one frame: a hot route's whole cost is
        # a few of them.
        sent = self._observer.begin(scope, send)
        try:
            await route.endpoint(scope, receive, sent)
        except Exception as exc:
            if sent.status is not None:
                raise  # too late for a problem document: the connection is closed
            response = await self._problem(exc, Request(scope, receive))
            await response(scope, receive, sent)
        finally:
            self._observer.end(scope, sent)

    async def _problem(self, exc: Exception, request: Request) -> Response:
        """The app's own answer to `exc` (its exception handlers); `exc` again if none."""
        handler = self._exception_handler_for(exc)
        if handler is None:
            raise exc
        response: Response = await handler(request, exc)
        return response

    def _exception_handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None


M = TypeVar("M", bound=BaseModel)


async def read_json_body(request: Request, model: type[M]) -> M:
    """The request body as `model`, for lean-lane endpoints, failing exactly as a FastAPI body
    parameter would (`RequestValidationError`, hence the same problem documents): a body
    without a JSON Content-Type, and an empty body, are invalid."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    body = await request.body()
    maintype, _, subtype = media_type.partition("/")
    if maintype != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise RequestValidationError(
            [{"type": "model_attributes_type", "loc": ("body",), "msg": _NOT_AN_OBJECT}]
        )
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


_NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"


class SecurityHeadersMiddleware:
    """Adds the usual defensive headers to every response that does not set its own
    (the applicant's pages set a stricter Content-Security-Policy themselves)."""

    def __init__(self, app: ASGIApp, *, hsts_seconds: int = 0) -> None:
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if hsts_seconds > 0:
            value = f"max-age={hsts_seconds}; includeSubDomains".encode()
            self.headers.append((b"strict-transport-security", value))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [pair for pair in self.headers if pair[0] not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _unsent(message: Message) -> None:
    raise RuntimeError("a direct answer is written by the server, not sent")


class _AsgiEndpoint:
    """Makes Starlette's Route treat any endpoint as a raw ASGI app (it wraps plain functions
    as request-response handlers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


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
) -> ServiceApp:
    """A service app; `lifespan` builds the clients (engine, Kafka, httpx) and disposes of them.

    Nothing here opens a connection: that happens in the lifespan, after the process started.
    """
    configure_logging(service, level=settings.log_level, json=settings.log_json)
    app = ServiceApp(
        service=service,
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
