"""Serials claimed by stamping jobs are settled even when the job's result never arrives:
inventory asks stamping about claims that stayed open, uses or gives back their serials, and
leaves alone the jobs that are still running."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from tests.harness import ServiceStack, wait_for
from tests.inventory.helpers import as_stamping, serial_row
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


async def _one_stamp(stack: ServiceStack) -> tuple[str, str]:
    """A new distributor's API key and the one serial it bought."""
    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
    return api_key, serial


@pytest.mark.workers(0)
@pytest.mark.settings(inventory=RESULTS_LOST)
async def test_a_job_whose_result_was_lost_still_uses_its_serial_once_it_is_done(
    stack: ServiceStack,
) -> None:
    api_key, serial = await _one_stamp(stack)
    async with stack.client(api_key) as client:
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
        row = await serial_row(stack, serial)
        assert (row["state"], row["job_id"]) == ("sold", job_id)

        await stack.add_worker()

        async def used() -> bool:
            row = await serial_row(stack, serial)
            return (row["state"], row["job_id"]) == ("used", job_id)

        await wait_for(used, within=60)
        stamps = (await client.get("/api/v1/balance")).json()["stamps"]
        assert stamps == {"reserved": 0, "sold": 0, "used": 1}
        assert (await client.get(f"/api/v1/stampings/{job_id}")).json()["status"] == "done"


@pytest.mark.settings(inventory={**RESULTS_LOST, "orphan_claim_after_seconds": 1.0})
async def test_a_claim_whose_upload_never_committed_is_given_back(stack: ServiceStack) -> None:
    _, serial = await _one_stamp(stack)
    owner = (await serial_row(stack, serial))["owner"]

    # Stamping claims the serial for a job, then crashes before the job's row commits.
    async with as_stamping(stack) as inventory:
        vanished = uuid.uuid4()
        assert await inventory.claim_serial(owner=owner, job_id=vanished, serial=serial) == serial
        assert (await serial_row(stack, serial))["job_id"] == vanished

        async def given_back() -> bool:
            row = await serial_row(stack, serial)
            return (row["state"], row["job_id"]) == ("sold", None)

        await wait_for(given_back, within=30)
        # The distributor can stamp with it again.
        again = uuid.uuid4()
        assert await inventory.claim_serial(owner=owner, job_id=again, serial=serial) == serial


# PostgreSQL going away, as a restart looks to the statement that meets it.
_FAIL_LIKE_A_RESTART = """
CREATE FUNCTION fail_like_a_restart() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'terminating connection due to administrator command'
        USING ERRCODE = 'admin_shutdown';
END $$
"""


async def _execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _commits_and_give_backs_fail(stack: ServiceStack) -> None:
    """Stamping's commit fails after inventory granted the claim, and so does the give-back:
    the database both use restarts in between (what the surge's fault rehearsal met)."""
    await _execute(
        stack.stamping_db,
        _FAIL_LIKE_A_RESTART,
        "CREATE CONSTRAINT TRIGGER restart_at_commit AFTER INSERT ON stamping_jobs"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_like_a_restart()",
    )
    await _execute(
        stack.inventory_db,
        _FAIL_LIKE_A_RESTART,
        "CREATE TRIGGER restart_at_release BEFORE UPDATE ON serials FOR EACH ROW"
        " WHEN (OLD.job_id IS NOT NULL AND NEW.job_id IS NULL)"
        " EXECUTE FUNCTION fail_like_a_restart()",
    )


async def _claim(stack: ServiceStack, serial: str) -> tuple[str, uuid.UUID | None]:
    row = await serial_row(stack, serial)
    return row["state"], row["job_id"]


