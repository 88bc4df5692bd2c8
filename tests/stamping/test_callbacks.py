"""Callbacks to a job's `callback_url`, on real servers: signed with the owner's secret for done
and failed jobs, retried with backoff, given up after the configured attempts, never held up
by a receiver that hangs, and kept in the database across a restart of their sender."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import update

from services.platform import signatures
from services.platform.db import create_engine, create_sessionmaker, transaction
from services.stamping import repository as repo
from services.stamping.app import create_app as create_stamping
from services.stamping.callbacks import (
    ATTEMPT_HEADER,
    EVENT,
    EVENT_HEADER,
    EVENT_ID_HEADER,
    RetryPolicy,
    owner_secret,
)
from services.stamping.config import StampingSettings
from services.stamping.models import CallbackDelivery, CallbackState, JobStatus, StampingJob
from tests.harness import Infrastructure, Served, ServiceStack, running_stack, wait_for
from tests.pdfs import make_pdf
from tests.stamping.receiver import CallbackReceiver

# Small retry settings: attempts 0.1-0.2 s apart, three of them, five seconds to answer.
FAST_RETRIES = {
    "callback_max_attempts": 3,
    "callback_backoff_initial_seconds": 0.1,
    "callback_backoff_max_seconds": 0.2,
    "callback_timeout_seconds": 5.0,
    "callback_poll_interval_seconds": 0.05,
}


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    started = CallbackReceiver()
    await started.start()
    yield started
    await started.stop()


@pytest.fixture(scope="module")
async def retry_stack(
    infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceStack]:
    """One stack for the retry tests (each uses its own distributor and receiver)."""
    async with running_stack(
        infra, tmp_path_factory.mktemp("callbacks"), overrides={"stamping": FAST_RETRIES}
    ) as started:
        yield started


async def stamp_with_callback(
    client: httpx.AsyncClient, callback_url: str, pages: int = 1
) -> dict[str, Any]:
    upload = await client.post(
        "/api/v1/stampings",
        files={"file": ("a.pdf", make_pdf(pages), "application/pdf")},
        data={"callback_url": callback_url},
    )
    assert upload.status_code == 202, upload.text
    job: dict[str, Any] = upload.json()
    return job


@asynccontextmanager
async def distributor(stack: ServiceStack, stamps: int) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a new distributor who bought `stamps` stamps."""
    await stack.mint(stamps)
    async with stack.client(await stack.create_distributor()) as client:
        purchase = await client.post("/api/v1/purchases", json={"quantity": stamps})
        assert purchase.status_code == 201, purchase.text
        yield client


async def callback_row(stack: ServiceStack, job_id: str) -> CallbackDelivery | None:
    engine = create_engine(stack.stamping_db, pool_size=1)
    try:
        async with create_sessionmaker(engine)() as session:
            return await repo.callback_for_job(session, uuid.UUID(job_id))
    finally:
        await engine.dispose()


def assert_signed_for(delivery: Any, secret: str) -> None:
    signatures.verify(
        secret, delivery.body, delivery.headers[signatures.SIGNATURE_HEADER.lower()], tolerance=300
    )


@pytest.mark.workers(0)
@pytest.mark.settings(stamping={"callback_poll_interval_seconds": 0.05})
async def test_done_and_failed_jobs_are_called_back_with_a_valid_signature(
    stack: ServiceStack, receiver: CallbackReceiver
) -> None:
    async with distributor(stack, 2) as client:
        done = await stamp_with_callback(client, receiver.url)
        failing = await stamp_with_callback(client, receiver.url)
        # The stored upload of the second job disappears before any worker gets to it.
        (stack.blob_dir / "inputs" / f"{failing['id']}.pdf").unlink()
        await stack.add_worker()

        async def both() -> bool:
            return len(receiver.accepted) >= 2

        await wait_for(both, within=60)
        secret_response = await client.get("/api/v1/callbacks/secret")
        assert secret_response.status_code == 200, secret_response.text
        secret = secret_response.json()["secret"]
        final = (await client.get(f"/api/v1/stampings/{done['id']}")).json()

    by_job = {delivery.payload["id"]: delivery for delivery in receiver.accepted}
    assert set(by_job) == {done["id"], failing["id"]}
    for delivery in by_job.values():
        assert_signed_for(delivery, secret)
        assert delivery.headers[EVENT_HEADER.lower()] == EVENT
        assert delivery.headers[EVENT_ID_HEADER.lower()] == delivery.payload["event_id"]
        assert delivery.headers[ATTEMPT_HEADER.lower()] == "1"
        assert delivery.headers["content-type"] == "application/json"

    ok = by_job[done["id"]].payload
    assert ok["status"] == "done" and ok["error"] is None
    assert ok["serial"] == done["serial"]
    assert ok["sha256"] == final["sha256"] and len(ok["sha256"]) == 64
    assert ok["document_url"] == final["document_url"]
    assert ok["document_url"].endswith(f"/api/v1/stampings/{done['id']}/document")

    failed = by_job[failing["id"]].payload
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "input_missing"
    assert failed["sha256"] is None and failed["document_url"] is None

    # The secret is the caller's own: another distributor's does not verify these.
    other = await stack.create_distributor()
    async with stack.client(other) as stranger:
        other_secret = (await stranger.get("/api/v1/callbacks/secret")).json()["secret"]
    assert other_secret != secret
    with pytest.raises(signatures.InvalidSignature):
        assert_signed_for(by_job[done["id"]], other_secret)

    row = await callback_row(stack, done["id"])
    assert row is not None and row.state is CallbackState.delivered and row.attempts == 1


