"""Signing workers: redelivered messages do nothing twice; a job that cannot be stamped fails
with a reason and gives its serial back; the worker carries on."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.platform.db import create_engine, driver_connection
from services.stamping import repository as repo
from services.stamping.messages import StampingFinished
from services.stamping.models import JobStatus
from services.stamping.worker import WorkerEngines
from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf


def skipped_jobs() -> float:
    return REGISTRY.get_sample_value("meterai_signer_jobs_total", {"outcome": "skipped"}) or 0.0


async def _job(client: object, job_id: str) -> dict[str, object]:
    response = await client.get(f"/api/v1/stampings/{job_id}")  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()
    return body


async def test_a_redelivered_request_neither_signs_again_nor_uses_another_serial(
    stack: ServiceStack,
) -> None:
    await stack.mint(3)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 2})
        job_id = (
            await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(2), "application/pdf")}
            )
        ).json()["id"]

        async def done() -> dict[str, object] | None:
            job = await _job(client, job_id)
            return job if job["status"] == "done" else None

        first = await wait_for(done, within=60)
        document = (await client.get(f"/api/v1/stampings/{job_id}/document")).content

        # The broker delivers the same request again (as after a crash or a rebalance).
        before = skipped_jobs()
        producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka.bootstrap_servers)
        await producer.start()
        try:
            for _ in range(3):
                await producer.send_and_wait(
                    stack.stamping_settings().requests_topic,
                    key=job_id.encode(),
                    value=json.dumps({"job_id": job_id}).encode(),
                )
        finally:
            await producer.stop()

        async def all_skipped() -> bool:
            return skipped_jobs() >= before + 3

        await wait_for(all_skipped, within=30)
        assert await _job(client, job_id) == first
        again = (await client.get(f"/api/v1/stampings/{job_id}/document")).content
        assert again == document

        # Inventory learns of the use from `stamping.results`, shortly after the job is done.
        async def stamps() -> dict[str, int] | None:
            counts: dict[str, int] = (await client.get("/api/v1/balance")).json()["stamps"]
            return counts if counts["used"] else None

        assert await wait_for(stamps, within=30) == {"reserved": 0, "sold": 1, "used": 1}


@pytest.mark.workers(0)
async def test_a_job_that_cannot_be_stamped_fails_and_gives_its_serial_back(
    stack: ServiceStack,
) -> None:
    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
        job_id = (
            await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
        ).json()["id"]
        # The stored upload disappears before any worker gets to it.
        (stack.blob_dir / "inputs" / f"{job_id}.pdf").unlink()
        # A message that is not a request at all must not stop the worker either.
        producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(
                stack.stamping_settings().requests_topic, key=b"junk", value=b"\x00not json"
            )
        finally:
            await producer.stop()
        await stack.add_worker()

        async def failed() -> dict[str, object] | None:
            job = await _job(client, job_id)
            return job if job["status"] == "failed" else None

        job = await wait_for(failed, within=60)
        assert job["error"] == {"code": "input_missing", "detail": "The uploaded document is gone."}
        # Not the document's fault: operators find it among the dead letters.
        connection = await asyncpg.connect(stack.stamping_db)
        try:
            letters = await connection.fetch("SELECT job_id, reason FROM dead_letters")
        finally:
            await connection.close()
        assert [(str(row["job_id"]), row["reason"]) for row in letters] == [
            (job_id, "input_missing")
        ]

        async def released() -> bool:
            (item,) = (await client.get("/api/v1/serials")).json()["items"]
            return bool(item["state"] == "sold" and item["job_id"] is None)

        await wait_for(released)
        retry = await client.post(
            "/api/v1/stampings",
            files={"file": ("a.pdf", make_pdf(1), "application/pdf")},
            data={"serial": serial},
        )
        assert retry.status_code == 202, retry.text

        async def done() -> bool:
            return (await _job(client, retry.json()["id"]))["status"] == "done"

        await wait_for(done, within=60)


async def test_unknown_job_ids_are_ignored(stack: ServiceStack) -> None:
    before = skipped_jobs()
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            stack.stamping_settings().requests_topic,
            value=json.dumps({"job_id": str(uuid.uuid4())}).encode(),
        )
    finally:
        await producer.stop()

    async def skipped() -> bool:
        return skipped_jobs() > before

    await wait_for(skipped, within=30)


@pytest.mark.workers(0)
@pytest.mark.settings(stamping={"republish_after_seconds": 1.0})
async def test_a_job_another_transaction_is_recording_is_skipped_not_waited_for(
    stack: ServiceStack,
) -> None:
    """A worker frozen while recording a job keeps its row locked; another worker handed
    that job must not wait behind it (its consumer slot would stall with it), and takes the
    job once the lock is gone."""
    await stack.mint(2)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 2})
        locked_id, free_id = [
            (
                await client.post(
                    "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
                )
            ).json()["id"]
            for _ in range(2)
        ]
        holder = await asyncpg.connect(stack.stamping_db)
        try:
            recording = holder.transaction()
            await recording.start()
            await holder.execute(
                "SELECT 1 FROM stamping_jobs WHERE id = $1 FOR UPDATE", uuid.UUID(locked_id)
            )
            before = skipped_jobs()
            await stack.add_worker()

            async def done(job_id: str) -> bool:
                return (await _job(client, job_id))["status"] == "done"

            await wait_for(lambda: done(free_id), within=60)

            async def skipped() -> bool:
                return skipped_jobs() > before

            await wait_for(skipped, within=30)
            assert (await _job(client, locked_id))["status"] == "queued"
            await recording.rollback()
        finally:
            await holder.close()
        # Published again by the relay, it is taken now that nobody holds it.
        await wait_for(lambda: done(locked_id), within=60)


@pytest.mark.workers(0)
async def test_an_outcome_is_recorded_with_its_announcement_only_by_the_lease_holder(
    stack: ServiceStack,
) -> None:
    """The outcome and its `stamping.results` message are one statement: a worker that lost
    the lease (another attempt number) records nothing and announces nothing."""
    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 1})
        uploaded = await client.post(
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
    job_id = uuid.UUID(uploaded.json()["id"])
    engine = create_engine(stack.stamping_db, pool_size=1)
    try:
        async with driver_connection(engine) as connection:
            leased = await repo.lease_job(
                connection, job_id, worker_id="signer-x", lease=timedelta(minutes=1)
            )
            assert leased is not None
            assert (leased.status, leased.lease_owner) == (JobStatus.signing, "signer-x")
            announcement = repo.Announcement(
                "stamping.results.test",
                str(job_id),
                StampingFinished.outcome(leased, JobStatus.done, sha256="ab" * 32).model_dump(
                    mode="json"
                ),
            )

            async def announced() -> list[Any]:
                rows = await connection.fetch(
                    "SELECT payload FROM outbox WHERE topic = $1 AND key = $2",
                    "stamping.results.test",
                    str(job_id),
                )
                return [row["payload"] for row in rows]

            # Rolled back at the end: the relay of this stack never sees it.
            recording = connection.transaction()
            await recording.start()
            try:
                for worker_id, attempt in (("signer-x", leased.attempts + 1), ("signer-y", 1)):
                    lost = await repo.finish_job(
                        connection,
                        job_id,
                        worker_id=worker_id,
                        attempt=attempt,
                        status=JobStatus.done,
                        announce=announcement,
                        output_key="outputs/x.pdf",
                        output_sha256="ab" * 32,
                    )
                    assert lost is None
                    assert await announced() == []
                finished = await repo.finish_job(
                    connection,
                    job_id,
                    worker_id="signer-x",
                    attempt=leased.attempts,
                    status=JobStatus.done,
                    announce=announcement,
                    output_key="outputs/x.pdf",
                    output_sha256="ab" * 32,
                )
                assert finished is not None
                assert (finished.status, finished.output_sha256) == (JobStatus.done, "ab" * 32)
                assert finished.finished_at is not None and finished.lease_owner is None
                assert await announced() == [
                    {
                        "job_id": str(job_id),
                        "serial": leased.serial,
                        "owner": leased.owner,
                        "status": "done",
                        "sha256": "ab" * 32,
                        "error_code": None,
                        "error_detail": None,
                    }
                ]
            finally:
                await recording.rollback()
    finally:
        await engine.dispose()


@pytest.mark.workers(0)
async def test_a_worker_leases_without_waiting_for_the_disk_and_records_outcomes_durably(
    stack: ServiceStack,
) -> None:
    engines = WorkerEngines.create(stack.stamping_settings())
    try:
        for engine, synchronous_commit in ((engines.outcomes, "on"), (engines.leases, "off")):
            async with engine.connect() as connection:
                setting = await connection.scalar(text("SHOW synchronous_commit"))
            assert setting == synchronous_commit
    finally:
        await engines.dispose()
