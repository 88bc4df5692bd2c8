"""Serials claimed by stamping jobs are settled even when the job's result never arrives:
inventory asks stamping about claims that stayed open, uses or gives back their serials, and
leaves alone the jobs that are still running."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalCodec, PrincipalKind
from services.stamping.inventory_client import InventoryClient
from tests.harness import INTERNAL_SECRET, ServiceStack, wait_for
from tests.pdfs import make_pdf

# Inventory listens where stamping never publishes: every result is lost on the way.
RESULTS_LOST = {
    "stamping_results_topic": "stamping.results.nobody-publishes-here",
    "claim_check_after_seconds": 0.5,
    "claim_check_interval_seconds": 0.2,
}


def checked(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("meterai_inventory_claims_checked_total", {"outcome": outcome})
        or 0.0
    )


async def _serial(stack: ServiceStack, serial: str) -> asyncpg.Record:
    connection = await asyncpg.connect(stack.inventory_db)
    try:
        row = await connection.fetchrow(
            "SELECT state::text, job_id, owner FROM serials WHERE serial = $1", serial
        )
    finally:
        await connection.close()
    assert row is not None
    return row


@pytest.mark.workers(0)
@pytest.mark.settings(inventory=RESULTS_LOST)
async def test_a_job_whose_result_was_lost_still_uses_its_serial_once_it_is_done(
    stack: ServiceStack,
) -> None:
    await stack.mint(2)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
        upload = await client.post(
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
        assert upload.status_code == 202, upload.text
        job_id = uuid.UUID(upload.json()["id"])

        # No worker yet: the job is queued, and its claim is checked and left as it is.
        before = checked("unfinished")

        async def checked_while_queued() -> bool:
            return checked("unfinished") >= before + 2

        await wait_for(checked_while_queued, within=30)
        row = await _serial(stack, serial)
        assert (row["state"], row["job_id"]) == ("sold", job_id)

        await stack.add_worker()

        async def used() -> bool:
            row = await _serial(stack, serial)
            return (row["state"], row["job_id"]) == ("used", job_id)

        await wait_for(used, within=60)
        stamps = (await client.get("/api/v1/balance")).json()["stamps"]
        assert stamps == {"reserved": 0, "sold": 0, "used": 1}
        assert (await client.get(f"/api/v1/stampings/{job_id}")).json()["status"] == "done"


@pytest.mark.settings(inventory={**RESULTS_LOST, "orphan_claim_after_seconds": 1.0})
async def test_a_claim_whose_upload_never_committed_is_given_back(stack: ServiceStack) -> None:
    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
    owner = (await _serial(stack, serial))["owner"]

    # Stamping claims the serial for a job, then crashes before the job's row commits.
    http = create_http_client(stack.servers["inventory"].url, timeout=5)
    try:
        inventory = InventoryClient(
            ServiceClient(
                http, PrincipalCodec(INTERNAL_SECRET), Principal(PrincipalKind.service, "stamping")
            )
        )
        vanished = uuid.uuid4()
        assert await inventory.claim_serial(owner=owner, job_id=vanished, serial=serial) == serial
        assert (await _serial(stack, serial))["job_id"] == vanished

        async def given_back() -> bool:
            row = await _serial(stack, serial)
            return (row["state"], row["job_id"]) == ("sold", None)

        await wait_for(given_back, within=30)
        # The distributor can stamp with it again.
        again = uuid.uuid4()
        assert await inventory.claim_serial(owner=owner, job_id=again, serial=serial) == serial
    finally:
        await http.aclose()