async def test_a_receiver_that_fails_twice_gets_the_callback_on_the_third_attempt(
    retry_stack: ServiceStack,
) -> None:
    receiver = CallbackReceiver(fail_first=2)
    await receiver.start()
    try:
        async with distributor(retry_stack, 1) as client:
            job = await stamp_with_callback(client, receiver.url)

            async def accepted() -> bool:
                return bool(receiver.accepted)

            await wait_for(accepted, within=60)
            secret = (await client.get("/api/v1/callbacks/secret")).json()["secret"]
    finally:
        await receiver.stop()

    assert [delivery.answered for delivery in receiver.deliveries] == [500, 500, 200]
    assert [d.headers[ATTEMPT_HEADER.lower()] for d in receiver.deliveries] == ["1", "2", "3"]
    # One event, whatever the attempt: receivers deduplicate on its id.
    assert len({d.headers[EVENT_ID_HEADER.lower()] for d in receiver.deliveries}) == 1
    assert len({d.body for d in receiver.deliveries}) == 1
    for delivery in receiver.deliveries:
        assert_signed_for(delivery, secret)
    gaps = [b.at - a.at for a, b in zip(receiver.deliveries, receiver.deliveries[1:], strict=False)]
    assert all(gap >= 0.05 for gap in gaps), gaps  # backoff: half the delay at least

    row = await callback_row(retry_stack, job["id"])
    assert row is not None
    assert (row.state, row.attempts, row.last_status_code) == (CallbackState.delivered, 3, 200)


async def test_a_receiver_that_never_accepts_is_given_up_after_the_attempt_limit(
    retry_stack: ServiceStack,
) -> None:
    receiver = CallbackReceiver(always_fail=True, failure_status=503)
    await receiver.start()
    try:
        async with distributor(retry_stack, 1) as client:
            job = await stamp_with_callback(client, receiver.url)

            async def given_up() -> CallbackDelivery | None:
                row = await callback_row(retry_stack, job["id"])
                return row if row is not None and row.state is CallbackState.given_up else None

            row = await wait_for(given_up, within=60)
            await asyncio.sleep(0.5)  # no attempt after giving up
    finally:
        await receiver.stop()

    assert len(receiver.deliveries) == 3
    assert row.attempts == 3 and row.last_status_code == 503
    assert row.last_error == "HTTP 503: receiver says no"
    assert row.finished_at is not None


async def test_a_hanging_receiver_does_not_hold_up_other_callbacks(
    retry_stack: ServiceStack,
) -> None:
    hanging = CallbackReceiver(hang=True)
    prompt = CallbackReceiver()
    await hanging.start()
    await prompt.start()
    try:
        async with distributor(retry_stack, 2) as client:
            slow_job = await stamp_with_callback(client, hanging.url)

            async def hung() -> bool:
                return hanging.hanging > 0

            await wait_for(hung, within=60)
            await stamp_with_callback(client, prompt.url)

            async def delivered() -> bool:
                return bool(prompt.accepted)

            await wait_for(delivered, within=60)
            # ... while the first attempt at the hanging receiver is still waiting.
            row = await callback_row(retry_stack, slow_job["id"])
            assert row is not None and row.state is CallbackState.pending
            assert (row.attempts, row.last_error) == (1, None)

            async def timed_out() -> CallbackDelivery | None:
                row = await callback_row(retry_stack, slow_job["id"])
                return row if row is not None and row.last_error else None

            row = await wait_for(timed_out, within=30)
            assert row.last_error == "no answer within 5 s"
            assert row.last_status_code is None
    finally:
        await hanging.stop()
        await prompt.stop()


