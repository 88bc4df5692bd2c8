"""Distributor keys are re-checked in the background: while inventory cannot be asked, a known
key keeps working on its last answer for a bounded time; unknown keys are not let in."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from services.inventory.app import create_app as create_inventory
from tests.harness import Served, ServiceStack, wait_for

CACHE_SECONDS = 0.5
STALE_SECONDS = 4.0

pytestmark = [
    pytest.mark.workers(0),
    pytest.mark.settings(
        gateway={"auth_cache_seconds": CACHE_SECONDS, "auth_stale_seconds": STALE_SECONDS}
    ),
]


async def test_a_known_key_outlives_an_inventory_outage_for_the_stale_window_only(
    stack: ServiceStack,
) -> None:
    known_key = await stack.create_distributor()
    unknown_key = await stack.create_distributor()  # valid, but never seen by the gateway
    # Served by stamping (inventory is asked only to authenticate): 404 means "let in".
    path = f"/api/v1/stampings/{uuid.uuid4()}"
    async with stack.client(known_key) as known, stack.client(unknown_key) as unknown:
        assert (await known.get(path)).status_code == 404
        last_answer = time.monotonic()  # the gateway's last good answer from inventory

        inventory = stack.servers["inventory"]
        await inventory.stop()
        try:
            # Past the cache period: every request now starts a re-check that fails, and is
            # answered from the last good answer meanwhile.
            await asyncio.sleep(CACHE_SECONDS * 2)
            for _ in range(5):
                response = await known.get(path)
                assert response.status_code == 404, response.text
                await asyncio.sleep(0.2)
            refused = await unknown.get(path)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "unavailable"
            assert int(refused.headers["retry-after"]) >= 1

            # Not forever: once the last good answer is older than the stale window, the
            # known key too waits for inventory.
            async def known_refused() -> bool:
                return (await known.get(path)).status_code == 503

            await wait_for(known_refused, within=STALE_SECONDS + 5, interval=0.2)
            assert time.monotonic() - last_answer >= STALE_SECONDS - 0.2
        finally:
            restarted = Served(create_inventory(stack.inventory_settings()), inventory.port)
            await restarted.start()
            stack.servers["inventory"] = restarted

        async def let_in_again() -> bool:
            return (await known.get(path)).status_code == 404

        await wait_for(let_in_again, within=10, interval=0.2)
        assert (await unknown.get(path)).status_code == 404
