"""How loaded the backend is, as one number for the admission controller (1.0 = at capacity).

The signing workers are the scarce part of a surge: the waiting room reads stamping's backlog
(unfinished jobs and the age of the oldest) once a tick and admits fewer people while it grows.
A backend it cannot read counts as saturated: admitting people who cannot upload helps nobody.
"""

from __future__ import annotations

import httpx
import structlog
from prometheus_client import Gauge

from services.platform.http import ServiceClient

log = structlog.get_logger(__name__)

PRESSURE = Gauge(
    "meterai_queue_backend_pressure", "Backend load seen by admission (1 = at capacity)"
)
UNREADABLE = 2.0


class BackendPressure:
    def __init__(
        self, stamping: ServiceClient, *, backlog_jobs: int, backlog_seconds: float
    ) -> None:
        self.stamping = stamping
        self.backlog_jobs = backlog_jobs
        self.backlog_seconds = backlog_seconds

    async def __call__(self) -> float:
        try:
            response = await self.stamping.request("GET", "/internal/v1/backlog", timeout=2)
            response.raise_for_status()
            backlog = response.json()
            pressure = max(
                backlog["unfinished"] / self.backlog_jobs,
                backlog["oldest_seconds"] / self.backlog_seconds,
            )
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("backend_pressure_unreadable", error=repr(exc))
            pressure = UNREADABLE
        PRESSURE.set(pressure)
        return float(pressure)