@pytest.mark.settings(stamping=FAST_RETRIES | {"callback_max_attempts": 50})
async def test_callbacks_survive_a_restart_of_their_sender(
    stack: ServiceStack, receiver: CallbackReceiver
) -> None:
    receiver.always_fail = True
    async with distributor(stack, 1) as client:
        job = await stamp_with_callback(client, receiver.url)

        async def attempted() -> bool:
            return bool(receiver.deliveries)

        await wait_for(attempted, within=60)
        # The stamping API (which sends callbacks) goes away; the callback is in its database.
        old = stack.servers["stamping"]
        await old.stop()
        receiver.always_fail = False
        restarted = Served(create_stamping(stack.stamping_settings()), old.port)
        await restarted.start()
        stack.servers["stamping"] = restarted

        async def accepted() -> bool:
            return bool(receiver.accepted)

        await wait_for(accepted, within=60)
    assert len({d.headers[EVENT_ID_HEADER.lower()] for d in receiver.deliveries}) == 1
    row = await callback_row(stack, job["id"])
    assert row is not None and row.state is CallbackState.delivered


async def test_an_outcome_owes_its_callback_and_a_lapsed_claim_is_claimed_again(
    infra: Infrastructure, tmp_path: Path
) -> None:
    """The database side alone: the trigger adds the callback with the outcome, whatever
    records it; a claim whose sender vanished lapses and the callback is claimed again."""
    url = await infra.create_database("stamping")
    engine = create_engine(url, pool_size=2)
    sessionmaker = create_sessionmaker(engine)
    try:
        jobs = [_job(callback_url="https://example.com/hook"), _job(callback_url=None)]
        async with transaction(sessionmaker) as session:
            session.add_all(jobs)
        async with transaction(sessionmaker) as session:
            await session.execute(
                update(StampingJob).values(status=JobStatus.failed, error_code="input_missing")
            )
        async with transaction(sessionmaker) as session:
            (claimed,) = await repo.claim_due_callbacks(
                session, limit=10, claim_for=timedelta(seconds=0.3)
            )
            assert await repo.claim_due_callbacks(session, limit=10, claim_for=timedelta(0)) == []
        callback, job = claimed
        assert job.id == jobs[0].id and callback.url == "https://example.com/hook"
        assert callback.attempts == 1 and callback.state is CallbackState.pending
        await asyncio.sleep(0.4)
        async with transaction(sessionmaker) as session:
            (again,) = await repo.claim_due_callbacks(
                session, limit=10, claim_for=timedelta(seconds=30)
            )
        assert again[0].id == callback.id and again[0].attempts == 2
        # The lapsed claim's sender comes back: its outcome no longer counts.
        async with transaction(sessionmaker) as session:
            assert not await repo.record_callback_attempt(
                session,
                callback.id,
                attempt=1,
                state=CallbackState.delivered,
                status_code=200,
                error=None,
            )
        async with transaction(sessionmaker) as session:
            # Another status change of a finished job owes nothing more.
            await session.execute(update(StampingJob).values(status=JobStatus.done))
        async with sessionmaker() as session:
            rows = await session.execute(
                CallbackDelivery.__table__.select()  # type: ignore[attr-defined]
            )
            assert len(rows.all()) == 1
    finally:
        await engine.dispose()
        await infra.drop_database(url)


def _job(callback_url: str | None) -> StampingJob:
    job_id = uuid.uuid4()
    return StampingJob(
        id=job_id,
        owner="distributor:test",
        serial=uuid.uuid4().hex[:22].upper(),
        status=JobStatus.signing,
        page=0,
        llx=0,
        lly=0,
        urx=90,
        ury=90,
        input_key=f"inputs/{job_id}.pdf",
        input_sha256="0" * 64,
        input_bytes=1,
        callback_url=callback_url,
        attempts=1,
    )


def test_backoff_doubles_up_to_the_maximum_with_jitter() -> None:
    policy = RetryPolicy(max_attempts=12, initial_seconds=15, max_seconds=3600)
    for attempts, ceiling in [(1, 15), (2, 30), (3, 60), (8, 1920), (9, 3600), (11, 3600)]:
        delays = [policy.delay(attempts) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), (attempts, delays)
        assert len(set(delays)) > 1


def test_callback_secrets_are_per_owner_and_refused_as_placeholders_in_production() -> None:
    assert owner_secret("s" * 40, "distributor:a") != owner_secret("s" * 40, "distributor:b")
    real = "a-real-production-secret-of-enough-length-0123"
    with pytest.raises(ValidationError, match="callback_secret"):
        StampingSettings(environment="production", internal_secret=real)
    settings = StampingSettings(
        environment="production", internal_secret=real, callback_secret=real
    )
    assert settings.callback_secret.get_secret_value() == real
    # Callbacks may not reach internal addresses in production unless allowed explicitly.
    assert not settings.callbacks_may_reach_private_addresses
    assert StampingSettings().callbacks_may_reach_private_addresses
