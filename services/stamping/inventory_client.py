"""Stamping's calls to inventory: claim a serial for a job, give it back."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from services.platform.errors import MeteraiError, ServiceUnavailable
from services.platform.http import ServiceClient

# Inventory's refusals that concern the caller (unknown serial, serial already used...).
_CALLER_FACING = frozenset({404, 409})


class UpstreamProblem(MeteraiError):
    """Inventory refused the claim; its problem is passed on to the caller as it is."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("detail", "")))
        self.status = status
        self.code = str(body.get("code", "upstream_error"))
        self.title = str(body.get("title", "Request refused"))
        self.extra = {
            key: value
            for key, value in body.items()
            if key not in ("type", "title", "status", "detail", "code")
        }


class InventoryClient:
    def __init__(self, client: ServiceClient) -> None:
        self.client = client

    async def claim_serial(
        self,
        *,
        owner: str,
        job_id: uuid.UUID,
        serial: str | None,
        attempt: uuid.UUID | None = None,
    ) -> str:
        """Reserve an owned, unused serial for `job_id` (idempotent per job), on behalf of
        upload `attempt`."""
        body = {"owner": owner, "job_id": str(job_id), "serial": serial}
        if attempt is not None:
            body["attempt"] = str(attempt)
        response = await self._post("/internal/v1/serials/claim", body)
        return str(response.json()["serial"])

    async def release_serial(self, job_id: uuid.UUID, *, attempt: uuid.UUID | None = None) -> None:
        """Give the serial of `job_id` back (idempotent); with `attempt`, only while that
        attempt's claim stands."""
        body = {"job_id": str(job_id)}
        if attempt is not None:
            body["attempt"] = str(attempt)
        await self._post("/internal/v1/serials/release", body)

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self.client.request("POST", path, json=body)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable("Inventory is not reachable; try again shortly.") from exc
        if response.status_code >= 500:
            raise ServiceUnavailable("Inventory is unavailable; try again shortly.")
        if response.status_code in _CALLER_FACING:
            raise UpstreamProblem(response.status_code, response.json())
        # Anything else means the two services disagree about the contract: a bug, not the
        # caller's fault.
        response.raise_for_status()
        return response
