"""Hundreds of stamping jobs through `meterai up` (two signing worker processes), and what
happens to them when a worker is SIGKILLed, when the broker forgets everything, and when a
worker is asked to stop: every job ends `done`, stamped exactly once (see tests.stack.jobs)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from services.platform.embedded import free_port_range
from services.stamping.config import StampingSettings
from tests.harness import wait_for
from tests.pdfs import changed_page
from tests.stack.jobs import Distributor, StackProbe, Uploads, validate_pdfs
from tests.stack.running import meterai_up

pytestmark = [pytest.mark.stack, pytest.mark.timeout(420)]

LEASE_SECONDS = 4.0
GRACE_SECONDS = 10.0
# Short leases, so that recovering from a crash takes seconds, not half a minute. The one
# distributor here uploads hundreds of documents in seconds, which its default contract rate
# at the gateway (tested in tests/gateway/test_limits.py) would refuse. Everything else as
# configured by default (a job is published again when its lease ran out).
STACK_ENV = {
    "METERAI_STAMPING_WORKER_LEASE_SECONDS": str(LEASE_SECONDS),
    "METERAI_STAMPING_WORKER_GRACE_SECONDS": str(GRACE_SECONDS),
    "METERAI_GATEWAY_DISTRIBUTOR_RATE_PER_SECOND": "100000",
    "METERAI_GATEWAY_DISTRIBUTOR_BURST": "100000",
    # Inventory asks stamping about claims still open after this long (the default is minutes).
    "METERAI_INVENTORY_CLAIM_CHECK_AFTER_SECONDS": "15",
    "METERAI_INVENTORY_CLAIM_CHECK_INTERVAL_SECONDS": "5",
}


@pytest.fixture(scope="module")
async def up() -> AsyncIterator[StackProbe]:
    """One `meterai up` with two signing workers for the module; each test has its own
    distributor and jobs, and checks only those.

    Its data lives outside pytest's temporary folders: another pytest session on the machine
    may prune them, or make them private again while PostgreSQL runs as another user.
    """
    root = Path(tempfile.mkdtemp(prefix="meterai-test-up-"))
    try:
        base_port = free_port_range(40)
        async with meterai_up(root / "data", base_port, workers=2, env=STACK_ENV) as running:
            probe = await StackProbe.open(running, root / "data", base_port)
            try:
                yield probe
            finally:
                await probe.close()
    finally:
        if os.environ.get("METERAI_KEEP_TEST_STACK"):
            print(f"stack data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def figures(label: str, **values: object) -> None:
    """Print what a run measured (shown with `pytest -s`)."""
    print(f"\n[{label}] " + ", ".join(f"{name}={value}" for name, value in values.items()))


async def test_200_jobs_over_two_workers_are_each_stamped_once_and_validate(
    up: StackProbe, tmp_path: Path
) -> None:
    buyer = await up.distributor(200)
    started = time.monotonic()
    uploads = Uploads()
    jobs = await up.upload(buyer, 200, uploads)
    uploaded = time.monotonic() - started
    await up.wait_done(jobs, within=300)
    finished = time.monotonic() - started

    events = (await up.check_stamped_exactly_once(buyer, jobs)).events
    by_worker = {
        worker: sum(1 for found in events.values() for event in found if event.worker == worker)
        for worker in ("signer-1", "signer-2")
    }
    assert all(by_worker.values()), f"both workers must have signed: {by_worker}"

    # Every output, as the distributor downloads it, passes the independent validators.
    async with buyer.client(up.gateway) as api:
        gate = asyncio.Semaphore(8)
        downloaded: dict[uuid.UUID, bytes] = {}

        async def download(job_id: uuid.UUID) -> Path:
            async with gate:
                response = await api.get(f"/api/v1/stampings/{job_id}/document")
            assert response.status_code == 200, response.text
            path = tmp_path / f"{job_id}.pdf"
            path.write_bytes(response.content)
            downloaded[job_id] = response.content
            return path

        paths = await asyncio.gather(*(download(job_id) for job_id in jobs))
    validating = time.monotonic()
    problems = await validate_pdfs(paths)
    assert not problems, "\n".join(problems[:5])
    validated = time.monotonic() - validating

    # Anyone can verify: every serial is on record as stamped with its document's digest, and
    # every document, uploaded to /api/v1/verify, carries its own job's serial intact.
    checking = time.monotonic()
    jobs_by_id = await up.jobs(jobs)
    async with httpx.AsyncClient(base_url=up.gateway, timeout=60) as public:
        gate = asyncio.Semaphore(4)

        async def check(job_id: uuid.UUID) -> None:
            job = jobs_by_id[job_id]
            async with gate:
                record = await _retrying(
                    public.get,
                    f"/verify/{job['serial']}",
                    headers={"Accept": "application/json"},
                )
                verdict = await _retrying(
                    public.post,
                    "/api/v1/verify",
                    files={"file": ("doc.pdf", downloaded[job_id], "application/pdf")},
                )
            assert record.status_code == 200, record.text
            assert record.json()["state"] == "stamped"
            assert record.json()["sha256"] == job["output_sha256"]
            assert verdict.status_code == 200, verdict.text
            body = verdict.json()
            assert (body["verdict"], body["serial"]) == ("valid", job["serial"]), body
            assert body["changed_after_stamping"] is False

        await asyncio.gather(*(check(job_id) for job_id in jobs))

        # Copies changed after stamping are flagged, not passed as stamped.
        for document in list(downloaded.values())[:5]:
            for copy in (changed_page(document), document + b"\n% appended\n"):
                answer = await _retrying(
                    public.post,
                    "/api/v1/verify",
                    files={"file": ("copy.pdf", copy, "application/pdf")},
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["verdict"] == "modified", answer.json()
                assert answer.json()["changed_after_stamping"] is True
    figures(
        "200 jobs",
        upload_s=round(uploaded, 1),
        uploads_retried_after_503=uploads.retried,
        all_done_s=round(finished, 1),
        per_worker=by_worker,
        validate_s=round(validated, 1),
        verify_200_serials_and_documents_s=round(time.monotonic() - checking, 1),
    )


async def test_a_worker_killed_mid_job_loses_nothing_and_signs_nothing_twice(
    up: StackProbe,
) -> None:
    buyer, uploads, uploading = await _uploading_until(up, 300, done=60)

    # SIGKILL signer-1 at a moment it holds jobs: they stay leased to a dead process.
    held, killed_at = await up.stop_holding("signer-1", signal.SIGKILL)
    jobs = await uploading
    await up.wait_done(jobs, within=300)
    all_done = time.time() - killed_at

    verdict = await up.check_stamped_exactly_once(buyer, jobs)
    events = verdict.events
    # A write the kill interrupted may leave its temporary file; only a killed job's can.
    assert set(verdict.unfinished_writes) <= {job.job_id for job in held}
    after = await up.jobs([job.job_id for job in held])
    recovered = []
    for job in held:
        final = after[job.job_id]
        # Taken again only once the dead worker's lease ran out (the relay republishes it
        # then; its first message, uncommitted, may also come back after the rebalance).
        assert final["attempts"] > job.attempts, (job, dict(final))
        assert final["finished_at"] >= job.lease_expires_at, (job, dict(final))
        (signed,) = events[job.job_id]
        recovered.append((signed.worker, round(signed.at.timestamp() - killed_at, 1)))
    log = up.log_text()
    assert "signer-1 exited with code -9" in log, log
    figures(
        "SIGKILL",
        jobs=len(jobs),
        uploads_retried_after_503=uploads.retried,
        held_by_killed_worker=len(held),
        recovered_by_after_s=recovered,
        relay_republished=up.relay_republished(since=killed_at),
        all_done_after_kill_s=round(all_done, 1),
        unfinished_writes_left=sum(len(names) for names in verdict.unfinished_writes.values()),
    )


async def test_the_broker_forgetting_everything_mid_run_loses_no_job_and_no_result(
    up: StackProbe,
) -> None:
    buyer, uploads, uploading = await _uploading_until(up, 300, accepted=100, done=20)

    # The broker dies, and with it every message and offset; the supervisor restarts it,
    # empty, and recreates the topics.
    broker = up.broker()
    stopped_at = time.time()
    broker.send_signal(signal.SIGKILL)
    at_stop = await up.statuses(uploads.job_ids)
    restarted = await wait_for(lambda: _new_broker(up, broker.pid), within=60)
    back_after = time.time() - stopped_at
    done_at_restart = (await up.statuses(uploads.job_ids))["done"]
    assert at_stop["queued"] > 0 and done_at_restart < 300, "not in the middle of the run"

    jobs = await uploading
    await up.wait_done(jobs, within=300)
    all_done = time.time() - stopped_at
    verdict = await up.check_stamped_exactly_once(buyer, jobs)
    assert not verdict.unfinished_writes
    assert restarted.is_running()
    # The topics came back with all their partitions, even where a client made one first.
    settings = StampingSettings()
    assert await up.partition_counts([settings.requests_topic, settings.results_topic]) == {
        settings.requests_topic: settings.requests_partitions,
        settings.results_topic: settings.results_partitions,
    }
    (replayed,) = re.findall(r"kafka restarted empty: (.*)", up.log_text())
    settled = re.findall(r"kafka restarted \d+ s ago: (.*)", up.log_text())
    figures(
        "broker restart",
        jobs=len(jobs),
        uploads_retried_after_503=uploads.retried,
        replayed=replayed,
        replayed_again=settled,
        claims_settled_by_asking_stamping=up.log_text().count('"claim_settled"'),
        queued_when_broker_died=at_stop["queued"],
        done_when_broker_back=done_at_restart,
        broker_back_after_s=round(back_after, 1),
        all_done_after_stop_s=round(all_done, 1),
    )


async def test_a_worker_paused_past_its_lease_cannot_replace_what_another_recorded(
    up: StackProbe,
) -> None:
    # Enough jobs that both workers are still busy when the freezing starts.
    buyer, uploads, uploading = await _uploading_until(up, 120, accepted=20, done=5)

    # signer-2 freezes mid-job (a long GC pause, a stalled VM) and stays frozen past its lease
    # and its Kafka session: signer-1 takes its partitions and, once the leases ran out, its
    # jobs. Then signer-2 wakes up and carries on where it was, with a lease it no longer has.
    worker = up.worker("signer-2")
    held, paused_at = await up.stop_holding("signer-2", None)
    held_ids = [job.job_id for job in held]
    try:
        await up.wait_done(held_ids, within=60)
    finally:
        worker.send_signal(signal.SIGCONT)
    taken_over = time.time() - paused_at

    async def woke_up_and_lost() -> bool:
        events = up.signature_events(held_ids)
        return all(
            any(e.worker == "signer-2" and e.event == "lease_lost" for e in events[job])
            for job in held_ids
        )

    await wait_for(woke_up_and_lost, within=30)
    jobs = await uploading
    await up.wait_done(jobs, within=300)
    verdict = await up.check_stamped_exactly_once(buyer, jobs, paused=held_ids)
    assert not verdict.unfinished_writes
    events = verdict.events
    for job in held_ids:
        recorded = [event for event in events[job] if event.event == "job_done"]
        assert [event.worker for event in recorded] == ["signer-1"], events[job]
    figures("paused worker", held=len(held), taken_over_after_s=round(taken_over, 1))


async def test_sigterm_finishes_in_flight_jobs_then_exits_within_the_grace_period(
    up: StackProbe,
) -> None:
    # A backlog that outlasts the stop, so that there is something left to take over.
    buyer, uploads, uploading = await _uploading_until(up, 160, accepted=60, done=10)

    worker = up.worker("signer-2")
    in_flight, stopped_at = await up.stop_holding("signer-2", signal.SIGTERM)
    await asyncio.to_thread(worker.wait, GRACE_SECONDS + 5)
    exited_after = time.time() - stopped_at
    assert exited_after < GRACE_SECONDS

    async def exit_reported() -> str | None:
        found = re.findall(r"signer-2 exited with code (-?\d+)", up.log_text())
        return found[-1] if found else None

    assert await wait_for(exit_reported, within=10) == "0"

    jobs = await uploading
    await up.wait_done(jobs, within=300)
    verdict = await up.check_stamped_exactly_once(buyer, jobs)
    assert not verdict.unfinished_writes
    events = verdict.events
    after = await up.jobs(jobs)
    for job in in_flight:
        # Finished by the stopping worker on that same attempt, not left to its lease.
        final = after[job.job_id]
        assert final["attempts"] == job.attempts, (job, dict(final))
        assert final["finished_at"] < job.lease_expires_at, (job, dict(final))
        (signed,) = events[job.job_id]
        assert signed.worker == "signer-2"
    # It stopped fetching: after the signal it finished only what it held, nothing new.
    stopping_window = (_utc(stopped_at), _utc(stopped_at + exited_after))
    signed_while_stopping = {
        job_id
        for job_id, found in events.items()
        for event in found
        if event.worker == "signer-2" and stopping_window[0] <= event.at <= stopping_window[1]
    }
    assert {job.job_id for job in in_flight} <= signed_while_stopping
    assert len(signed_while_stopping) <= 2  # worker_concurrency: nothing new was started
    # The rest went to the other worker (and to signer-2's replacement once it was up).
    after_stop = Counter(
        event.worker
        for found in events.values()
        for event in found
        if event.at > stopping_window[1]
    )
    assert after_stop["signer-1"] > 0, after_stop
    taken_over = after_stop["signer-1"]
    figures(
        "SIGTERM",
        in_flight=len(in_flight),
        exited_after_s=round(exited_after, 2),
        signed_afterwards_by_signer_1=taken_over,
        signed_afterwards_by_the_replacement=after_stop["signer-2"],
    )


async def _retrying(
    send: Callable[..., Awaitable[httpx.Response]], url: str, **kwargs: Any
) -> httpx.Response:
    """As a client would: a shed (503) or limited (429) request is sent again after its
    Retry-After."""
    for _ in range(20):
        response = await send(url, **kwargs)
        if response.status_code not in (429, 503):
            return response
        await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 2.0))
    return response


async def _uploading_until(
    up: StackProbe, count: int, *, accepted: int = 0, done: int = 0
) -> tuple[Distributor, Uploads, asyncio.Task[list[uuid.UUID]]]:
    """A distributor with `count` stamps starts uploading `count` documents; returns once at
    least `accepted` are accepted and `done` are done, with the uploads still going on."""
    buyer = await up.distributor(count)
    uploads = Uploads()
    uploading = asyncio.create_task(up.upload(buyer, count, uploads))
    await wait_for(lambda: _at_least(up, uploads, accepted=accepted, done=done), within=120)
    return buyer, uploads, uploading


async def _at_least(up: StackProbe, uploads: Uploads, *, accepted: int = 0, done: int = 0) -> bool:
    if len(uploads.job_ids) < accepted:
        return False
    return (await up.statuses(list(uploads.job_ids)))["done"] >= done


async def _new_broker(up: StackProbe, old_pid: int) -> psutil.Process | None:
    try:
        broker = up.broker()
    except LookupError:
        return None
    return broker if broker.pid != old_pid and "kafka ready again" in up.log_text() else None


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
