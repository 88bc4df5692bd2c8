"""Closed-loop admission: the waiting room slows down while the signing workers fall behind and
speeds up again when they catch up."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import OPS_TOKEN, ServiceStack, wait_for
from tests.pdfs import make_pdf

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


@pytest.mark.workers(0)
@pytest.mark.settings(
    queue={"backlog_target_jobs": 4, "backlog_target_seconds": 3, "join_limit_per_ip": 0}
)
async def test_admission_follows_the_signing_backlog(stack: ServiceStack) -> None:
    await stack.mint(12)
    api_key = await stack.create_distributor()
    async with stack.client() as ops, stack.client(api_key) as distributor:

        async def view() -> dict[str, Any]:
            response = await ops.get("/ops/queue", headers=OPS)
            assert response.status_code == 200, response.text
            room: dict[str, Any] = response.json()
            return room

        await ops.patch("/ops/queue", json={"admit_per_minute": 600}, headers=OPS)
        assert (await view())["effective_per_minute"] == 600
        # Nobody signs yet: the backlog builds up.
        assert (await distributor.post("/api/v1/purchases", json={"quantity": 12})).is_success
        for _ in range(12):
            uploaded = await distributor.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
            assert uploaded.status_code == 202, uploaded.text

        async def slowed() -> dict[str, Any] | None:
            room = await view()
            return room if room["effective_per_minute"] <= 0.2 * 600 else None

        throttled = await wait_for(slowed, within=20)
        assert throttled["admit_per_minute"] == 600  # the operators' setting is untouched

        # A worker arrives and drains the backlog: admission recovers to the full rate.
        await stack.add_worker()

        async def recovered() -> bool:
            return bool((await view())["effective_per_minute"] == 600)

        await wait_for(recovered, within=60, interval=0.5)
