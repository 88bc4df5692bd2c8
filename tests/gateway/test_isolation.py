"""Tenant isolation, walked over the gateway's route table: another caller's ids are 404.

Every parameterised route a distributor may call is tried by distributor B (and by an admitted
applicant, for the routes applicants share) with distributor A's real ids. The answer must be the
same 404 problem a missing id gets (not 403: that would confirm the id exists) and must carry
none of A's data. A parameter this module does not know fails the suite, so a new route cannot
slip by untested: add its parameter to `A_IDS` (and, if it is public by design, to `EXEMPT`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.gateway.routes import ROUTES, Access, Route
from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf

PROBLEM = "application/problem+json"
_PARAMETER = re.compile(r"{([^}:]+)(?::[^}]*)?}")

# Public routes with an id in the path, public by design; each with the reason.
EXEMPT: dict[tuple[str, str], str] = {
    ("GET", "/verify/{serial}"): "the QR code printed on every stamp opens it: anyone may check "
    "a serial, and it shows no owner, only the stamp's own facts",
    ("GET", "/static/{name}"): "the applicant's page assets (CSS, JS): the same for everyone",
}


@dataclass(frozen=True)
class Tenant:
    """Distributor A's footprint: a purchase, a finished stamping job, owned serials."""

    api_key: str
    distributor_id: str
    purchase_id: str
    job_id: str
    used_serial: str
    serials: list[str]

    def secrets(self) -> list[str]:
        """Strings that must never appear in an answer to somebody else."""
        return [
            self.distributor_id,
            self.purchase_id,
            self.job_id,
            *self.serials,
        ]


# How to fill each path parameter with one of A's real ids. A route whose parameter is missing
# here fails `test_every_parameter_has_an_id`.
A_IDS: dict[str, Callable[[Tenant], str]] = {
    "purchase_id": lambda a: a.purchase_id,
    "job_id": lambda a: a.job_id,
    "serial": lambda a: a.used_serial,
}


def parameters(route: Route) -> list[str]:
    return _PARAMETER.findall(route.path)


def protected_parameterised_routes() -> list[Route]:
    """Routes with path parameters that some principal other than the public may call."""
    return [
        route for route in ROUTES if parameters(route) and (route.method, route.path) not in EXEMPT
    ]


def fill(route: Route, tenant: Tenant) -> str:
    def one(match: re.Match[str]) -> str:
        return A_IDS[match.group(1)](tenant)

    return _PARAMETER.sub(one, route.path)


def assert_not_found(response: httpx.Response, tenant: Tenant, echoed: str = "") -> None:
    """The 404 of a missing id, with none of A's data (`echoed`: what the caller sent, which
    the problem's `detail` may repeat)."""
    assert response.status_code == 404, (response.request.url, response.text)
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == "not_found" and body["status"] == 404, body
    for secret in tenant.secrets():
        if secret != echoed:
            assert secret not in response.text, (secret, response.text)


def test_every_parameter_has_an_id() -> None:
    """A new parameterised route needs an id here (or an exemption with a reason)."""
    unknown = {
        (route.method, route.path, name)
        for route in protected_parameterised_routes()
        for name in parameters(route)
        if name not in A_IDS
    }
    assert not unknown, f"add these path parameters to A_IDS or the route to EXEMPT: {unknown}"
    # Exemptions must stay true: public routes that exist.
    table = {(route.method, route.path): route for route in ROUTES}
    for key in EXEMPT:
        assert key in table, f"stale exemption {key}"
        assert table[key].access is Access.public, f"{key} is exempt but not public"


def test_the_walk_covers_the_routes_it_must() -> None:
    """The walk is not vacuous: the id routes of the contract are all in it."""
    walked = {(route.method, route.path) for route in protected_parameterised_routes()}
    assert {
        ("GET", "/api/v1/purchases/{purchase_id}"),
        ("GET", "/api/v1/stampings/{job_id}"),
        ("GET", "/api/v1/stampings/{job_id}/document"),
    } <= walked
    # Every route a distributor cannot call is an operator route (which has no tenant ids).
    for route in protected_parameterised_routes():
        assert route.access in (Access.distributor, Access.customer), route


