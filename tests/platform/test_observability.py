"""Request ids on every response and Prometheus metrics labelled by route template."""

from __future__ import annotations

import re

import pytest
from fastapi import APIRouter, FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from services.platform.http import current_request_id
from services.platform.observability import request_id_of
from tests.platform.apps import asgi_client, assert_problem, service_app

SERVICE = "ptobs"
HEX32 = re.compile(r"^[0-9a-f]{32}$")

router = APIRouter()


@router.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@router.get("/whoami")
async def whoami(request: Request) -> dict[str, str | None]:
    return {"state": request_id_of(request), "log_context": current_request_id()}


@router.get("/crash")
async def crash() -> None:
    raise RuntimeError("boom")


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return service_app(SERVICE, [router])


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(metrics):
        for candidate in family.samples:
            if candidate.name == name and candidate.labels == labels:
                return float(candidate.value)
    return 0.0


def route_labels(metrics: str, name: str) -> set[str]:
    return {
        candidate.labels["route"]
        for family in text_string_to_metric_families(metrics)
        for candidate in family.samples
        if candidate.name == name
    }


async def test_a_request_id_is_generated_when_none_is_sent(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        first = await client.get("/whoami")
        second = await client.get("/whoami")
    assert HEX32.match(first.headers["x-request-id"])
    assert HEX32.match(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    # Handlers and log lines see the same id the client gets back.
    assert first.json() == {
        "state": first.headers["x-request-id"],
        "log_context": first.headers["x-request-id"],
    }


async def test_a_valid_incoming_request_id_is_propagated(app: FastAPI) -> None:
    incoming = "edge-1234.abcd:EF-9"
    async with asgi_client(app) as client:
        response = await client.get("/whoami", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] == incoming
    assert response.json() == {"state": incoming, "log_context": incoming}
    assert response.headers.get_list("x-request-id") == [incoming]


async def test_an_invalid_incoming_request_id_is_replaced(app: FastAPI) -> None:
    invalid = ["has spaces in it", "short", "x" * 129, "semi;colon;injection"]
    async with asgi_client(app) as client:
        for value in invalid:
            response = await client.get("/whoami", headers={"X-Request-ID": value})
            assigned = response.headers["x-request-id"]
            assert HEX32.match(assigned), (value, assigned)
            assert response.json()["state"] == assigned


async def test_problem_responses_carry_the_request_id(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        not_found = await client.get("/nowhere", headers={"X-Request-ID": "trace-404-abcdef"})
        invalid = await client.get("/items/x", headers={"X-Request-ID": "trace-422-abcdef"})
    assert_problem(not_found, 404, "not_found")
    assert not_found.headers["x-request-id"] == "trace-404-abcdef"
    assert_problem(invalid, 422, "invalid_request")
    assert invalid.headers["x-request-id"] == "trace-422-abcdef"


async def test_a_crash_response_carries_the_request_id_the_log_line_has(app: FastAPI) -> None:
    # The 500 says "it was logged": without the id the caller cannot point at that log line.
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get("/crash", headers={"X-Request-ID": "trace-500-abcdef"})
    assert_problem(response, 500, "internal_error")
    assert response.headers.get("x-request-id") == "trace-500-abcdef"


async def test_metrics_count_requests_by_route_template_not_raw_path(app: FastAPI) -> None:
    name = f"meterai_{SERVICE}_http_requests_total"
    labels = {"method": "GET", "route": "/items/{item_id}", "status": "200"}
    async with asgi_client(app) as client:
        before = (await client.get("/metrics")).text
        for item_id in (101, 102, 103):
            assert (await client.get(f"/items/{item_id}")).status_code == 200
        assert (await client.get("/items/abc")).status_code == 422
        assert (await client.get("/not/a/route/42")).status_code == 404
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    assert sample(after, name, **labels) - sample(before, name, **labels) == 3
    invalid = {"method": "GET", "route": "/items/{item_id}", "status": "422"}
    assert sample(after, name, **invalid) - sample(before, name, **invalid) == 1
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert sample(after, name, **unmatched) - sample(before, name, **unmatched) == 1
    routes = route_labels(after, name)
    assert not any(re.search(r"\d", route) for route in routes), routes
    duration = f"meterai_{SERVICE}_http_request_duration_seconds_count"
    template = {"method": "GET", "route": "/items/{item_id}"}
    assert sample(after, duration, **template) - sample(before, duration, **template) == 4
    assert sample(after, f"meterai_{SERVICE}_http_requests_in_flight") == 1  # this scrape


async def test_a_crash_is_counted_as_a_500(app: FastAPI) -> None:
    name = f"meterai_{SERVICE}_http_requests_total"
    labels = {"method": "GET", "route": "/crash", "status": "500"}
    async with asgi_client(app, raise_app_exceptions=False) as client:
        before = (await client.get("/metrics")).text
        assert (await client.get("/crash")).status_code == 500
        after = (await client.get("/metrics")).text
    assert sample(after, name, **labels) - sample(before, name, **labels) == 1
