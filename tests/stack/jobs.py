"""Many stamping jobs through a running `meterai up`, and the checks that each was stamped
exactly once, read from the stack's own databases, blob store and worker logs.

"Exactly once" is checked four ways, each of which fails if a job was signed twice:
- the stored output's sha256 is the one the job recorded (a second signature of the same job
  differs: the signing time and the signature itself change);
- every completed signature is logged by the worker that made it (`job_done` when it was
  recorded, `lease_lost` when another attempt had won): at most one per job;
- the stamped PDF carries exactly one signature (`pdfsig`);
- inventory marked each bought serial `used` by exactly the job that carried it, and the
  distributor's counts and the ledger agree (`meterai reconcile`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from aiokafka.admin import AIOKafkaAdminClient

from tests.harness import wait_for
from tests.pdfs import make_pdf
from tests.pdftools import PdfsigReport, require
from tests.stack.running import RunningStack, meterai

WORKER_FACTORY = "services.stamping.worker:create_worker_app"
# Events a worker logs after it produced a signature for a job (see services.stamping.worker).
SIGNATURE_EVENTS = ("job_done", "lease_lost")


@dataclass(frozen=True)
class LoggedEvent:
    worker: str
    event: str
    at: datetime


@dataclass
class Distributor:
    api_key: str
    serials: list[str]

    def client(self, gateway: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=gateway, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60
        )


@dataclass
class Uploads:
    """Jobs accepted so far by a running `upload` (the list grows while it runs)."""

    job_ids: list[uuid.UUID] = field(default_factory=list)
    # Uploads answered "try again shortly" (503) and sent again, as a client would.
    retried: int = 0


@dataclass(frozen=True)
class Verdict:
    """Per job, the signatures the workers logged, and the temporary files of output writes
    that a crash interrupted (garbage, never visible as blobs)."""

    events: dict[uuid.UUID, list[LoggedEvent]]
    unfinished_writes: dict[uuid.UUID, list[str]]


@dataclass(frozen=True)
class HeldJob:
    """A job a worker held when it was stopped: its attempt and when its lease runs out."""

    job_id: uuid.UUID
    attempts: int
    lease_expires_at: datetime


class StackProbe:
    """A running `meterai up` seen from outside: processes, databases, blobs, logs."""

    def __init__(
        self, running: RunningStack, data_dir: Path, base_port: int, env: dict[str, str]
    ) -> None:
        self.running = running
        self.data_dir = data_dir
        self.base_port = base_port
        self.env = env
        self.stamping: asyncpg.Pool[Any] | None = None
        self.inventory: asyncpg.Pool[Any] | None = None

    @classmethod
    async def open(cls, running: RunningStack, data_dir: Path, base_port: int) -> StackProbe:
        stack_file = data_dir / "stack.json"

        async def written() -> bool:  # just after the gateway is ready
            return stack_file.exists()

        await wait_for(written, within=30)
        env: dict[str, str] = json.loads(stack_file.read_text())["env"]
        probe = cls(running, data_dir, base_port, env)
        probe.stamping = await asyncpg.create_pool(
            env["METERAI_STAMPING_DATABASE_URL"], min_size=1, max_size=2
        )
        probe.inventory = await asyncpg.create_pool(
            env["METERAI_INVENTORY_DATABASE_URL"], min_size=1, max_size=2
        )
        return probe

    async def partition_counts(self, topics: list[str]) -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.env["METERAI_KAFKA_BOOTSTRAP_SERVERS"])
        await admin.start()
        try:
            described = await admin.describe_topics(topics)
        finally:
            await admin.close()
        return {meta["topic"]: len(meta["partitions"]) for meta in described}

    async def close(self) -> None:
        for pool in (self.stamping, self.inventory):
            if pool is not None:
                await pool.close()

    @property
    def gateway(self) -> str:
        return self.running.gateway

    @property
    def blobs(self) -> Path:
        return self.data_dir / "blobs"

    def log_text(self) -> str:
        return self.running.log.read_text()

    # Processes.

    def worker(self, name: str) -> psutil.Process:
        """The live process of signing worker `name` (`signer-1` listens on base + 10)."""
        port = str(self.base_port + 9 + int(name.rsplit("-", 1)[1]))
        for process in self.running.descendants():
            with suppress(psutil.Error):  # exited while being looked at
                command = process.cmdline()
                if WORKER_FACTORY in command and command[command.index("--port") + 1] == port:
                    return process
        raise LookupError(f"no running {name}")

    async def wait_worker(self, name: str, within: float = 60) -> psutil.Process:
        """The process of `name` once the supervisor has it running and ready again."""

        async def ready() -> psutil.Process | None:
            try:
                process = self.worker(name)
            except LookupError:
                return None
            async with httpx.AsyncClient(timeout=2) as client:
                try:
                    port = self.base_port + 9 + int(name.rsplit("-", 1)[1])
                    response = await client.get(f"http://127.0.0.1:{port}/livez")
                except httpx.TransportError:
                    return None
            return process if response.status_code == 200 else None

        found: psutil.Process = await wait_for(ready, within=within, interval=0.2)
        return found

    def broker(self) -> psutil.Process:
        for process in self.running.descendants():
            with suppress(psutil.Error):  # exited while being looked at
                if process.name() == "tansu":
                    return process
        raise LookupError("no running broker")

    # Distributors and uploads, as a distributor does them.

    async def distributor(self, stamps: int) -> Distributor:
        """A new distributor (operator CLI) that bought `stamps` stamps through the gateway."""
        name = f"d-{uuid.uuid4().hex[:10]}"
        created = await asyncio.to_thread(
            meterai, self.data_dir, "distributor", "create", name, "--balance", str(10_000 * stamps)
        )
        assert created.returncode == 0, created.stderr
        match = re.search(r"api key:\s+(\S+)", created.stdout)
        assert match, created.stdout
        minted = await asyncio.to_thread(meterai, self.data_dir, "serials", "mint", str(stamps))
        assert minted.returncode == 0, minted.stderr
        buyer = Distributor(match.group(1), [])
        async with buyer.client(self.gateway) as api:
            bought = await api.post("/api/v1/purchases", json={"quantity": stamps})
        assert bought.status_code == 201, bought.text
        buyer.serials = bought.json()["serials"]
        assert len(buyer.serials) == stamps
        return buyer

    async def upload(
        self, buyer: Distributor, count: int, into: Uploads, concurrency: int = 6
    ) -> list[uuid.UUID]:
        """Upload `count` PDFs through the gateway (each 202), appending job ids to `into`."""
        documents = [make_pdf(1 + index % 3) for index in range(3)]
        next_index = iter(range(count))
        async with buyer.client(self.gateway) as api:

            async def uploader() -> None:
                for index in next_index:
                    # The same key on a retry: the stack never makes two jobs of one upload.
                    headers = {"Idempotency-Key": str(uuid.uuid4())}
                    upload = (f"{index}.pdf", documents[index % 3], "application/pdf")
                    for _ in range(5):
                        response = await api.post(
                            "/api/v1/stampings", files={"file": upload}, headers=headers
                        )
                        if response.status_code != 503:
                            break
                        into.retried += 1
                        await asyncio.sleep(0.5)
                    assert response.status_code == 202, response.text
                    into.job_ids.append(uuid.UUID(response.json()["id"]))

            await asyncio.gather(*(uploader() for _ in range(concurrency)))
        return into.job_ids

    # What the stamping database says.

    async def statuses(self, job_ids: Iterable[uuid.UUID]) -> Counter[str]:
        assert self.stamping is not None
        rows = await self.stamping.fetch(
            "SELECT status::text, count(*) AS n FROM stamping_jobs WHERE id = ANY($1) "
            "GROUP BY status",
            list(job_ids),
        )
        return Counter({row["status"]: row["n"] for row in rows})

    async def wait_done(
        self, job_ids: list[uuid.UUID], count: int | None = None, within: float = 300
    ) -> None:
        """Until `count` (default: all) of the jobs are done; no job may fail meanwhile."""
        wanted = len(job_ids) if count is None else count

        async def enough() -> bool:
            statuses = await self.statuses(job_ids)
            assert statuses["failed"] == 0, statuses
            return statuses["done"] >= wanted

        await wait_for(enough, within=within, interval=0.25)

    async def held_by(self, worker: str) -> list[HeldJob]:
        """Jobs that `worker` holds a lease on right now (any job: an upload may be taken
        before its client has read the response)."""
        assert self.stamping is not None
        rows = await self.stamping.fetch(
            "SELECT id, attempts, lease_expires_at FROM stamping_jobs "
            "WHERE status = 'signing' AND lease_owner = $1",
            worker,
        )
        return [HeldJob(row["id"], row["attempts"], row["lease_expires_at"]) for row in rows]

    async def jobs(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
        assert self.stamping is not None
        rows = await self.stamping.fetch("SELECT * FROM stamping_jobs WHERE id = ANY($1)", job_ids)
        return {row["id"]: row for row in rows}

    async def stop_holding(
        self, worker: str, then: signal.Signals | None
    ) -> tuple[list[HeldJob], float]:
        """Freeze `worker` (SIGSTOP) at a moment it holds leases on some jobs, send it
        `then` and let it run again (with `then=None` it stays frozen). Returns the jobs it
        held and when the signal went out.

        Frozen, the worker cannot finish or take jobs, so the leases read are exactly those it
        held when the signal arrived.
        """
        for _ in range(200):
            process = self.worker(worker)
            process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.15)
            held = await self.held_by(worker)
            if held and then is None:
                # A job it froze while recording (its row locked) stays its own until it wakes
                # up and commits, or dies: it is not one that another worker can take over.
                locked = await self._locked([job.job_id for job in held])
                held = [job for job in held if job.job_id not in locked]
            if held:
                sent = time.time()
                if then is not None:
                    process.send_signal(then)
                    with suppress(psutil.NoSuchProcess):  # SIGKILL: nothing left to continue
                        process.send_signal(signal.SIGCONT)
                return held, sent
            process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.1)
        # Say why: did the worker sign anything lately, and what did it last log?
        log = self.data_dir / "logs" / f"{worker}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        assert self.stamping is not None
        recent = await self.stamping.fetch(
            "SELECT lease_owner, status::text, count(*) AS n FROM stamping_jobs "
            "WHERE created_at > now() - interval '2 minutes' GROUP BY 1, 2"
        )
        raise AssertionError(
            f"{worker} never held a lease; recent jobs by lease owner and status: "
            f"{[tuple(row) for row in recent]}; its log ends:\n" + "\n".join(tail)
        )

    async def _locked(self, job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Those of these jobs whose rows a transaction holds."""
        assert self.stamping is not None
        async with self.stamping.acquire() as connection, connection.transaction():
            free = await connection.fetch(
                "SELECT id FROM stamping_jobs WHERE id = ANY($1) FOR UPDATE SKIP LOCKED",
                job_ids,
            )
        return set(job_ids) - {row["id"] for row in free}

    # Worker logs.

    def signature_events(self, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[LoggedEvent]]:
        """Per job, every completed signature the workers logged (from all their lifetimes)."""
        wanted = {str(job_id) for job_id in job_ids}
        found: dict[uuid.UUID, list[LoggedEvent]] = {uuid.UUID(j): [] for j in wanted}
        for log in sorted((self.data_dir / "logs").glob("signer-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") in SIGNATURE_EVENTS and entry.get("job_id") in wanted:
                    found[uuid.UUID(entry["job_id"])].append(
                        LoggedEvent(
                            log.stem,
                            entry["event"],
                            datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")),
                        )
                    )
        return found

    def relay_republished(self, since: float) -> int:
        """How many unfinished jobs the outbox relay published again after `since`."""
        count = 0
        for line in (self.data_dir / "logs" / "stamping.log").read_text().splitlines():
            if '"stale_jobs_requeued"' not in line:
                continue
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
            if at.timestamp() >= since:
                count += int(entry["count"])
        return count

    # The whole verdict.

    async def check_stamped_exactly_once(
        self, buyer: Distributor, job_ids: list[uuid.UUID], paused: Iterable[uuid.UUID] = ()
    ) -> Verdict:
        """Every job done with one output that is the one recorded, signed once; every serial
        the buyer bought used by exactly its job; the books agree. Returns who signed what,
        when, and the writes that crashes left unfinished.

        A worker paused past its lease cannot know it lost the job before it tries to record
        its signature: for the `paused` jobs, signatures refused as `lease_lost` are allowed.
        """
        assert len(set(job_ids)) == len(job_ids) == len(buyer.serials)
        jobs = await self.jobs(job_ids)
        assert {job["status"] for job in jobs.values()} == {"done"}
        outputs = self.blobs / "outputs"
        for job_id, job in jobs.items():
            assert job["output_key"] == f"outputs/{job_id}.pdf"
            stored = (self.blobs / job["output_key"]).read_bytes()
            assert hashlib.sha256(stored).hexdigest() == job["output_sha256"], (
                f"job {job_id}: the stored output is not the one recorded as done"
            )
        # Exactly one output per job: the job's own key, and nothing else named after it but
        # the temporary file of a write that a crash interrupted (never visible as a blob).
        names = [path.name for path in outputs.iterdir()]
        unfinished_writes: dict[uuid.UUID, list[str]] = {}
        for job_id in jobs:
            named = [name for name in names if str(job_id) in name]
            temporary = [
                name for name in named if re.fullmatch(rf"\.{job_id}\.pdf\.\w+\.tmp", name)
            ]
            assert sorted(set(named) - set(temporary)) == [f"{job_id}.pdf"], named
            if temporary:
                unfinished_writes[job_id] = temporary

        events = self.signature_events(job_ids)
        excused = set(paused)
        signed_twice = {
            job: found
            for job, found in events.items()
            if len(found if job not in excused else [e for e in found if e.event == "job_done"]) > 1
        }
        assert not signed_twice, f"signed more than once: {signed_twice}"

        # Inventory learns of each use from `stamping.results`, shortly after the job is done.
        by_serial = {job["serial"]: job_id for job_id, job in jobs.items()}
        assert set(by_serial) == set(buyer.serials)
        assert self.inventory is not None
        inventory = self.inventory

        async def serials_used() -> bool:
            rows = await inventory.fetch(
                "SELECT serial, state::text, job_id FROM serials WHERE serial = ANY($1)",
                buyer.serials,
            )
            return all(row["state"] == "used" for row in rows)

        try:
            await wait_for(serials_used, within=60, interval=0.5)
        except TimeoutError:
            rows = await inventory.fetch(
                "SELECT serial, state::text, job_id FROM serials "
                "WHERE serial = ANY($1) AND state <> 'used'",
                buyer.serials,
            )
            raise AssertionError(f"serials never marked used: {[dict(r) for r in rows]}") from None
        rows = await inventory.fetch(
            "SELECT serial, job_id FROM serials WHERE serial = ANY($1)", buyer.serials
        )
        assert {row["serial"]: row["job_id"] for row in rows} == by_serial
        async with buyer.client(self.gateway) as api:
            stamps = (await api.get("/api/v1/balance")).json()["stamps"]
        assert stamps == {"reserved": 0, "sold": 0, "used": len(job_ids)}
        books = await asyncio.to_thread(meterai, self.data_dir, "reconcile")
        assert books.returncode == 0, books.stdout + books.stderr
        return Verdict(events, unfinished_writes)


async def validate_pdfs(paths: list[Path], concurrency: int | None = None) -> list[str]:
    """Run `pdfsig` and `qpdf --check` on every file, several at once; returns the problems
    (each file must carry exactly one valid signature covering the whole document)."""
    pdfsig, qpdf = require("pdfsig"), require("qpdf")
    gate = asyncio.Semaphore(concurrency or max(2, os.cpu_count() or 2))

    async def run(*command: str) -> tuple[int, str]:
        async with gate:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return process.returncode or 0, output.decode(errors="replace")

    async def check(path: Path) -> list[str]:
        (_, signatures), (checked, qpdf_output) = await asyncio.gather(
            run(pdfsig, str(path)), run(qpdf, "--check", str(path))
        )
        report = PdfsigReport(signatures)
        problems = []
        if not (report.all_valid and report.total_document_signed and report.signatures == 1):
            problems.append(f"{path.name}: pdfsig: {signatures.strip()}")
        if checked != 0:
            problems.append(f"{path.name}: qpdf --check: {qpdf_output.strip()}")
        return problems

    results = await asyncio.gather(*(check(path) for path in paths))
    return [problem for problems in results for problem in problems]