@pytest.fixture(scope="module")
async def tenant_a(shared_stack: ServiceStack) -> Tenant:
    """A distributor with a purchase of three serials, one of them used by a finished job."""
    stack = shared_stack
    await stack.mint(30)  # A, and every B of this module
    api_key = await stack.create_distributor("tenant-a")
    async with stack.client(api_key) as client:
        balance = (await client.get("/api/v1/balance")).json()
        purchase = await client.post(
            "/api/v1/purchases", json={"quantity": 3}, headers={"Idempotency-Key": "shared-key"}
        )
        assert purchase.status_code == 201, purchase.text
        serials: list[str] = purchase.json()["serials"]
        job = await client.post(
            "/api/v1/stampings",
            files={"file": ("a.pdf", make_pdf(1), "application/pdf")},
            data={"serial": serials[0]},
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        async def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = (await client.get(f"/api/v1/stampings/{job_id}")).json()
            return body if body["status"] in ("done", "failed") else None

        final = await wait_for(finished, within=60)
        assert final["status"] == "done", final
        # A sees its own document: the 404s below are about ownership, not readiness.
        document = await client.get(f"/api/v1/stampings/{job_id}/document")
        assert document.status_code == 200
    return Tenant(
        api_key=api_key,
        distributor_id=balance["distributor_id"],
        purchase_id=purchase.json()["id"],
        job_id=job_id,
        used_serial=serials[0],
        serials=serials,
    )


@pytest.fixture
def stack(shared_stack: ServiceStack) -> ServiceStack:
    return shared_stack


@pytest.mark.parametrize(
    "route",
    protected_parameterised_routes(),
    ids=lambda route: f"{route.method} {route.path}",
)
async def test_another_distributor_gets_404(
    stack: ServiceStack, tenant_a: Tenant, route: Route
) -> None:
    bob = await stack.create_distributor()
    async with stack.client(bob) as client:
        # B has data of its own, so an empty answer is not the only way to pass.
        assert (await client.post("/api/v1/purchases", json={"quantity": 1})).status_code == 201
        assert_not_found(await client.request(route.method, fill(route, tenant_a)), tenant_a)


@pytest.mark.parametrize(
    "route",
    [route for route in protected_parameterised_routes() if route.access is Access.customer],
    ids=lambda route: f"{route.method} {route.path}",
)
async def test_an_applicant_gets_404_for_a_distributors_ids(
    stack: ServiceStack, tenant_a: Tenant, route: Route
) -> None:
    async with stack.applicant(ticket=7) as client:
        assert_not_found(await client.request(route.method, fill(route, tenant_a)), tenant_a)


async def test_lists_show_only_the_callers_data(stack: ServiceStack, tenant_a: Tenant) -> None:
    bob = await stack.create_distributor(balance=50_000)
    async with stack.client(bob) as client:
        bought = await client.post("/api/v1/purchases", json={"quantity": 2})
        assert bought.status_code == 201, bought.text
        mine = set(bought.json()["serials"])
        for state in (None, "sold", "used", "reserved", "available"):
            params = {"state": state} if state else {}
            page = await client.get("/api/v1/serials", params=params)
            assert page.status_code == 200, page.text
            listed = {item["serial"] for item in page.json()["items"]}
            assert listed <= mine, state
            assert not any(secret in page.text for secret in tenant_a.secrets())
        # A cursor placed before A's serials still pages through B's alone.
        page = await client.get("/api/v1/serials", params={"after": "0" * 22})
        assert {item["serial"] for item in page.json()["items"]} == mine
        balance = (await client.get("/api/v1/balance")).json()
        assert balance["stamps"] == {"reserved": 0, "sold": 2, "used": 0}
        assert balance["distributor_id"] != tenant_a.distributor_id
        assert balance["balance"] == 50_000 - 2 * balance["stamp_price"]
    async with stack.applicant(ticket=8) as client:
        page = await client.get("/api/v1/serials")
        assert page.status_code == 200 and page.json()["items"] == []


async def test_an_idempotency_key_is_per_caller(stack: ServiceStack, tenant_a: Tenant) -> None:
    """B reusing A's Idempotency-Key gets its own purchase, never A's replayed answer."""
    bob = await stack.create_distributor()
    async with stack.client(bob) as client:
        response = await client.post(
            "/api/v1/purchases", json={"quantity": 3}, headers={"Idempotency-Key": "shared-key"}
        )
        assert response.status_code == 201, response.text
        assert response.headers.get("idempotent-replayed") is None
        assert not any(secret in response.text for secret in tenant_a.secrets())


async def test_another_distributors_serial_cannot_be_stamped(
    stack: ServiceStack, tenant_a: Tenant
) -> None:
    """Naming A's serial (used or not) in an upload is the 404 of an unknown serial."""
    bob = await stack.create_distributor()
    async with stack.client(bob) as client:
        assert (await client.post("/api/v1/purchases", json={"quantity": 1})).status_code == 201
        for serial in tenant_a.serials:
            response = await client.post(
                "/api/v1/stampings",
                files={"file": ("b.pdf", make_pdf(1), "application/pdf")},
                data={"serial": serial},
            )
            assert_not_found(response, tenant_a, echoed=serial)
