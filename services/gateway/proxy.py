"""Forwarding to the services: bodies stream through in both directions, the edge's request id
and the caller's principal go along, and an unreachable service is an honest 503.

Before a request is forwarded it passes, in order: authentication, the caller's rate limit (one
Redis round trip, distributors and public routes only), the in-flight budget of its upstream and
route class, and the upstream's circuit breaker. Only GET and HEAD are retried, once, and only
when the connection failed (never after a timeout, never a POST).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.auth import MissingCredentials, bearer_token, check_ops_token
from services.gateway.breaker import CircuitBreaker
from services.gateway.ratelimit import (
    Decision,
    LocalRateLimiter,
    Policy,
    RateLimited,
    RateLimiter,
)
from services.gateway.routes import Access, Route
from services.gateway.shedding import ClassBudget
from services.platform.admission import ADMISSION_COOKIE, ADMISSION_HEADER, AdmissionCodec
from services.platform.errors import MeteraiError, ServiceUnavailable
from services.platform.http import forwarded_client
from services.platform.identity import PRINCIPAL_HEADER, Principal, PrincipalKind
from services.platform.observability import REQUEST_ID_HEADER, request_id_of

log = structlog.get_logger(__name__)

# Hop-by-hop headers (RFC 9110 §7.6.1) and ones the gateway sets itself.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "x-forwarded-for",  # re-added below, with this hop
        PRINCIPAL_HEADER,
        REQUEST_ID_HEADER,
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "server",
        "date",
        REQUEST_ID_HEADER,
    }
)

# Bodies up to this size are read whole; larger ones (PDF uploads and downloads) stream.
_SMALL_BODY = 64 * 1024


async def _request_body(request: Request, declared: str) -> bytes | AsyncIterator[bytes] | None:
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return None
    if not declared and "transfer-encoding" not in request.headers:
        return None  # HTTP/1.1: neither header, no body (not an empty chunked stream)
    if declared.isdigit() and int(declared) <= _SMALL_BODY:
        return await request.body()
    return request.stream()


# nginx's status for "the client closed the connection before we answered" (for metrics).
CLIENT_CLOSED_REQUEST = 499


class PayloadTooLarge(MeteraiError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


async def authenticate(request: Request, route: Route) -> Principal | None:
    """The principal the route needs, or a 401 problem."""
    state = request.app.state
    if route.access is Access.public:
        return None
    if route.access is Access.operator:
        return check_ops_token(request, state.settings.ops_token.get_secret_value())
    api_key = bearer_token(request)
    if api_key is not None:
        principal: Principal = await state.authenticator.authenticate(api_key)
        return principal
    if route.access is Access.customer:
        token = request.headers.get(ADMISSION_HEADER) or request.cookies.get(ADMISSION_COOKIE)
        if token:
            codec: AdmissionCodec = state.admission_codec
            admission = codec.verify(token, event=state.settings.event, to_buy=route.buys)
            return Principal(PrincipalKind.applicant, admission.applicant_id)
        raise MissingCredentials(
            "Distributors send `Authorization: Bearer <api key>`; applicants pass the waiting "
            "room first (POST /queue/join) and send the admission credential it gives."
        )
    raise MissingCredentials("Send your API key as `Authorization: Bearer <api key>`.")


@dataclass(frozen=True)
class Limits:
    """The rate-limit policies of one gateway (None: that kind of caller is not limited)."""

    distributor: Policy | None
    public: Policy | None
    trusted_proxy_hops: int = 0


def client_address(request: Request, trusted_hops: int) -> str:
    """The caller's address: the peer, or the one `trusted_hops` proxies saw (X-Forwarded-For)."""
    peer = request.client.host if request.client else "unknown"
    return forwarded_client(peer, request.headers.get("x-forwarded-for"), trusted_hops)


@dataclass(frozen=True)
class Guards:
    """What protects one route's upstream: its budget, its breaker, its rate-limit weight."""

    budget: ClassBudget
    breaker: CircuitBreaker
    cost: int
    limits: Limits


_IDEMPOTENT = frozenset({"GET", "HEAD"})


