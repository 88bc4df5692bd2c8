"""Part two of `benchmarks.stamping`: jobs per second through the whole stack.

One `meterai up` without signing workers serves the whole part. Each drain uploads its jobs
through the gateway, then starts N workers (each on a core of its own, unless asked otherwise)
and times them from when every worker has finished a job to when 90% of the drain's jobs are
finished, by the finishing times the workers record in the database: nothing polls the
workers meanwhile (see :func:`drain`). Drains with 1 and with 2 workers alternate on the same
stack, so that the machine's drift from minute to minute favours neither; each worker has a
core of its own, and may be limited to a share of it as a pod's CPU limit would
(`benchmarks/cpu_quota.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import httpx
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import Stack, meterai_up, wait_ok
from benchmarks.cpu_quota import cpu_quota, cpu_quota_support
from meterai.stack import signing_worker_argv
from meterai.surge.cpu import SIGNING, CpuSnapshot
from services.stamping.config import StampingSettings


@dataclass
class Drain:
    workers: int
    cpus: float | None  # each worker's CPU limit; None: a core each, unlimited
    jobs: int
    failed: int
    upload_seconds: float
    upload_cpu_ms: dict[str, float]
    """CPU per upload in each part of the stack (no worker runs then): what a stamped job
    costs outside the workers before it is queued, which the drain does not count."""
    rate: float
    """Jobs finished per second from when every worker had finished one until 90% were."""
    wall_seconds: float  # workers ready to last job finished
    worker_cpu_ms: float  # per job, in the signing worker processes
    other_cpu_ms_by_part: dict[str, float]  # per job, every other part of the stack
    outside_cores: float  # CPU used meanwhile by processes outside the stack, in cores
    skipped: int  # messages for jobs finished or leased already: duplicates the workers saw

    @property
    def other_cpu_ms(self) -> float:
        """Per job, everything in the stack but the workers."""
        return sum(self.other_cpu_ms_by_part.values())

    @property
    def total_cpu_ms(self) -> float:
        return self.worker_cpu_ms + self.other_cpu_ms

    @property
    def upload_total_cpu_ms(self) -> float:
        return sum(self.upload_cpu_ms.values())

    def allowed_rate(self, cores: int, *, with_uploads: bool = False) -> float:
        """Jobs/s these CPU costs allow on `cores` otherwise idle cores: a worker is one process
        (one core at most, as the GIL has it), and the rest of the stack needs its share, and
        so do the uploads if they keep arriving while the workers sign (a live rush)."""
        shared = self.total_cpu_ms + (self.upload_total_cpu_ms if with_uploads else 0.0)
        worker_cores = self.workers * (self.cpus or 1.0)
        return min(1000 * worker_cores / self.worker_cpu_ms, 1000 * cores / shared)


async def _upload_all(
    gateway: str, api_key: str, document: bytes, jobs: int, concurrency: int = 8
) -> None:
    pending = iter(range(jobs))
    headers = {"Authorization": f"Bearer {api_key}"}

    async def uploader(client: httpx.AsyncClient) -> None:
        for number in pending:
            response = await client.post(
                "/api/v1/stampings",
                files={"file": (f"cpns-{number}.pdf", document, "application/pdf")},
            )
            if response.status_code != 202:
                raise RuntimeError(f"upload refused: {response.status_code} {response.text}")

    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=60) as client:
        await asyncio.gather(*(uploader(client) for _ in range(concurrency)))


def _jobs_by_outcome(metrics: str) -> dict[str, float]:
    """A worker's `meterai_signer_jobs_total` by outcome, from its `/metrics` text."""
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "meterai_signer_jobs"
        for sample in family.samples
        if sample.name == "meterai_signer_jobs_total"
    }


def _skipped(worker_urls: list[str]) -> int:
    """How many messages the workers skipped: their jobs were finished or leased already."""
    return sum(
        int(_jobs_by_outcome(httpx.get(f"{url}/metrics", timeout=5).text).get("skipped", 0))
        for url in worker_urls
    )


