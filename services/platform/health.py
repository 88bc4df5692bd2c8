"""Liveness, readiness and health reports.

`/livez`: the process serves (Kubernetes liveness). `/readyz`: the service's own dependencies
answer (Kubernetes readiness; 503 otherwise). `/healthz`: the same report for humans and
monitors; the gateway replaces it with a report of the whole system.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

HealthCheck = Callable[[], Awaitable[object]]
"""An async callable that raises (or times out) when the dependency is unhealthy."""


class HealthChecks:
    """Named dependency checks run concurrently, each under a timeout."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._checks: dict[str, HealthCheck] = {}
        self._informational: set[str] = set()

    def add(self, name: str, check: HealthCheck, *, readiness: bool = True) -> None:
        """Register a check; `readiness=False` reports it in `/healthz` without making the
        service unready (e.g. "no signing worker seen": uploads are still accepted)."""
        self._checks[name] = check
        if not readiness:
            self._informational.add(name)

    async def report(self, *, readiness_only: bool = False) -> dict[str, Any]:
        """`{"status": "ok"|"fail", "checks": {name: {"status", "latency_ms", "error"?}}}`."""
        names = [
            name for name in self._checks if not (readiness_only and name in self._informational)
        ]
        results = await asyncio.gather(*(self._run(self._checks[name]) for name in names))
        checks = dict(zip(names, results, strict=True))
        ok = all(result["status"] == "ok" for result in checks.values())
        return {"status": "ok" if ok else "fail", "checks": checks}

    async def _run(self, check: HealthCheck) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                detail = await check()
        except Exception as exc:  # noqa: BLE001 - any failure is a failed check
            return {
                "status": "fail",
                "error": f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        result: dict[str, Any] = {
            "status": "ok",
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if isinstance(detail, dict):
            result["detail"] = detail
        return result


def health_checks_of(request: Request) -> HealthChecks:
    """The checks the app's lifespan registered (none before the lifespan ran)."""
    checks = getattr(request.app.state, "health", None)
    return checks if isinstance(checks, HealthChecks) else HealthChecks()


def health_router(*, service: str, include_healthz: bool = True) -> APIRouter:
    """`/livez`, `/readyz` and (unless the service reports more) `/healthz`."""
    router = APIRouter(include_in_schema=False)

    @router.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok", "service": service}

    async def readiness(request: Request) -> JSONResponse:
        report = await health_checks_of(request).report(readiness_only=True)
        return JSONResponse(
            {"service": service, **report}, status_code=200 if report["status"] == "ok" else 503
        )

    async def health(request: Request) -> JSONResponse:
        report = await health_checks_of(request).report()
        return JSONResponse(
            {"service": service, **report}, status_code=200 if report["status"] == "ok" else 503
        )

    router.add_api_route("/readyz", readiness, methods=["GET"])
    if include_healthz:
        router.add_api_route("/healthz", health, methods=["GET"])
    return router
