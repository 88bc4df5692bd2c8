"""`/livez`, `/readyz` and `/healthz`: readiness fails when a dependency check fails or hangs."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from services.platform.health import HealthChecks
from tests.platform.apps import asgi_client, service_app


def checks_of(app: FastAPI) -> HealthChecks:
    checks = app.state.health
    assert isinstance(checks, HealthChecks)
    return checks


async def passing() -> None:
    return None


async def failing() -> None:
    raise ConnectionRefusedError("database down")


async def hanging() -> None:
    await asyncio.sleep(30)


async def with_detail() -> dict[str, int]:
    return {"workers": 3}


async def test_livez_is_ok_without_any_check() -> None:
    async with asgi_client(service_app("pthealth")) as client:
        response = await client.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "service": "pthealth"}


async def test_readyz_is_200_when_every_check_passes() -> None:
    app = service_app("pthealth")
    checks_of(app).add("database", passing)
    checks_of(app).add("workers", with_detail)
    async with asgi_client(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["service"] == "pthealth"
    assert body["status"] == "ok"
    assert body["checks"]["database"]["status"] == "ok"
    assert "detail" not in body["checks"]["database"]
    assert body["checks"]["workers"]["detail"] == {"workers": 3}
    assert isinstance(body["checks"]["workers"]["latency_ms"], float)


async def test_readyz_is_503_when_a_check_raises() -> None:
    app = service_app("pthealth")
    checks_of(app).add("cache", passing)
    checks_of(app).add("database", failing)
    async with asgi_client(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"] == {
        "status": "fail",
        "error": "ConnectionRefusedError: database down",
        "latency_ms": body["checks"]["database"]["latency_ms"],
    }
    assert body["checks"]["cache"]["status"] == "ok"


async def test_readyz_is_503_when_a_check_times_out_and_does_not_wait_for_it() -> None:
    app = service_app("pthealth")
    checks_of(app).timeout = 0.2
    checks_of(app).add("broker", hanging)
    loop = asyncio.get_running_loop()
    async with asgi_client(app) as client:
        started = loop.time()
        response = await client.get("/readyz")
        elapsed = loop.time() - started
    assert response.status_code == 503
    check = response.json()["checks"]["broker"]
    assert check["status"] == "fail"
    assert check["error"] == "TimeoutError"
    assert 0.2 <= elapsed < 2


async def test_an_informational_check_shows_in_healthz_but_does_not_fail_readyz() -> None:
    app = service_app("pthealth")
    checks_of(app).add("database", passing)
    checks_of(app).add("signing_workers", failing, readiness=False)
    async with asgi_client(app) as client:
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"database"}
    assert health.status_code == 503
    assert health.json()["status"] == "fail"
    assert health.json()["checks"]["signing_workers"]["status"] == "fail"
    assert health.json()["checks"]["database"]["status"] == "ok"


async def test_checks_run_concurrently() -> None:
    app = service_app("pthealth")

    async def slow() -> None:
        await asyncio.sleep(0.3)

    for name in ("a", "b", "c", "d"):
        checks_of(app).add(name, slow)
    loop = asyncio.get_running_loop()
    async with asgi_client(app) as client:
        started = loop.time()
        response = await client.get("/healthz")
        elapsed = loop.time() - started
    assert response.status_code == 200
    assert elapsed < 1.0  # four 0.3 s checks in sequence would take 1.2 s


async def test_a_service_with_its_own_healthz_gets_no_platform_healthz() -> None:
    app = service_app("pthealth", include_healthz=False)
    async with asgi_client(app) as client:
        assert (await client.get("/healthz")).status_code == 404
        assert (await client.get("/readyz")).status_code == 200