class Forwarder:
    """The ASGI endpoint forwarding one route of the table to its upstream service."""

    def __init__(self, route: Route, guards: Guards) -> None:
        self.route = route
        self.guards = guards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        principal, rate_headers = await self.admit(request)
        budget = self.guards.budget
        budget.acquire()
        try:
            response = await self.forward(request, principal)
            if rate_headers:
                response.raw_headers.extend(rate_headers)
            await response(scope, receive, send)
        finally:
            budget.release()

    async def admit(self, request: Request) -> tuple[Principal | None, list[tuple[bytes, bytes]]]:
        """Size check, authentication and the caller's rate limit; the principal and the
        RateLimit headers for the response."""
        route = self.route
        state = request.app.state
        declared = request.headers.get("content-length", "")
        limit: int = state.settings.max_body_bytes
        # Refuse what is declared too large before reading a byte of it; services enforce their
        # own, tighter limits on what actually arrives.
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"Requests are limited to {limit:,} bytes.")
        principal = await authenticate(request, route)
        limits = self.guards.limits
        decision: Decision | None
        if principal is not None and principal.kind is PrincipalKind.distributor:
            limiter: RateLimiter | None = state.rate_limiter
            if limiter is None or limits.distributor is None:
                return principal, []
            decision = await limiter.take(limits.distributor, principal.subject, self.guards.cost)
            if decision is None:
                return principal, []
        elif route.access is Access.public:
            local: LocalRateLimiter | None = state.public_limiter
            if local is None or limits.public is None:
                return principal, []
            address = client_address(request, limits.trusted_proxy_hops)
            decision = local.take(limits.public, address, self.guards.cost)
        else:
            # Applicants are paced by the waiting room; operators are not limited.
            return principal, []
        if not decision.allowed:
            raise RateLimited(decision)
        return principal, decision.headers()

    async def forward(self, request: Request, principal: Principal | None) -> Response:
        route = self.route
        state = request.app.state
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _DROP_REQUEST
        ]
        headers.append((REQUEST_ID_HEADER, request_id_of(request)))
        if principal is not None:
            headers.append((PRINCIPAL_HEADER, state.principal_codec.encode(principal)))
        forwarded = request.headers.get("x-forwarded-for")
        client_host = request.client.host if request.client else "unknown"
        headers.append(
            ("x-forwarded-for", f"{forwarded}, {client_host}" if forwarded else client_host)
        )
        session: aiohttp.ClientSession = state.upstreams[route.upstream]
        breaker = self.guards.breaker
        breaker.before_request()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        retries = 1 if request.method in _IDEMPOTENT else 0
        try:
            body = await _request_body(request, request.headers.get("content-length", ""))
            while True:
                try:
                    upstream = await session.request(
                        request.method, path, headers=headers, data=body, allow_redirects=False
                    )
                    break
                except TimeoutError:
                    raise
                except aiohttp.ClientConnectionError as exc:
                    if isinstance(exc.__cause__, ClientDisconnect):
                        # Our caller hung up while its body streamed on: not the service's
                        # fault (counted against the breaker, a crowd leaving would open it).
                        raise exc.__cause__ from None
                    # A pooled connection the service had closed, or a refused connect: safe
                    # to try once more for a GET (nothing was done), never for a POST.
                    if retries <= 0:
                        raise
                    retries -= 1
                    log.info("upstream_retry", upstream=route.upstream.value, error=repr(exc))
        except ClientDisconnect:
            # The caller hung up while its body was still streaming in: nobody to answer.
            breaker.abandoned()
            log.info("client_disconnected", upstream=route.upstream.value)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except TimeoutError as exc:
            breaker.failed()
            log.warning("upstream_timeout", upstream=route.upstream.value, error=repr(exc))
            raise ServiceUnavailable(
                f"The {route.upstream.value} service did not answer in time; try again.",
                retry_after=5,
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            breaker.failed()
            log.warning("upstream_unreachable", upstream=route.upstream.value, error=repr(exc))
            raise ServiceUnavailable(
                f"The {route.upstream.value} service is unavailable; try again shortly.",
                retry_after=5,
            ) from exc
        except aiohttp.ClientError as exc:
            breaker.abandoned()
            log.warning("upstream_error", upstream=route.upstream.value, error=repr(exc))
            raise ServiceUnavailable(
                f"The {route.upstream.value} service is unavailable; try again shortly.",
                retry_after=5,
            ) from exc
        except BaseException:
            breaker.abandoned()
            raise
        breaker.succeeded()
        # Raw pairs keep repeated headers (Set-Cookie) and the upstream's Content-Length,
        # which stays right because the body is passed on undecoded.
        raw_headers = [
            (name.lower(), value)
            for name, value in upstream.raw_headers
            if name.decode("latin-1").lower() not in _DROP_RESPONSE
        ]
        length = upstream.content_length
        if length is not None and length <= _SMALL_BODY:
            # Small answers (JSON) in one piece: fewer writes than a streamed response.
            try:
                content = await upstream.read()
            finally:
                upstream.release()
            response = Response(content, status_code=upstream.status)
        else:
            response = StreamingResponse(
                upstream.content.iter_any(),
                status_code=upstream.status,
                background=BackgroundTask(upstream.release),
            )
        response.raw_headers = raw_headers
        return response


def proxy_session(base_url: str, *, timeout: float) -> aiohttp.ClientSession:
    """A pooled session to one upstream: no cookies kept (the gateway serves everyone), bodies
    passed on undecoded, a connect timeout shorter than the overall one."""
    return aiohttp.ClientSession(
        base_url=base_url,
        # sock_connect, not connect: the latter also counts the wait for a free pooled
        # connection, which under a surge is queueing, not an unreachable upstream.
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=2),
        # Idle connections are dropped here before the services drop them (they keep theirs
        # for 75 s): reusing one the server is closing fails the request mid-surge.
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=256, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
