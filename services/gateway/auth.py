"""Who is calling, decided at the edge: distributor API keys (verified by inventory, cached
briefly) and the operations token."""

from __future__ import annotations

import asyncio
import hmac
import uuid

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


class DistributorAuthenticator:
    """Maps API keys to distributors through inventory, with a short cache.

    Concurrent requests with the same key share one lookup; refusals are cached too, so a
    flood of bad keys costs inventory one call per key per cache period.
    """

    def __init__(self, inventory: ServiceClient, *, ttl_seconds: float, size: int = 50_000):
        self.inventory = inventory
        self._cache: TTLCache[str, asyncio.Task[Principal | None]] = TTLCache(
            maxsize=size, ttl=ttl_seconds
        )

    async def authenticate(self, api_key: str) -> Principal:
        """The distributor holding `api_key`; `InvalidApiKey` if none does."""
        key_hash = hash_api_key(api_key)
        task = self._cache.get(key_hash)
        if task is None:
            task = asyncio.ensure_future(self._lookup(key_hash))
            self._cache[key_hash] = task
        try:
            principal = await asyncio.shield(task)
        except MeteraiError:
            # Outages are not remembered: the next request asks again.
            self._cache.pop(key_hash, None)
            raise
        if principal is None:
            raise InvalidApiKey("Unknown or revoked API key.")
        return principal

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
