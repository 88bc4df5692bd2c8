"""Every error a client can see is an RFC 9457 problem document with a stable `code`."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from pydantic import BaseModel

from services.platform.errors import (
    Conflict,
    Forbidden,
    MeteraiError,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)
from tests.platform.apps import asgi_client, assert_problem, service_app


class InsufficientBalance(MeteraiError):
    status = 402
    code = "insufficient_balance"
    title = "Insufficient balance"


class NewItem(BaseModel):
    name: str
    quantity: int


router = APIRouter()


@router.get("/raise/balance")
async def raise_balance() -> None:
    raise InsufficientBalance(
        "You need 10 more.", extra={"balance": 5, "required": 15}, headers={"X-Hint": "top-up"}
    )


@router.get("/raise/bare")
async def raise_bare() -> None:
    raise InsufficientBalance()


@router.get("/raise/unavailable")
async def raise_unavailable() -> None:
    raise ServiceUnavailable("The queue is full.", retry_after=7)


@router.get("/raise/unavailable-default")
async def raise_unavailable_default() -> None:
    raise ServiceUnavailable()


@router.get("/raise/unauthorized")
async def raise_unauthorized() -> None:
    raise Unauthorized("Who are you?")


@router.get("/raise/not-found")
async def raise_not_found() -> None:
    raise NotFound("No such purchase.")


@router.get("/raise/forbidden")
async def raise_forbidden() -> None:
    raise Forbidden("Not yours.")


@router.get("/raise/conflict")
async def raise_conflict() -> None:
    raise Conflict("Already stamped.")


@router.get("/raise/http/{status}")
async def raise_http(status: int) -> None:
    raise HTTPException(status_code=status, detail={"why": "because"})


@router.get("/raise/crash")
async def raise_crash() -> None:
    raise RuntimeError("secret internals: password=hunter2")


@router.post("/items")
async def create_item(item: NewItem) -> NewItem:
    return item


@router.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return service_app("pterrors", [router])


async def test_a_domain_error_renders_status_code_detail_extras_and_headers(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        response = await client.get("/raise/balance")
    body = assert_problem(response, 402, "insufficient_balance")
    assert response.headers["content-type"] == "application/problem+json"
    assert body["title"] == "Insufficient balance"
    assert body["detail"] == "You need 10 more."
    assert body["balance"] == 5 and body["required"] == 15
    assert response.headers["x-hint"] == "top-up"


async def test_a_domain_error_without_detail_uses_its_title(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        body = assert_problem(await client.get("/raise/bare"), 402, "insufficient_balance")
    assert body["detail"] == "Insufficient balance"
    assert set(body) == {"type", "title", "status", "detail", "code"}


async def test_service_unavailable_carries_retry_after(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        explicit = await client.get("/raise/unavailable")
        default = await client.get("/raise/unavailable-default")
    assert assert_problem(explicit, 503, "unavailable")["detail"] == "The queue is full."
    assert explicit.headers["retry-after"] == "7"
    assert_problem(default, 503, "unavailable")
    assert default.headers["retry-after"] == "5"


async def test_unauthorized_carries_www_authenticate(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        response = await client.get("/raise/unauthorized")
    assert assert_problem(response, 401, "unauthorized")["detail"] == "Who are you?"
    assert response.headers["www-authenticate"] == 'Bearer realm="meterai"'


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/raise/not-found", 404, "not_found"),
        ("/raise/forbidden", 403, "forbidden"),
        ("/raise/conflict", 409, "conflict"),
    ],
)
async def test_the_standard_domain_errors_have_their_status_and_code(
    app: FastAPI,
    path: str,
    status: int,
    code: str,
) -> None:
    async with asgi_client(app) as client:
        assert_problem(await client.get(path), status, code)


async def test_an_invalid_body_is_a_422_with_every_error_listed(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        response = await client.post("/items", json={"name": "stamp", "quantity": "many"})
    body = assert_problem(response, 422, "invalid_request")
    errors = body["errors"]
    assert isinstance(errors, list) and len(errors) == 1
    assert errors[0]["loc"] == ["body", "quantity"]
    assert errors[0]["type"] == "int_parsing"
    assert errors[0]["msg"]
    assert isinstance(body["detail"], str) and body["detail"].startswith("quantity: ")


async def test_a_missing_body_and_a_bad_path_parameter_are_422(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        missing = await client.post("/items", json={})
        bad_path = await client.get("/items/not-a-number")
    missing_errors = assert_problem(missing, 422, "invalid_request")["errors"]
    assert isinstance(missing_errors, list)
    assert sorted(tuple(e["loc"]) for e in missing_errors) == [
        ("body", "name"),
        ("body", "quantity"),
    ]
    assert {e["type"] for e in missing_errors} == {"missing"}
    path_errors = assert_problem(bad_path, 422, "invalid_request")["errors"]
    assert isinstance(path_errors, list)
    assert [e["loc"] for e in path_errors] == [["path", "item_id"]]


async def test_malformed_json_is_a_400_malformed_json(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        response = await client.post(
            "/items", content=b'{"name": "stamp", ', headers={"content-type": "application/json"}
        )
    body = assert_problem(response, 400, "malformed_json")
    assert "errors" not in body


async def test_an_unknown_route_is_a_404_problem(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        assert_problem(await client.get("/no/such/route"), 404, "not_found")


async def test_a_wrong_method_is_a_405_problem_with_allow(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        response = await client.delete("/items")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


async def test_an_http_exception_keeps_its_status_and_gets_a_derived_code(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        teapot = await client.get("/raise/http/418")
        too_large = await client.get("/raise/http/413")
    body = assert_problem(teapot, 418, "http_418")
    assert body["title"] == "I'm a Teapot"
    assert body["detail"] == '{"why": "because"}'
    assert_problem(too_large, 413, "payload_too_large")


async def test_an_unexpected_exception_is_a_500_problem_that_leaks_nothing(app: FastAPI) -> None:
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get("/raise/crash")
    body = assert_problem(response, 500, "internal_error")
    assert "hunter2" not in response.text
    assert body["detail"] == "An unexpected error occurred; it was logged."
