"""When the room's store (Redis) cannot be reached, joining answers 503 with Retry-After and a
stable code, never a 500: the page and API clients simply try again."""

from __future__ import annotations

import httpx

from services.platform.embedded import free_port
from services.queue.app import create_app
from services.queue.config import QueueSettings
from tests.harness import ADMISSION_SECRET, INTERNAL_SECRET, Served


async def test_joining_without_redis_is_a_503_to_retry() -> None:
    settings = QueueSettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        internal_secret=INTERNAL_SECRET,
        admission_secret=ADMISSION_SECRET,
        log_json=True,
        log_level="WARNING",
    )
    served = Served(create_app(settings))
    await served.start()
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            response = await client.post("/queue/join")
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == "room_unavailable"
            assert int(response.headers["retry-after"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "redis" in ready.text
    finally:
        await served.stop()
