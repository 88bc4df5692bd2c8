"""What every gateway answer carries: security headers, and CORS for configured origins only."""

from __future__ import annotations

import pytest

from tests.harness import ServiceStack

pytestmark = pytest.mark.workers(0)

ORIGIN = "https://app.distributor.example"


@pytest.mark.settings(gateway={"cors_allow_origins": [ORIGIN]})
async def test_security_headers_and_cors(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        for response in (
            await client.get("/api/v1/balance"),  # proxied (lean lane)
            await client.get("/openapi.json"),  # the gateway's own route
            await client.get("/api/v1/nothing-here"),  # a problem
        ):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert "strict-transport-security" not in response.headers  # not HTTPS here

        preflight = await client.options(
            "/api/v1/purchases",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        bought = await client.get("/api/v1/balance", headers={"Origin": ORIGIN})
        assert bought.headers["access-control-allow-origin"] == ORIGIN
        assert "RateLimit" in bought.headers["access-control-expose-headers"]

        stranger = await client.get("/api/v1/balance", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers


async def test_no_cors_unless_configured(stack: ServiceStack) -> None:
    async with stack.client() as client:
        response = await client.get("/queue/status", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in response.headers