async def _all_workers_started(worker_urls: list[str], within: float) -> float:
    """When (Unix time) every worker had finished a job: they have all joined the consumer
    group. Their counters (`/metrics`) are sampled every 50 ms until then, and no longer, so
    as not to load the workers during the drain."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            counts = []
            for url in worker_urls:
                jobs = _jobs_by_outcome((await client.get(f"{url}/metrics")).text)
                counts.append(jobs.get("done", 0) + jobs.get("failed", 0))
            if min(counts) > 0:
                return time.time()
            await asyncio.sleep(0.05)
    raise TimeoutError("not every worker finished a job")


async def _database_now(database_url: str) -> datetime:
    connection = await asyncpg.connect(database_url)
    try:
        now: datetime = await connection.fetchval("SELECT now()")
    finally:
        await connection.close()
    return now


async def _finish_times(
    database_url: str, jobs: int, within: float, since: datetime
) -> tuple[list[float], int]:
    """Wait until every job created since `since` has finished (a count every 0.25 s), then
    return when each was finished (Unix time, as the workers recorded it), in order, and how
    many failed."""
    deadline = time.monotonic() + within
    connection = await asyncpg.connect(database_url)
    try:
        while True:
            finished: int = await connection.fetchval(
                "SELECT count(*) FROM stamping_jobs"
                " WHERE status IN ('done', 'failed') AND created_at >= $1",
                since,
            )
            if finished >= jobs:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{jobs - finished} jobs still unfinished")
            await asyncio.sleep(0.25)
        rows = await connection.fetch(
            "SELECT extract(epoch FROM finished_at) AS at, status::text FROM stamping_jobs"
            " WHERE status IN ('done', 'failed') AND created_at >= $1 ORDER BY finished_at",
            since,
        )
    finally:
        await connection.close()
    return [float(row["at"]) for row in rows], sum(row["status"] == "failed" for row in rows)


async def _group_at_end(bootstrap_servers: str, topic: str, group: str) -> None:
    """Create consumer group `group` with its offsets at the end of `topic` as it is now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()  # the topic's partitions, by a metadata request
        partitions = [
            TopicPartition(topic, partition)
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.commit(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


def _steady_rate(finish_times: list[float], began: float) -> float:
    """Jobs/s from `began` (every worker has finished a job) to when 90% of the jobs were."""
    end = max(int(0.9 * len(finish_times)) - 1, 0)
    ended = finish_times[end]
    if ended <= began:
        raise RuntimeError("the batch was over before every worker took part: use more --jobs")
    return sum(1 for at in finish_times[: end + 1] if at > began) / (ended - began)


@contextmanager
def _signing_workers(
    stack: Stack,
    service_env: dict[str, str],
    count: int,
    pin: bool,
    group: str,
    cpus: float | None = None,
) -> Iterator[list[str]]:
    """Start `count` signing workers on the stack, as `meterai up` would (ports 10, 11, ...
    above the gateway's, kept free by it), each pinned to a core of its own if `pin`, and
    limited to `cpus` CPUs if given; yields their addresses once they answer, and stops them
    afterwards. `service_env`: the environment `meterai up` gives its services (its
    `stack.json`); `group`: their consumer group."""
    gateway_port = int(stack.gateway.rsplit(":", 1)[1])
    cores = sorted(os.sched_getaffinity(0))
    processes, urls = [], []
    limits = ExitStack()
    try:
        for number in range(count):
            port = gateway_port + 10 + number
            process = subprocess.Popen(
                signing_worker_argv("127.0.0.1", port),
                env={
                    **stack.env,
                    **service_env,
                    "METERAI_STAMPING_WORKER_ID": f"signer-{number + 1}",
                    "METERAI_STAMPING_WORKER_GROUP": group,
                },
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            if pin:
                os.sched_setaffinity(process.pid, {cores[number % len(cores)]})
            if cpus is not None:
                limits.enter_context(cpu_quota(process.pid, cpus))
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, processes, strict=True):
            wait_ok(f"{url}/livez", process)
        yield urls
    finally:
        try:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
        finally:
            limits.close()


@dataclass
class BenchStack:
    """`meterai up` without signing workers, with a distributor who has paid for `jobs`
    stamps."""

    stack: Stack
    service_env: dict[str, str]  # the environment `meterai up` gives its services
    api_key: str

    @property
    def database_url(self) -> str:
        return self.service_env["METERAI_STAMPING_DATABASE_URL"]


@contextmanager
def bench_stack(jobs: int, settings: dict[str, str]) -> Iterator[BenchStack]:
    # The one distributor uploads each batch as fast as it can: its contract rate at the
    # gateway (200 requests/s, an upload weighing 5) would refuse most of it.
    unlimited = {
        "METERAI_GATEWAY_DISTRIBUTOR_RATE_PER_SECOND": "100000",
        "METERAI_GATEWAY_DISTRIBUTOR_BURST": "100000",
        # The batch waits for its workers longer than the relay waits before it publishes a
        # job again (30 s, while no worker has finished a job to estimate the backlog by):
        # the duplicates would cost a drain's workers a lease each, more the slower it is.
        "METERAI_STAMPING_REPUBLISH_AFTER_SECONDS": "3600",
    }
    with meterai_up(workers=0, settings={**unlimited, **settings}) as stack:
        info = json.loads((stack.data_dir / "stack.json").read_text())
        created = stack.meterai("distributor", "create", "bench", "--balance", str(jobs * 10_000))
        api_key = re.search(r"api key:\s+(\S+)", created).group(1)  # type: ignore[union-attr]
        stack.meterai("serials", "mint", str(jobs))
        for first in range(0, jobs, 1000):  # at most 1,000 stamps per purchase
            bought = httpx.post(
                f"{stack.gateway}/api/v1/purchases",
                json={"quantity": min(1000, jobs - first)},
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=60,
            )
            bought.raise_for_status()
        yield BenchStack(stack, info["env"], api_key)


def drain(
    bench: BenchStack,
    document: bytes,
    workers: int,
    jobs: int,
    *,
    pin: bool = True,
    cpus: float | None = None,
) -> Drain:
    """Upload ``jobs`` copies while no signing worker runs, then start ``workers`` of them and
    time how they drain the batch; they are stopped afterwards.

    With `pin`, each worker gets a core of its own, as a pod with a limit of one CPU would:
    a lone worker cannot spread its threads' work (hashing, compression and file I/O run
    outside the GIL) over the core the second worker needs, and 2 workers / 1 worker then
    measures what the shared parts (database, broker, relay) cost, not that spread.

    With `cpus`, each worker is also limited to that many CPUs (a CFS quota, as a pod's CPU
    limit is): below 1, the workers leave the rest of the stack room on a machine of two
    cores, as it has on its own nodes in a deployment."""
    stack = bench.stack
    since = asyncio.run(_database_now(bench.database_url))
    # The workers of each drain are a new consumer group that starts where the requests topic
    # ends before the uploads: they take this drain's jobs, none of an earlier one's. (Joining
    # again a group whose members have all left has been seen to hang for minutes on the
    # embedded broker.)
    group = f"bench-signers-{uuid.uuid4().hex[:8]}"
    asyncio.run(
        _group_at_end(
            bench.service_env["METERAI_KAFKA_BOOTSTRAP_SERVERS"],
            StampingSettings().requests_topic,
            group,
        )
    )
    # This process's children: `meterai up` with its services and servers (PostgreSQL's
    # backends included), and the signing workers once started.
    started, cpu_before = time.monotonic(), CpuSnapshot.take(os.getpid())
    asyncio.run(_upload_all(stack.gateway, bench.api_key, document, jobs))
    upload_seconds = time.monotonic() - started
    upload_cpu_ms = {
        part: 1000 * seconds / jobs
        for part, seconds in CpuSnapshot.take(os.getpid()).since(cpu_before).items()
    }
    time.sleep(1)  # the relay publishes the last requests
    with _signing_workers(stack, bench.service_env, workers, pin, group, cpus) as worker_urls:
        resumed_at = time.time()
        began = asyncio.run(_all_workers_started(worker_urls, within=120))
        # CPU is counted from here (start-up and joining the group are behind every worker)
        # to the end, and divided among the jobs finished meanwhile. The rest of the stack
        # is every process of `meterai up`, PostgreSQL's backends for the workers included.
        cpu_before, counted_from = CpuSnapshot.take(os.getpid()), time.monotonic()
        finish_times, failed = asyncio.run(
            _finish_times(bench.database_url, jobs, within=600, since=since)
        )
        counted = time.monotonic() - counted_from
        cpu_after = CpuSnapshot.take(os.getpid())
        used = cpu_after.since(cpu_before)
        worker_cpu_used = used.pop(SIGNING, 0.0)
        other_cpu_used = sum(used.values())
        machine_cpu = cpu_after.machine - cpu_before.machine
        skipped = _skipped(worker_urls)
    counted_jobs = sum(1 for at in finish_times if at > began)
    return Drain(
        workers=workers,
        cpus=cpus,
        jobs=jobs,
        failed=failed,
        upload_seconds=upload_seconds,
        upload_cpu_ms=upload_cpu_ms,
        rate=_steady_rate(finish_times, began),
        wall_seconds=finish_times[-1] - resumed_at,
        worker_cpu_ms=1000 * worker_cpu_used / counted_jobs,
        other_cpu_ms_by_part={
            part: 1000 * seconds / counted_jobs for part, seconds in used.items()
        },
        # This process's own polling counts as outside: a few percent of a core.
        outside_cores=(machine_cpu - worker_cpu_used - other_cpu_used) / counted,
        skipped=skipped,
    )


def _by_part(cpu_ms: dict[str, float]) -> str:
    parts = sorted(cpu_ms.items(), key=lambda part: -part[1])
    return ", ".join(f"{part} {ms:.1f}" for part, ms in parts if ms >= 0.05)


def _worker_cpu(cpus: float | None) -> str:
    return "a core each" if cpus is None else f"{cpus:g} CPU each"


def stack_part(
    document: bytes,
    jobs: int,
    settings: dict[str, str],
    repeat: int,
    *,
    pin: bool = True,
    worker_cpus: Sequence[float | None] = (None,),
) -> None:
    """`repeat` runs on one stack; in each, for every CPU limit of `worker_cpus` (None: a
    core each, unlimited), a drain with 1 worker and one with 2."""
    unsupported = cpu_quota_support()
    if unsupported is not None and any(cpus is not None for cpus in worker_cpus):
        print(f"\nWorkers limited in CPU: not measured, {unsupported}")
        worker_cpus = [cpus for cpus in worker_cpus if cpus is None]
    if not worker_cpus:
        return
    print(
        f"\nThrough the stack: {jobs} uploads, then drained by the workers started after them"
        + ("; each worker on a core of its own" if pin else "")
        + f", with {' and with '.join(_worker_cpu(cpus) for cpus in worker_cpus)}"
        + f"; {repeat} run{'s' if repeat > 1 else ''} of 1 and 2 workers on one stack"
    )
    ratios: dict[float | None, list[float]] = {cpus: [] for cpus in worker_cpus}
    with bench_stack(jobs * 2 * len(worker_cpus) * repeat, settings) as bench:
        for run in range(1, repeat + 1):
            for cpus in worker_cpus:
                # The machine's speed drifts from minute to minute (by 15% here): every other
                # run measures 2 workers first, so that a steady drift does not favour either.
                order = (1, 2) if run % 2 else (2, 1)
                results = {
                    workers: drain(bench, document, workers, jobs, pin=pin, cpus=cpus)
                    for workers in order
                }
                ratios[cpus].append(_report(run, results[1], results[2], jobs))
    if repeat > 1:
        for cpus, found in ratios.items():
            print(
                f"  median 2 workers / 1 worker, {_worker_cpu(cpus)}:"
                f" x{statistics.median(found):.2f}"
            )


def _report(run: int, one: Drain, two: Drain, jobs: int) -> float:
    """Print one run's figures; returns 2 workers / 1 worker."""
    print(f"  run {run}, {_worker_cpu(one.cpus)}:")
    for result in (one, two):
        print(
            f"  {result.workers} worker{'s' if result.workers > 1 else ' '}:"
            f" {result.rate:6.1f} jobs/s   (ready to last {result.wall_seconds:4.1f} s;"
            f" CPU per job: workers {result.worker_cpu_ms:4.1f} ms, rest of the stack"
            f" {result.other_cpu_ms:3.1f} ms; busy outside the stack:"
            f" {result.outside_cores:3.1f} cores)"
            + (f"   FAILED {result.failed}" if result.failed else "")
            + (f"   {result.skipped} duplicate messages skipped" if result.skipped else "")
        )
        rest = _by_part(result.other_cpu_ms_by_part)
        print(f"            the rest of the stack per job: {rest}")
        print(
            f"            before that, {jobs / result.upload_seconds:5.1f} uploads/s, CPU per"
            f" upload {result.upload_total_cpu_ms:4.1f} ms"
            f" ({_by_part(result.upload_cpu_ms)})"
        )
    ratio = two.rate / one.rate
    cores = psutil.cpu_count() or 1
    one_bound, two_bound = one.allowed_rate(cores), two.allowed_rate(cores)
    one_live, two_live = (r.allowed_rate(cores, with_uploads=True) for r in (one, two))
    print(
        f"  run {run}, {_worker_cpu(one.cpus)}: 2 workers / 1 worker x{ratio:.2f} (goal >= 1.8);"
        f" at these CPU"
        f" costs {cores} idle cores would allow {one_bound:.0f} and {two_bound:.0f} jobs/s,"
        f" x{two_bound / one_bound:.2f}; with the uploads arriving meanwhile"
        f" {one_live:.0f} and {two_live:.0f} jobs/s"
    )
    return ratio
