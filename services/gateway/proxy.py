"""Forwarding to the services: bodies stream through in both directions, the edge's request id
and the caller's principal go along, and an unreachable service is an honest 503."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import structlog
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from services.gateway.auth import MissingCredentials, bearer_token, check_ops_token
from services.gateway.routes import Access, Route
from services.platform.admission import ADMISSION_COOKIE, ADMISSION_HEADER, AdmissionCodec
from services.platform.errors import MeteraiError, ServiceUnavailable
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

Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]
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
            admission = codec.verify(token, event=state.settings.event)
            return Principal(PrincipalKind.applicant, admission.applicant_id)
        raise MissingCredentials(
            "Distributors send `Authorization: Bearer <api key>`; applicants pass the waiting "
            "room first (POST /queue/join) and send the admission credential it gives."
        )
    raise MissingCredentials("Send your API key as `Authorization: Bearer <api key>`.")


def proxy_endpoint(route: Route) -> Endpoint:
    """A Starlette endpoint forwarding `route` to its upstream service."""

    async def forward(request: Request) -> Response:
        state = request.app.state
        declared = request.headers.get("content-length", "")
        limit: int = state.settings.max_body_bytes
        # Refuse what is declared too large before reading a byte of it; services enforce their
        # own, tighter limits on what actually arrives.
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"Requests are limited to {limit:,} bytes.")
        principal = await authenticate(request, route)
        client: httpx.AsyncClient = state.upstreams[route.upstream]
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
        body_allowed = request.method not in ("GET", "HEAD")
        upstream_request = client.build_request(
            request.method,
            httpx.URL(path=request.url.path, query=request.url.query.encode()),
            headers=headers,
            content=request.stream() if body_allowed else None,
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except ClientDisconnect:
            # The caller hung up while its body was still streaming in: nobody to answer.
            log.info("client_disconnected", upstream=route.upstream.value)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except httpx.TimeoutException as exc:
            log.warning("upstream_timeout", upstream=route.upstream.value, error=repr(exc))
            raise ServiceUnavailable(
                f"The {route.upstream.value} service did not answer in time; try again.",
                retry_after=5,
            ) from exc
        except httpx.TransportError as exc:
            log.warning("upstream_unreachable", upstream=route.upstream.value, error=repr(exc))
            raise ServiceUnavailable(
                f"The {route.upstream.value} service is unavailable; try again shortly.",
                retry_after=5,
            ) from exc
        response = StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        # Raw pairs keep repeated headers (Set-Cookie) and the upstream's Content-Length,
        # which stays right because the body is passed on undecoded.
        response.raw_headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in upstream.headers.multi_items()
            if name.lower() not in _DROP_RESPONSE
        ]
        return response

    forward.__name__ = f"proxy_{route.method.lower()}_{route.path}"
    return forward
