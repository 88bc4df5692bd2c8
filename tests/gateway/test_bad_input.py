"""Bad input on the public routes gets a problem+json 4xx with a stable code, never a 5xx."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.harness import ServiceStack
from tests.pdfs import make_pdf

PROBLEM = "application/problem+json"


@pytest.fixture
def stack(shared_stack: ServiceStack) -> ServiceStack:
    """These tests each use their own distributor, so they share one stack."""
    return shared_stack


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    assert response.headers.get("x-request-id")


SLICE_ROUTES = [
    ("POST", "/api/v1/purchases"),
    ("GET", "/api/v1/balance"),
    ("GET", "/api/v1/serials"),
    ("GET", f"/api/v1/purchases/{uuid.uuid4()}"),
    ("POST", "/api/v1/stampings"),
    ("GET", f"/api/v1/stampings/{uuid.uuid4()}"),
    ("GET", f"/api/v1/stampings/{uuid.uuid4()}/document"),
]


@pytest.mark.parametrize(("method", "path"), SLICE_ROUTES)
async def test_missing_and_wrong_keys_are_refused(
    stack: ServiceStack, method: str, path: str
) -> None:
    async with stack.client() as anonymous:
        response = await anonymous.request(method, path)
        assert_problem(response, 401, "missing_credentials")
        assert response.headers["www-authenticate"].startswith("Bearer")
    async with stack.client("mtr_not-a-real-key") as wrong:
        assert_problem(await wrong.request(method, path), 401, "invalid_api_key")
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, headers={"Authorization": "Basic dXNlcjpwYXNz"}
    ) as basic:
        assert_problem(await basic.request(method, path), 401, "unauthorized")


async def test_a_forged_internal_principal_header_is_ignored(stack: ServiceStack) -> None:
    async with stack.client() as client:
        response = await client.get(
            "/api/v1/balance", headers={"X-Meterai-Principal": "forged.token.value"}
        )
        assert_problem(response, 401, "missing_credentials")


async def test_internal_endpoints_are_not_routable(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        response = await client.post("/internal/v1/serials/claim", json={})
        assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"quantity": 1', "application/json", 400, "malformed_json"),
        (b"quantity=1", "application/x-www-form-urlencoded", 422, "invalid_request"),
        (b'{"quantity": 0}', "application/json", 422, "invalid_request"),
        (b'{"quantity": -3}', "application/json", 422, "invalid_request"),
        (b'{"quantity": 1.5}', "application/json", 422, "invalid_request"),
        (b'{"quantity": "2"}', "application/json", 422, "invalid_request"),
        (b'{"quantity": true}', "application/json", 422, "invalid_request"),
        (b'{"quantity": 99999999999999999999}', "application/json", 422, "invalid_request"),
        (b'{"quantity": 1, "price": 1}', "application/json", 422, "invalid_request"),
        (b"[]", "application/json", 422, "invalid_request"),
        (b"", "application/json", 422, "invalid_request"),
        (b'{"quantity": 5000}', "application/json", 422, "quantity_too_large"),
    ],
)
async def test_bad_purchase_bodies(
    stack: ServiceStack, content: bytes, content_type: str, status: int, code: str
) -> None:
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        response = await client.post(
            "/api/v1/purchases", content=content, headers={"content-type": content_type}
        )
        assert_problem(response, status, code)
        # Nothing was bought.
        assert (await client.get("/api/v1/balance")).json()["balance"] == 1_000_000


@pytest.mark.parametrize(
    ("files", "data", "status", "code"),
    [
        ({"file": ("a.txt", b"hello, not a pdf", "text/plain")}, {}, 415, "not_pdf"),
        ({"file": ("a.pdf", b"%PDF-1.7\nbroken", "application/pdf")}, {}, 422, "invalid_pdf"),
        ({"other": ("a.pdf", make_pdf(1), "application/pdf")}, {}, 422, "invalid_request"),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"page": "0"},
            422,
            "invalid_request",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"page": "x"},
            422,
            "invalid_request",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"page": "7"},
            422,
            "page_out_of_range",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"box": "1,2,3"},
            422,
            "invalid_request",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"box": "5000,5000,5090,5090"},
            422,
            "box_off_page",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"serial": "lowercase-serial"},
            422,
            "invalid_request",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"serial": "AAAAAAAAAAAAAAAAAAAAAA"},
            404,
            "not_found",
        ),
        (
            {"file": ("a.pdf", make_pdf(1), "application/pdf")},
            {"callback_url": "ftp://example.com"},
            422,
            "invalid_request",
        ),
    ],
)
async def test_bad_uploads(
    stack: ServiceStack,
    files: dict[str, tuple[str, bytes, str]],
    data: dict[str, str],
    status: int,
    code: str,
) -> None:
    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 1})
        response = await client.post("/api/v1/stampings", files=files, data=data)
        assert_problem(response, status, code)
        # The serial bought above is still unused: a refused upload claims nothing.
        assert (await client.get("/api/v1/balance")).json()["stamps"]["sold"] == 1


async def test_upload_that_is_not_multipart(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        response = await client.post(
            "/api/v1/stampings", content=make_pdf(1), headers={"content-type": "application/pdf"}
        )
        assert_problem(response, 415, "unsupported_media_type")
        garbled = await client.post(
            "/api/v1/stampings",
            content=b"--xyz\r\nnot really multipart",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert_problem(garbled, 400, "malformed_multipart")


async def test_another_distributors_ids_are_not_found(stack: ServiceStack) -> None:
    await stack.mint(2)
    alice = await stack.create_distributor()
    bob = await stack.create_distributor()
    async with stack.client(alice) as client:
        purchase = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()
        job = (
            await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
        ).json()
    async with stack.client(bob) as client:
        for path in (
            f"/api/v1/purchases/{purchase['id']}",
            f"/api/v1/stampings/{job['id']}",
            f"/api/v1/stampings/{job['id']}/document",
        ):
            assert_problem(await client.get(path), 404, "not_found")
        assert (await client.get("/api/v1/serials")).json()["items"] == []
        assert_problem(await client.get("/api/v1/purchases/not-a-uuid"), 422, "invalid_request")


async def test_unknown_paths_and_methods(stack: ServiceStack) -> None:
    async with stack.client() as client:
        assert_problem(await client.get("/nope"), 404, "not_found")
        assert_problem(await client.delete("/api/v1/purchases"), 405, "method_not_allowed")


@pytest.mark.parametrize("megabytes", [20.5, 22])
async def test_oversized_uploads_are_refused(stack: ServiceStack, megabytes: float) -> None:
    """Over the gateway's limit (21 MB) or the stamping service's own (20 MB)."""
    api_key = await stack.create_distributor()
    huge = b"%PDF-1.7\n" + b"0" * int(megabytes * 1024 * 1024)
    async with stack.client(api_key) as client:
        response = await client.post(
            "/api/v1/stampings", files={"file": ("big.pdf", huge, "application/pdf")}
        )
        assert_problem(response, 413, "payload_too_large")
