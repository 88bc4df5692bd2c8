"""Acceptance 1: three times what stamping is given, offered at the gateway. What is accepted
completes and stays fast; the rest is refused at once with Retry-After; nothing is a 500 and the
memory of the process stays bounded."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import httpx
import psutil
import pytest

from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf

UPLOAD_BUDGET = 4
CLIENTS = 3 * UPLOAD_BUDGET
SECONDS = 3.0
MAX_UPLOADS = 900


@pytest.mark.workers(1)
@pytest.mark.settings(
    gateway={
        "max_in_flight_per_class": {"read": 512, "room": 512, "write": 384, "upload": 4},
        "distributor_rate_per_second": 10_000,
        "distributor_burst": 10_000,
    }
)
async def test_three_times_the_capacity(stack: ServiceStack) -> None:
    await stack.mint(MAX_UPLOADS)
    api_key = await stack.create_distributor(balance=MAX_UPLOADS * 10_000)
    pdf = make_pdf(1)
    async with stack.client(api_key) as client:
        bought = await client.post("/api/v1/purchases", json={"quantity": MAX_UPLOADS})
        assert bought.status_code == 201, bought.text

    accepted: list[tuple[str, float]] = []
    refused: list[httpx.Response] = []
    offered = 0
    deadline = time.monotonic() + SECONDS

    async def uploader(client: httpx.AsyncClient) -> None:
        nonlocal offered
        while time.monotonic() < deadline and offered < MAX_UPLOADS:
            offered += 1
            started = time.monotonic()
            response = await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", pdf, "application/pdf")}
            )
            if response.status_code == 202:
                accepted.append((response.json()["id"], time.monotonic() - started))
            else:
                refused.append(response)
                await asyncio.sleep(0.05)  # a brief pause, as a client would (not a spin)

    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()
    try:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(
            base_url=stack.gateway_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
            limits=limits,
        ) as client:
            await asyncio.gather(*(uploader(client) for _ in range(CLIENTS)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = process.memory_info().rss - rss_before

    assert accepted and refused, (len(accepted), len(refused))
    for response in refused:
        assert response.status_code in (429, 503), response.text
        assert response.json()["code"] in ("rate_limited", "overloaded")
        assert int(response.headers["retry-after"]) >= 1
    latencies = sorted(seconds for _, seconds in accepted)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < 1.0, p99
    # Every service of the stack runs in this process, so this bounds the gateway and more.
    assert peak < 64 * 1024 * 1024, peak
    assert rss_growth < 128 * 1024 * 1024, rss_growth
    print(  # noqa: T201 - the figures, for the report
        f"offered {offered}, accepted {len(accepted)}, refused {len(refused)}, "
        f"p99 {p99 * 1000:.0f} ms, traced peak {peak / 2**20:.1f} MiB, "
        f"rss growth {rss_growth / 2**20:.1f} MiB"
    )

    async with stack.client(api_key) as client:

        async def all_done() -> bool:
            for job_id, _ in accepted:
                job = (await client.get(f"/api/v1/stampings/{job_id}")).json()
                if job["status"] != "done":
                    assert job["status"] != "failed", job
                    return False
            return True

        await wait_for(all_done, within=40, interval=0.5)
