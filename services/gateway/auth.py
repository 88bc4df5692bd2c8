"""Who is calling, decided at the edge: distributor API keys (verified by inventory, cached
briefly) and the operations token."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass

import httpx
from cachetools import TTLCache
from starlette.requests import Request

from services.platform.errors import MeteraiError, ServiceUnavailable, Unauthorized
from services.platform.http import ServiceClient
from services.platform.identity import Principal, PrincipalKind
from services.platform.tokens import hash_api_key


class MissingCredentials(Unauthorized):
    code = "missing_credentials"
    title = "Credentials required"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"
    title = "Invalid API key"


class InvalidOpsToken(Unauthorized):
    code = "invalid_ops_token"
    title = "Invalid operations token"


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if there is one."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use `Authorization: Bearer <api key>`.")
    return token.strip()


@dataclass
class _Entry:
    lookup: asyncio.Task[Principal | None]
    fetched_at: float
    known: Principal | None = None  # the last good answer, served while a refresh runs


class DistributorAuthenticator:
    """Maps API keys to distributors through inventory, with a short cache.

    Concurrent requests with the same key share one lookup; refusals are cached too, so a
    flood of bad keys costs inventory one call per key per cache period. A known key whose
    entry is older than `ttl_seconds` is refreshed in the background while requests go on
    with the last answer (at most `stale_seconds` old): under a surge, when inventory is
    busiest, nobody waits on a re-check and a slow re-check fails nobody. A revoked key stops
    working once a refresh has seen it, within about `ttl_seconds`.
    """

    def __init__(
        self,
        inventory: ServiceClient,
        *,
        ttl_seconds: float,
        stale_seconds: float = 60.0,
        size: int = 50_000,
    ):
        self.inventory = inventory
        self.ttl = ttl_seconds
        self._cache: TTLCache[str, _Entry] = TTLCache(
            maxsize=size, ttl=max(stale_seconds, ttl_seconds)
        )

    async def authenticate(self, api_key: str) -> Principal:
        """The distributor holding `api_key`; `InvalidApiKey` if none does."""
        key_hash = hash_api_key(api_key)
        now = time.monotonic()
        entry = self._cache.get(key_hash)
        if entry is not None and entry.known is not None:
            if now - entry.fetched_at >= self.ttl and entry.lookup.done():
                self._refresh(key_hash, entry, now)
            return entry.known
        if entry is not None and now - entry.fetched_at >= self.ttl:
            entry = None  # a refusal is cached for `ttl_seconds` only
        if entry is None:
            entry = _Entry(asyncio.ensure_future(self._lookup(key_hash)), now)
            self._cache[key_hash] = entry
        try:
            principal = await asyncio.shield(entry.lookup)
        except MeteraiError:
            # Outages are not remembered: the next request asks again.
            if self._cache.get(key_hash) is entry:
                self._cache.pop(key_hash, None)
            raise
        if principal is None:
            raise InvalidApiKey("Unknown or revoked API key.")
        entry.known = principal
        return principal

    def _refresh(self, key_hash: str, entry: _Entry, now: float) -> None:
        lookup = asyncio.ensure_future(self._lookup(key_hash))
        entry.lookup, entry.fetched_at = lookup, now

        def settle(task: asyncio.Task[Principal | None]) -> None:
            if task.cancelled() or task.exception() is not None:
                return  # keep the last answer; the entry expires `stale_seconds` after it
            entry.known = task.result()  # None: revoked, refused from the next request on
            self._cache[key_hash] = entry  # a confirmed answer restarts the expiry

        lookup.add_done_callback(settle)

    async def _lookup(self, key_hash: str) -> Principal | None:
        try:
            response = await self.inventory.request(
                "POST", "/internal/v1/authenticate", json={"key_hash": key_hash}
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable("Authentication is unavailable; try again shortly.") from exc
        if response.status_code == 401:
            return None
        if response.status_code != 200:
            raise ServiceUnavailable("Authentication is unavailable; try again shortly.")
        distributor_id = uuid.UUID(response.json()["distributor_id"])
        return Principal(PrincipalKind.distributor, str(distributor_id))


def check_ops_token(request: Request, expected: str) -> Principal:
    """The operator principal, if the request carries the operations token."""
    token = bearer_token(request)
    if token is None:
        raise MissingCredentials("Operator endpoints need `Authorization: Bearer <ops token>`.")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise InvalidOpsToken("The operations token is not valid.")
    return Principal(PrincipalKind.operator, "ops")
