"""Part two of `benchmarks.stamping`: jobs per second through the whole stack.

`meterai up` with N signing workers; the workers are paused (SIGSTOP) while the jobs are
uploaded through the gateway, then resumed, and the drain is timed from the workers' own
counters (see :func:`drain`).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import time
from dataclasses import dataclass

import asyncpg
import httpx
import psutil

from benchmarks.common import meterai_up


@dataclass
class Drain:
    workers: int
    jobs: int
    failed: int
    upload_seconds: float
    rate: float
    """Jobs finished per second from when every worker had finished one until 90% were."""
    wall_seconds: float  # resume to last finished
    worker_cpu_ms: float  # per job, in the signing worker processes
    other_cpu_ms: float  # per job, everything else in the stack
    outside_cores: float  # CPU used meanwhile by processes outside the stack, in cores

    @property
    def total_cpu_ms(self) -> float:
        return self.worker_cpu_ms + self.other_cpu_ms


def _processes(up_pid: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The stack's worker processes and all its other processes."""
    children = psutil.Process(up_pid).children(recursive=True)
    workers = [p for p in children if "services.stamping.worker:create_worker_app" in p.cmdline()]
    return workers, [p for p in children if p not in workers]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _machine_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


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


_FINISHED = re.compile(
    r'^meterai_signer_jobs_total\{outcome="(?:done|failed)"\} ([0-9.e+]+)$', re.M
)


async def _watch(worker_urls: list[str], jobs: int, within: float) -> list[tuple[float, list[int]]]:
    """Sample each worker's finished-jobs counter (its /metrics) until all jobs are finished:
    (monotonic time, counts per worker)."""
    samples: list[tuple[float, list[int]]] = []
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5) as client:
        while not samples or sum(samples[-1][1]) < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{jobs - sum(samples[-1][1])} jobs still unfinished")
            await asyncio.sleep(0.05)
            counts = []
            for url in worker_urls:
                metrics = (await client.get(f"{url}/metrics")).text
                counts.append(int(sum(float(value) for value in _FINISHED.findall(metrics))))
            samples.append((time.monotonic(), counts))
    return samples


def _steady_rate(samples: list[tuple[float, list[int]]], jobs: int) -> float:
    """Jobs/s from the first sample where every worker has finished a job (the consumer
    group has settled: after pausing, the workers rejoin it) to the one where 90% are."""
    start = next(i for i, (_, counts) in enumerate(samples) if min(counts) > 0)
    end = next(i for i, (_, counts) in enumerate(samples) if sum(counts) >= 0.9 * jobs)
    if end <= start:
        raise RuntimeError("the batch was over before every worker took part: use more --jobs")
    (began, first), (ended, last) = samples[start], samples[end]
    return (sum(last) - sum(first)) / (ended - began)


async def _failed(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM stamping_jobs WHERE status = 'failed'"
        )
        return count
    finally:
        await connection.close()


def drain(document: bytes, workers: int, jobs: int, settings: dict[str, str]) -> Drain:
    """Upload ``jobs`` copies with the workers paused, then time how the workers drain them."""
    # The one distributor uploads the whole batch as fast as it can: its contract rate at the
    # gateway (200 requests/s, an upload weighing 5) would refuse most of it.
    unlimited = {
        "METERAI_GATEWAY_DISTRIBUTOR_RATE_PER_SECOND": "100000",
        "METERAI_GATEWAY_DISTRIBUTOR_BURST": "100000",
    }
    with meterai_up(workers=workers, settings={**unlimited, **settings}) as stack:
        info = json.loads((stack.data_dir / "stack.json").read_text())
        created = stack.meterai("distributor", "create", "bench", "--balance", str(jobs * 10_000))
        api_key = re.search(r"api key:\s+(\S+)", created).group(1)  # type: ignore[union-attr]
        stack.meterai("serials", "mint", str(jobs))
        bought = httpx.post(
            f"{stack.gateway}/api/v1/purchases",
            json={"quantity": jobs},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )
        bought.raise_for_status()
        signing, others = _processes(info["pid"])
        if len(signing) != workers:
            raise RuntimeError(f"expected {workers} worker processes, found {len(signing)}")
        # `meterai up` gives worker N the port 10 + N - 1 above the gateway's.
        gateway_port = int(stack.gateway.rsplit(":", 1)[1])
        worker_urls = [f"http://127.0.0.1:{gateway_port + 10 + n}" for n in range(workers)]
        for process in signing:
            process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            asyncio.run(_upload_all(stack.gateway, api_key, document, jobs))
            upload_seconds = time.monotonic() - began
            time.sleep(1)  # the relay publishes the last requests
        finally:
            worker_cpu, other_cpu = _cpu_seconds(signing), _cpu_seconds(others)
            machine_cpu, resumed = _machine_cpu_seconds(), time.monotonic()
            for process in signing:
                process.send_signal(signal.SIGCONT)
        samples = asyncio.run(_watch(worker_urls, jobs, within=600))
        ended = samples[-1][0]
        worker_cpu = _cpu_seconds(signing) - worker_cpu
        other_cpu = _cpu_seconds(others) - other_cpu
        machine_cpu = _machine_cpu_seconds() - machine_cpu
        return Drain(
            workers=workers,
            jobs=jobs,
            failed=asyncio.run(_failed(info["env"]["METERAI_STAMPING_DATABASE_URL"])),
            upload_seconds=upload_seconds,
            rate=_steady_rate(samples, jobs),
            wall_seconds=ended - resumed,
            worker_cpu_ms=1000 * worker_cpu / jobs,
            other_cpu_ms=1000 * other_cpu / jobs,
            # This process's own polling counts as outside: a few percent of a core.
            outside_cores=(machine_cpu - worker_cpu - other_cpu) / (ended - resumed),
        )


def stack_part(document: bytes, jobs: int, settings: dict[str, str], repeat: int) -> None:
    print(f"\nThrough the stack: {jobs} uploads with the workers paused, then drained")
    ratios = []
    for run in range(1, repeat + 1):
        one, two = (drain(document, workers, jobs, settings) for workers in (1, 2))
        for result in (one, two):
            print(
                f"  {result.workers} worker{'s' if result.workers > 1 else ' '}:"
                f" {result.rate:6.1f} jobs/s   (resume to last {result.wall_seconds:4.1f} s;"
                f" uploads {jobs / result.upload_seconds:5.1f}/s; CPU per job: workers"
                f" {result.worker_cpu_ms:4.1f} ms, rest of the stack {result.other_cpu_ms:3.1f} ms;"
                f" busy outside the stack: {result.outside_cores:3.1f} cores)"
                + (f"   FAILED {result.failed}" if result.failed else "")
            )
        ratios.append(two.rate / one.rate)
        # What the CPU per job allows on otherwise idle cores: a worker is one process (one
        # core at most, as the GIL has it), and the rest of the stack needs its share.
        cores = psutil.cpu_count() or 1
        one_bound = min(1000 / one.worker_cpu_ms, 1000 * cores / one.total_cpu_ms)
        two_bound = min(2000 / two.worker_cpu_ms, 1000 * cores / two.total_cpu_ms)
        print(
            f"  run {run}: 2 workers / 1 worker x{ratios[-1]:.2f} (goal >= 1.8); at these CPU"
            f" costs {cores} idle cores would allow {one_bound:.0f} and {two_bound:.0f} jobs/s,"
            f" x{two_bound / one_bound:.2f}"
        )
    if repeat > 1:
        print(f"  median 2 workers / 1 worker: x{statistics.median(ratios):.2f}")
