"""The lean lane of `ServiceApp`: hot routes skip FastAPI's machinery but keep request ids,
metrics, access logs and the same problem documents."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from services.platform.app import SecurityHeadersMiddleware, ServiceApp, read_json_body
from services.platform.errors import Conflict
from tests.platform.apps import asgi_client, assert_problem, service_app
from tests.platform.test_observability import sample


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quantity: StrictInt = Field(gt=0, le=1000)


router = APIRouter()


@router.post("/documented")
async def documented(order: Order) -> dict[str, int]:
    return {"quantity": order.quantity}


async def hot_order(scope: Scope, receive: Receive, send: Send) -> None:
    order = await read_json_body(Request(scope, receive), Order)
    await JSONResponse({"quantity": order.quantity})(scope, receive, send)


async def hot_item(scope: Scope, receive: Receive, send: Send) -> None:
    item = scope["path_params"]["item_id"]
    if item == "taken":
        raise Conflict("That item is taken.", extra={"item": item})
    if item == "crash":
        raise RuntimeError("boom")
    await JSONResponse({"item": item})(scope, receive, send)


@pytest.fixture(scope="module")
def app() -> ServiceApp:
    app = service_app("hotlane", [router])
    app.add_hot_route("POST", "/documented", hot_order)
    app.add_hot_route("POST", "/orders", hot_order)
    app.add_hot_route("GET", "/items/{item_id}", hot_item)
    return app


async def test_hot_routes_answer_with_path_parameters_and_request_ids(app: ServiceApp) -> None:
    async with asgi_client(app) as client:
        response = await client.get("/items/abc", headers={"x-request-id": "edge-request-0001"})
        assert response.status_code == 200
        assert response.json() == {"item": "abc"}
        assert response.headers["x-request-id"] == "edge-request-0001"
        fresh = await client.post("/orders", json={"quantity": 2})
        assert fresh.json() == {"quantity": 2}
        assert len(fresh.headers["x-request-id"]) == 32


async def test_hot_routes_are_counted_by_template(app: ServiceApp) -> None:
    async with asgi_client(app) as client:
        name = "meterai_hotlane_http_requests_total"
        labels = {"method": "GET", "route": "/items/{item_id}", "status": "200"}
        before = sample((await client.get("/metrics")).text, name, **labels)
        for item in ("a", "b", "c"):
            assert (await client.get(f"/items/{item}")).status_code == 200
        after = sample((await client.get("/metrics")).text, name, **labels)
        assert after - before == 3


async def test_domain_errors_become_problems(app: ServiceApp) -> None:
    async with asgi_client(app) as client:
        body = assert_problem(await client.get("/items/taken"), 409, "conflict")
        assert body["item"] == "taken"


async def test_a_crash_is_a_500_problem_carrying_the_request_id(app: ServiceApp) -> None:
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get("/items/crash", headers={"x-request-id": "edge-request-0002"})
        assert_problem(response, 500, "internal_error")
        assert response.headers["x-request-id"] == "edge-request-0002"


async def test_other_methods_and_paths_go_the_usual_way(app: ServiceApp) -> None:
    async with asgi_client(app) as client:
        wrong_method = await client.delete("/orders")
        assert_problem(wrong_method, 405, "method_not_allowed")
        assert wrong_method.headers["allow"] == "POST"
        assert_problem(await client.get("/items/a/b"), 404, "not_found")
        assert (await client.head("/items/abc")).status_code == 200
        assert (await client.get("/livez")).status_code == 200


async def test_a_shadowed_fastapi_route_still_documents_the_path(app: ServiceApp) -> None:
    async with asgi_client(app) as client:
        document = (await client.get("/openapi.json")).json()
        assert "requestBody" in document["paths"]["/documented"]["post"]
        assert "/orders" not in document["paths"]


BODIES = [
    (b'{"quantity": 3}', "application/json"),
    (b'{"quantity": 3}', "application/json; charset=utf-8"),
    (b'{"quantity": 3}', "application/merge-patch+json"),
    (b'{"quantity": 3}', None),
    (b'{"quantity": 3', "application/json"),
    (b"quantity=3", "application/x-www-form-urlencoded"),
    (b'{"quantity": 3}', "text/plain"),
    (b'{"quantity": 3}', "text/x+json"),
    (b'{"quantity": 3}', "APPLICATION/JSON"),
    (b"", "application/json"),
    (b"", None),
    (b"[]", "application/json"),
    (b"null", "application/json"),
    (b'"3"', "application/json"),
    (b'{"quantity": 0}', "application/json"),
    (b'{"quantity": 1.5}', "application/json"),
    (b'{"quantity": 3.0}', "application/json"),
    (b'{"quantity": "3"}', "application/json"),
    (b'{"quantity": true}', "application/json"),
    (b'{"quantity": 99999999999999999999999}', "application/json"),
    (b'{"quantity": 3, "price": 1}', "application/json"),
    (b'{"quantity": 3, "quantity": 4}', "application/json"),
    (b"\xff\xfe{", "application/json"),
]


@pytest.mark.parametrize(("content", "content_type"), BODIES)
async def test_read_json_body_fails_exactly_as_a_fastapi_body(
    app: ServiceApp, content: bytes, content_type: str | None
) -> None:
    """The same body to a FastAPI route and to a hot route gets the same answer."""
    # The FastAPI route as it stands without its shadow.
    plain = service_app("hotlane_plain", [router])
    headers = {"content-type": content_type} if content_type else {}
    async with asgi_client(plain) as fastapi_client, asgi_client(app) as hot_client:
        expected = await fastapi_client.post("/documented", content=content, headers=headers)
        actual = await hot_client.post("/orders", content=content, headers=headers)
    assert actual.status_code == expected.status_code, (expected.text, actual.text)
    if expected.status_code >= 400:
        assert actual.json()["code"] == expected.json()["code"]
        assert actual.headers["content-type"] == expected.headers["content-type"]
    else:
        assert json.loads(actual.content) == json.loads(expected.content)


async def test_edge_middleware_wraps_both_lanes() -> None:
    app = service_app("hotlane_edge", [router])
    app.add_hot_route("GET", "/items/{item_id}", hot_item)
    app.add_edge_middleware(SecurityHeadersMiddleware, hsts_seconds=3600)
    async with asgi_client(app) as client:
        for response in (
            await client.get("/items/abc"),  # lean lane
            await client.get("/livez"),  # FastAPI lane
            await client.get("/items/taken"),  # a problem
        ):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["strict-transport-security"].startswith("max-age=3600")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()


async def test_sampled_routes_log_errors_and_a_share_of_successes() -> None:
    app = service_app("sampled", [router])
    app.add_hot_route("GET", "/items/{item_id}", hot_item)
    app.add_hot_route("POST", "/orders", hot_order)
    caplog = _Lines()
    access = logging.getLogger("meterai.access")
    access.addHandler(caplog)
    level = access.level
    access.setLevel(logging.INFO)

    def logged(route: str) -> list[int]:
        return [
            record.msg["status"]  # type: ignore[index]
            for record in caplog.records
            if record.msg["route"] == route  # type: ignore[index]
        ]

    try:
        await _sampled(app, caplog, logged)
    finally:
        access.removeHandler(caplog)
        access.setLevel(level)


async def _sampled(app: ServiceApp, caplog: _Lines, logged: Callable[[str], list[int]]) -> None:
    app.sample_access_log("/items/{item_id}", 0.0)
    async with asgi_client(app, raise_app_exceptions=False) as client:
        for _ in range(20):
            assert (await client.get("/items/fine")).status_code == 200
        assert (await client.get("/items/taken")).status_code == 409
        assert (await client.get("/items/crash")).status_code == 500
        assert (await client.post("/orders", json={"quantity": 1})).status_code == 200
        # Successes of the sampled route are left out; its errors and other routes are not.
        assert logged("/items/{item_id}") == [409, 500]
        assert logged("/orders") == [200]
        counted = sample(
            (await client.get("/metrics")).text,
            "meterai_sampled_http_requests_total",
            method="GET",
            route="/items/{item_id}",
            status="200",
        )
        assert counted == 20  # the metrics still count every request

        caplog.clear()
        app.sample_access_log("/items/{item_id}", 0.5)
        for _ in range(400):
            await client.get("/items/fine")
        assert 120 < len(logged("/items/{item_id}")) < 280