@pytest.mark.workers(0)
async def test_a_retried_upload_takes_over_the_claim_its_failed_attempt_could_not_give_back(
    stack: ServiceStack,
) -> None:
    api_key, serial = await _one_stamp(stack)
    await _commits_and_give_backs_fail(stack)
    document = make_pdf(1)
    async with stack.client(api_key) as client:

        async def upload() -> httpx.Response:
            return await client.post(
                "/api/v1/stampings",
                files={"file": ("a.pdf", document, "application/pdf")},
                headers={"Idempotency-Key": "cv-upload-1"},
            )

        failed = await upload()
        assert failed.status_code == 503, failed.text
        assert failed.json()["code"] == "database_unavailable"
        assert failed.headers["retry-after"]
        left_behind = await serial_row(stack, serial)
        assert left_behind["state"] == "sold" and left_behind["job_id"] is not None

        # Stamping's database is back first: the retry takes the claim over. Then inventory's
        # is, and the failed attempt's give-back, tried again meanwhile, finds the claim no
        # longer its own: it leaves it with the job.
        await _execute(stack.stamping_db, "DROP TRIGGER restart_at_commit ON stamping_jobs")
        retried = await upload()
        assert retried.status_code == 202, retried.text
        job = retried.json()
        assert job["serial"] == serial
        job_id = uuid.UUID(job["id"])
        assert job_id == left_behind["job_id"]
        await _execute(stack.inventory_db, "DROP TRIGGER restart_at_release ON serials")
        await asyncio.sleep(3)  # the give-back's retries are 0.25, 0.5, 1, 2 s apart
        assert await _claim(stack, serial) == ("sold", job_id)

        await stack.add_worker()

        async def used() -> bool:
            return await _claim(stack, serial) == ("used", job_id)

        await wait_for(used, within=60)
        assert (await client.get(f"/api/v1/stampings/{job['id']}")).json()["status"] == "done"

        # Long after, the key's record is purged; the same upload is still that same job.
        await _execute(stack.stamping_db, "DELETE FROM idempotency_keys")
        again = await upload()
        assert again.status_code == 202, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == job["id"] and again.json()["status"] == "done"
        # The same key with another document is another request, and the stamp is spent.
        other = await client.post(
            "/api/v1/stampings",
            files={"file": ("b.pdf", make_pdf(2), "application/pdf")},
            headers={"Idempotency-Key": "cv-upload-1"},
        )
        assert other.status_code == 422, other.text
        assert other.json()["code"] == "idempotency_key_reused"


async def test_a_failed_upload_gives_its_claim_back_once_inventory_is_back(
    stack: ServiceStack,
) -> None:
    api_key, serial = await _one_stamp(stack)
    await _commits_and_give_backs_fail(stack)
    async with stack.client(api_key) as client:
        failed = await client.post(  # no Idempotency-Key: a retry would be another job
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
        assert failed.status_code == 503, failed.text
        state, job_id = await _claim(stack, serial)
        assert state == "sold" and job_id is not None
        await _execute(stack.stamping_db, "DROP TRIGGER restart_at_commit ON stamping_jobs")
        await _execute(stack.inventory_db, "DROP TRIGGER restart_at_release ON serials")

        # Given back in the background (not a quarter of an hour later, when inventory would
        # find the claim orphaned): the applicant's next upload gets the stamp.
        async def given_back() -> bool:
            return await _claim(stack, serial) == ("sold", None)

        await wait_for(given_back, within=15)
        again = await client.post(
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
        assert again.status_code == 202, again.text
        assert again.json()["serial"] == serial


async def test_a_late_give_back_from_an_earlier_attempt_leaves_a_retrys_claim(
    stack: ServiceStack,
) -> None:
    _, serial = await _one_stamp(stack)
    owner = (await serial_row(stack, serial))["owner"]
    async with as_stamping(stack) as inventory:
        job, first, second = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        assert await inventory.claim_serial(owner=owner, job_id=job, serial=None, attempt=first)
        # The first attempt failed; its retry claims for the same job before the first
        # attempt's give-back arrives.
        assert await inventory.claim_serial(owner=owner, job_id=job, serial=None, attempt=second)
        await inventory.release_serial(job, attempt=first)
        assert (await serial_row(stack, serial))["job_id"] == job
        await inventory.release_serial(job, attempt=second)
        assert (await serial_row(stack, serial))["job_id"] is None
        # A give-back naming no attempt (a job that failed) gives back whatever the job holds.
        assert await inventory.claim_serial(owner=owner, job_id=job, serial=None, attempt=first)
        await inventory.release_serial(job)
        assert (await serial_row(stack, serial))["job_id"] is None
