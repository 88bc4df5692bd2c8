"""httpx clients for calls between services: timeouts everywhere, pooled connections, the
caller's request id and a principal token on every request."""

from __future__ import annotations

import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
import structlog

from services.platform.identity import PRINCIPAL_HEADER, Principal, PrincipalCodec
from services.platform.observability import REQUEST_ID_HEADER


def create_http_client(
    base_url: str = "",
    *,
    timeout: float = 10.0,
    connect_timeout: float = 2.0,
    max_connections: int = 200,
) -> httpx.AsyncClient:
    """A pooled client with a connect timeout shorter than the overall one.

    It never stores cookies: a client shared by many callers (the gateway's) would otherwise
    hand one applicant's cookie to the next.
    """
    return httpx.AsyncClient(
        base_url=base_url,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
    )


def forwarded_client(peer: str, forwarded: str | None, trusted_hops: int) -> str:
    """The caller's address: the X-Forwarded-For entry `trusted_hops` from the end (each proxy
    we trust appends the address it saw; entries before those are the caller's to forge), else
    the peer. At most 64 characters (it keys rate limits)."""
    if trusted_hops <= 0 or not forwarded:
        return peer
    hops = forwarded.split(",")
    return hops[-min(trusted_hops, len(hops))].strip()[:64]


def current_request_id() -> str | None:
    """The request or job id bound to this task's log context, if any."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


class ServiceClient:
    """Calls another Meterai service as this service (a `service` principal)."""

    def __init__(self, client: httpx.AsyncClient, codec: PrincipalCodec, caller: Principal):
        self.client = client
        self._codec = codec
        self._caller = caller
        self._token = ""
        self._token_expires = 0.0

    def _headers(self) -> dict[str, str]:
        now = time.monotonic()
        if now >= self._token_expires:
            self._token = self._codec.encode(self._caller)
            self._token_expires = now + 60  # well inside the token's own lifetime
        headers = {PRINCIPAL_HEADER: self._token}
        request_id = current_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send with this service's identity and the current request id."""
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        return await self.client.request(method, url, headers=headers, **kwargs)
