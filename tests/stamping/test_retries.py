"""A job whose attempts fail through no fault of its document is tried again after a growing
backoff, never sooner (not even when its request is delivered again), then fails with a reason,
gives its serial back and leaves a dead letter; meanwhile the worker carries on with the rest.
A job nobody takes is published again, ever less often; one queued behind a backlog that is
being worked off only once that backlog should have been."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.stamping import worker as worker_module
from services.stamping.backlog import BacklogGuard
from services.stamping.config import StampingSettings
from services.stamping.signing import SignerFailure, StampRequest, StampSigner
from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf

BACKOFF = 0.5
MAX_ATTEMPTS = 3


class FailingForSomeSerials:
    """The real signer, except that its key "does not answer" for the serials in `broken`."""

    def __init__(self, signer: StampSigner, broken: set[str]) -> None:
        self.signer = signer
        self.broken = broken
        self.attempts: dict[str, list[float]] = defaultdict(list)

    def stamp(self, pdf: bytes, request: StampRequest, **options: Any) -> bytes:
        if request.serial in self.broken:
            self.attempts[request.serial].append(time.monotonic())
            raise SignerFailure("the signing key did not answer")
        return self.signer.stamp(pdf, request, **options)


@pytest.mark.workers(0)
@pytest.mark.settings(
    stamping={
        "worker_max_attempts": MAX_ATTEMPTS,
        "worker_retry_backoff_seconds": BACKOFF,
        "republish_after_seconds": 1.0,
    }
)
async def test_failing_attempts_back_off_then_fail_with_a_dead_letter_while_others_finish(
    stack: ServiceStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    signers: list[FailingForSomeSerials] = []
    broken: set[str] = set()
    load_signer = worker_module.load_signer

    def failing_signer(settings: StampingSettings) -> FailingForSomeSerials:
        signers.append(FailingForSomeSerials(load_signer(settings), broken))
        return signers[-1]

    monkeypatch.setattr(worker_module, "load_signer", failing_signer)
    await stack.mint(6)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 6})
        jobs = [
            (
                await client.post(
                    "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(2), "application/pdf")}
                )
            ).json()
            for _ in range(6)
        ]
        doomed, others = jobs[0], jobs[1:]
        broken.add(doomed["serial"])
        await stack.add_worker()
        (signer,) = signers

        async def attempted() -> bool:
            return len(signer.attempts[doomed["serial"]]) >= 1

        await wait_for(attempted, within=60, interval=0.02)
        # Its request arrives again (a rebalance, a relay replica): still no attempt before the
        # backoff has passed.
        producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka.bootstrap_servers)
        await producer.start()
        try:
            for _ in range(3):
                await producer.send_and_wait(
                    stack.stamping_settings().requests_topic,
                    key=doomed["id"].encode(),
                    value=json.dumps({"job_id": doomed["id"]}).encode(),
                )
        finally:
            await producer.stop()

        async def finished(job: dict[str, Any]) -> dict[str, Any] | None:
            body: dict[str, Any] = (await client.get(f"/api/v1/stampings/{job['id']}")).json()
            return body if body["status"] in ("done", "failed") else None

        failed = await wait_for(lambda: finished(doomed), within=60)
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "too_many_attempts"
        assert "Gave up after 3 attempts" in failed["error"]["detail"]
        assert "SignerFailure: the signing key did not answer" in failed["error"]["detail"]
        # The other jobs were not held up behind it.
        for job in others:
            done = await wait_for(lambda job=job: finished(job), within=60)
            assert done["status"] == "done"
            assert _at(done["finished_at"]) < _at(failed["finished_at"])

        # Exactly the allowed attempts, each after a backoff that doubled.
        times = signer.attempts[doomed["serial"]]
        assert len(times) == MAX_ATTEMPTS
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert gaps[0] >= BACKOFF and gaps[1] >= 2 * BACKOFF, gaps

        # Operators find it among the dead letters, with what went wrong.
        connection = await asyncpg.connect(stack.stamping_db)
        try:
            letters = await connection.fetch("SELECT * FROM dead_letters")
        finally:
            await connection.close()
        assert [
            (str(row["job_id"]), row["serial"], row["reason"], row["attempts"], row["last_error"])
            for row in letters
        ] == [
            (
                doomed["id"],
                doomed["serial"],
                "too_many_attempts",
                MAX_ATTEMPTS,
                "SignerFailure: the signing key did not answer",
            )
        ]

        # Its serial went back to the distributor, unused.
        async def given_back() -> bool:
            items = (await client.get("/api/v1/serials")).json()["items"]
            (item,) = [item for item in items if item["serial"] == doomed["serial"]]
            return bool(item["state"] == "sold" and item["job_id"] is None)

        await wait_for(given_back, within=30)


@pytest.mark.workers(0)
@pytest.mark.settings(stamping={"republish_after_seconds": 0.4})
async def test_a_job_nobody_takes_is_published_again_ever_less_often(
    stack: ServiceStack,
) -> None:
    await stack.mint(1)
    api_key = await stack.create_distributor()
    consumer = AIOKafkaConsumer(
        stack.stamping_settings().requests_topic,
        bootstrap_servers=stack.infra.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async with stack.client(api_key) as client:
            await client.post("/api/v1/purchases", json={"quantity": 1})
            upload = await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
        job_id = upload.json()["id"].encode()
        published: list[float] = []
        clock = asyncio.get_running_loop()
        until = clock.time() + 6
        while clock.time() < until:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                published.extend(clock.time() for record in batch if record.key == job_id)
    finally:
        await consumer.stop()
    # Every 0.4 s (or every relay wake-up, 0.5 s) would be 12 messages or more; waits that
    # double make about 5 (the relay looks twice a second, so they come late, never early).
    assert 3 <= len(published) <= 7, published
    gaps = [later - earlier for earlier, later in zip(published, published[1:], strict=False)]
    assert gaps[-1] == max(gaps), gaps


def _at(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def test_a_job_queued_behind_a_backlog_that_is_being_worked_off_is_not_published_again_early() -> (
    None
):
    guard = BacklogGuard(async_sessionmaker(), limit=20_000)
    # Nothing measured yet, or nothing finishing: the shortest wait, as before.
    assert guard.republish_after(30, 300) == 30
    guard.unfinished, guard.finish_rate = 5_000, 0.0
    assert guard.republish_after(30, 300) == 30
    # 1,000 jobs ahead finishing at 20 a second take 50 s: twice that, for the rate's swings.
    guard.unfinished, guard.finish_rate = 990, 20.0
    guard.accepted_since_read = 10
    assert guard.republish_after(30, 300) == pytest.approx(100)
    # Never sooner than the shortest wait, never later than the longest.
    guard.unfinished, guard.accepted_since_read = 100, 0
    assert guard.republish_after(30, 300) == 30
    guard.unfinished = 20_000
    assert guard.republish_after(30, 300) == 300


@pytest.mark.workers(0)
@pytest.mark.settings(stamping={"backlog_refresh_seconds": 3600.0})
async def test_an_upload_is_due_for_republishing_after_the_backlog_ahead_of_it(
    stack: ServiceStack,
) -> None:
    """The job row records the guard's wait: here 600 jobs ahead, 10 finishing a second."""
    guard: BacklogGuard = stack.servers["stamping"].app.state.backlog_guard
    await stack.mint(2)
    api_key = await stack.create_distributor()
    job_ids = []
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 2})
        for rate in (None, 10.0):
            guard.unfinished, guard.accepted_since_read, guard.finish_rate = 600, 0, rate
            upload = await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
            assert upload.status_code == 202, upload.text
            job_ids.append(uuid.UUID(upload.json()["id"]))
    connection = await asyncpg.connect(stack.stamping_db)
    try:
        waits = [
            await connection.fetchval(
                "SELECT extract(epoch FROM republish_at - created_at)"
                " FROM stamping_jobs WHERE id = $1",
                job_id,
            )
            for job_id in job_ids
        ]
    finally:
        await connection.close()
    settings = stack.stamping_settings()
    assert waits[0] == pytest.approx(settings.republish_after_seconds, abs=1)
    assert waits[1] == pytest.approx(2 * 600 / 10.0, abs=1)
