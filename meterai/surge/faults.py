"""Fault rehearsal: while the crowd rushes, kill or restart each part of a local `meterai up` in
turn, and measure how long the system took to serve again and what the clients saw meanwhile.

One fault at a time: the next begins `gap` seconds after the previous one recovered, so that
what clients saw can be laid at one fault's door. For each fault:

* **the part is back** when its replacement (the supervisor restarts it) is ready: a service
  answers `/livez`, PostgreSQL a query, Redis a PING, the broker lists the stamping topics;
* **recovered** once, after that, the gateway's `/healthz` reports every service and its
  dependencies ok, a place in the room can be taken, a canary distributor's purchase and upload
  through the gateway are accepted, and a stamping job has finished since the part came back;
* **the invariants** that hold at any moment are checked right then (the ledger reconciles, no
  serial is stamped twice, every paid purchase carries its serials, the room's admission counter
  did not go back); those that need the run to be over (every job in flight at the fault
  finished; queue numbers given after the fault follow those given before it) are checked at
  the end, with what the clients saw during the fault (`assess`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text

from meterai.surge.checks import Check, Databases, overlaps
from meterai.surge.document import reference_document
from meterai.surge.plan import DistributorAccount
from meterai.surge.prepare import SurgeError, Target
from meterai.surge.records import Outcome, Records
from services.inventory import service as inventory
from services.platform.db import create_sessionmaker, transaction
from services.stamping.config import StampingSettings

# A part must be back, and the system serving again, within these (else the fault failed).
BACK_WITHIN_SECONDS = 120.0
RECOVER_WITHIN_SECONDS = 30.0  # after the part is back (issue 8)
PROBE_INTERVAL_SECONDS = 0.5


@dataclass(frozen=True)
class Part:
    """One kind of fault: which process of the stack, and the signal that ends it."""

    name: str
    what: str  # for people
    marker: str  # in the command line of the stack's direct child
    signal: signal.Signals = signal.SIGKILL
    wipe: bool = False  # delete its data before it comes back (Redis: `--dir`)


PARTS: dict[str, Part] = {
    part.name: part
    for part in (
        Part("worker", "SIGKILL a signing worker", "services.stamping.worker:"),
        Part("stamping", "SIGKILL the stamping API", "services.stamping.app:"),
        Part("inventory", "SIGKILL inventory", "services.inventory.app:"),
        Part("queue", "SIGKILL the queue service", "services.queue.app:"),
        Part("gateway", "SIGKILL the gateway", "services.gateway.app:"),
        Part("broker", "SIGKILL the Kafka broker (it comes back empty)", "tansu"),
        # SIGINT is PostgreSQL's fast shutdown: every session is ended, as in a restart.
        Part("postgres", "restart PostgreSQL", "postgres", signal.SIGINT),
        Part("redis", "SIGKILL Redis", "redis-server"),
        # As after a failover to a replica that had not caught up: the room must be rebuilt.
        Part("redis-lost", "SIGKILL Redis and delete its data", "redis-server", wipe=True),
    )
}


def parse_faults(spec: str) -> list[Part]:
    """`all`, or names separated by commas, in the order given."""
    names = list(PARTS) if spec.strip() == "all" else [n.strip() for n in spec.split(",")]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise SurgeError(f"unknown faults {unknown}: choose from {', '.join(PARTS)} or all")
    return [PARTS[name] for name in names]


@dataclass
class FaultResult:
    part: str
    what: str
    at: float  # the signal went out
    pid: int
    back_at: float | None = None
    recovered_at: float | None = None
    new_pid: int | None = None
    waited_for: str = ""  # what recovery still lacked when it gave up
    in_flight: list[str] = field(default_factory=list)  # jobs unfinished at the fault
    checks: list[Check] = field(default_factory=list)  # live, then at the end
    clients: str = ""  # what the crowd saw during the fault (set at the end)

    @property
    def back_after(self) -> float | None:
        return None if self.back_at is None else self.back_at - self.at

    @property
    def recovered_after(self) -> float | None:
        """Seconds from the part being back to the system serving again."""
        if self.recovered_at is None or self.back_at is None:
            return None
        return self.recovered_at - self.back_at

    @property
    def window(self) -> tuple[float, float]:
        """While clients could notice: from the signal until recovered (or a minute on)."""
        end = self.recovered_at or (self.back_at or self.at) + 60
        return self.at, end

    @property
    def ok(self) -> bool:
        recovered = self.recovered_after
        return (
            recovered is not None
            and recovered <= RECOVER_WITHIN_SECONDS
            and all(check.ok for check in self.checks)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "what": self.what,
            "at": self.at,
            "back_after_seconds": self.back_after,
            "recovered_after_seconds": self.recovered_after,
            "ok": self.ok,
            "waited_for": self.waited_for,
            "pid": self.pid,
            "new_pid": self.new_pid,
            "in_flight_jobs": len(self.in_flight),
            "clients_saw": self.clients,
            "checks": [
                {"name": check.name, "ok": check.ok, "detail": check.detail}
                for check in self.checks
            ],
        }


class StackProcesses:
    """The processes `meterai up` supervises (its direct children), found by command line."""

    def __init__(self, stack_pid: int) -> None:
        self.stack_pid = stack_pid

    def find(self, part: Part, command: list[str] | None = None) -> psutil.Process | None:
        """The first live process of `part` (or the one started with exactly `command`: the
        replacement of a process killed, not another of its kind)."""
        try:
            children = psutil.Process(self.stack_pid).children(recursive=False)
        except psutil.Error as exc:
            raise SurgeError(f"the stack (pid {self.stack_pid}) is gone") from exc
        for child in sorted(children, key=lambda process: process.pid):
            try:
                # A process that rewrites its title (Redis) pads it with empty arguments.
                argv = [argument for argument in child.cmdline() if argument]
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if command is not None and argv != command:
                    continue
                if part.marker in (" ".join(argv) or child.name()):
                    return child
            except psutil.Error:
                continue
        return None

    def address(self, process: psutil.Process) -> str | None:
        """`host:port` of a service, as it was started (`--host`, `--port`)."""
        try:
            command = process.cmdline()
        except psutil.Error:
            return None
        if "--port" not in command:
            return None
        host = command[command.index("--host") + 1] if "--host" in command else "127.0.0.1"
        return f"{host}:{command[command.index('--port') + 1]}"


class Injector:
    """Runs the faults in a thread of its own (the crowd runs in another process)."""

    def __init__(
        self,
        target: Target,
        stack_pid: int,
        parts: Sequence[Part],
        canary: DistributorAccount,
        *,
        first_after: float,
        gap: float,
        say: Callable[[str], None],
        redis_url: str,
        kafka_bootstrap: str,
    ) -> None:
        self.target = target
        self.processes = StackProcesses(stack_pid)
        self.parts = list(parts)
        self.canary = canary
        self.first_after = first_after
        self.gap = gap
        self.say = say
        self.redis_url = redis_url
        self.kafka_bootstrap = kafka_bootstrap
        self.results: list[FaultResult] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._document = reference_document(pages=1)
        self.error: BaseException | None = None

    def verdict(self) -> Check:
        """One line for the run's verdict: every fault injected during the surge, each
        recovered in time with every invariant true."""
        failed = [result for result in self.results if not result.ok]
        skipped = self.parts[len(self.results) :]
        if self.error is not None:
            return Check(
                f"Every fault recovered within {RECOVER_WITHIN_SECONDS:.0f} s, invariants true",
                False,
                f"the fault injector stopped after {len(self.results)} faults: {self.error!r}",
            )
        recovered = [r.recovered_after for r in self.results if r.recovered_after is not None]
        detail = f"{len(self.results)} of {len(self.parts)} faults injected"
        if recovered:
            detail += (
                f"; serving again {min(recovered):.1f}-{max(recovered):.1f} s "
                "after the part was back"
            )
        if failed:
            detail += "; failed: " + "; ".join(
                f"{r.part} ("
                + (
                    ", ".join(c.name for c in r.checks if not c.ok)
                    or f"not serving within {RECOVER_WITHIN_SECONDS:.0f} s: {r.waited_for}"
                )
                + ")"
                for r in failed
            )
        if skipped:
            detail += (
                f"; not injected, the crowd had left: {', '.join(p.name for p in skipped)} "
                "(a longer --over gives them time)"
            )
        return Check(
            f"Every fault recovered within {RECOVER_WITHIN_SECONDS:.0f} s, invariants true",
            not failed and not skipped,
            detail,
        )

    def check_parts(self) -> None:
        """Refuse up front a fault whose part does not run under this stack."""
        missing = [part.name for part in self.parts if self.processes.find(part) is None]
        if missing:
            raise SurgeError(
                f"cannot inject {', '.join(missing)}: not run by this `meterai up` "
                "(configured elsewhere by URL?)"
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BACK_WITHIN_SECONDS + RECOVER_WITHIN_SECONDS + 30)

    def _run(self) -> None:
        # The broker's client complains while the broker is down: that is the point here.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        try:
            asyncio.run(self._inject_all())
        except BaseException as exc:  # noqa: BLE001 - reported by the surge, not lost
            self.error = exc
            self.say(f"fault injection stopped: {exc!r}")

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; False if asked."""
        return not await asyncio.to_thread(self._stop.wait, seconds)

    async def _inject_all(self) -> None:
        if not await self._sleep(self.first_after):
            return
        db = Databases(self.target)
        try:
            async with httpx.AsyncClient(base_url=self.target.gateway, timeout=10) as client:
                for number, part in enumerate(self.parts, start=1):
                    result = await self._inject(part, number, db, client)
                    self.results.append(result)
                    back = f"{result.back_after:.1f} s" if result.back_after is not None else "-"
                    recovered = (
                        f"{result.recovered_after:.1f} s"
                        if result.recovered_after is not None
                        else f"not within {RECOVER_WITHIN_SECONDS:.0f} s ({result.waited_for})"
                    )
                    self.say(
                        f"fault {number}/{len(self.parts)}: {part.what}: back after {back}, "
                        f"serving again {recovered} later"
                    )
                    if number < len(self.parts) and not await self._sleep(self.gap):
                        return
        finally:
            await db.close()

    async def _inject(
        self, part: Part, number: int, db: Databases, client: httpx.AsyncClient
    ) -> FaultResult:
        process = self.processes.find(part)
        if process is None:
            raise SurgeError(f"no {part.name} process to fault")
        serving_before = await self._serving(client)
        in_flight = await _unfinished_jobs(db)
        self.say(f"fault {number}/{len(self.parts)}: {part.what} (pid {process.pid})")
        command = [argument for argument in process.cmdline() if argument]
        # Redis rewrites its process title, but works in its data directory (`--dir`).
        data_dir = Path(process.cwd()) if part.wipe else None
        result = FaultResult(part.name, part.what, time.time(), process.pid, in_flight=in_flight)
        process.send_signal(part.signal)
        await asyncio.to_thread(_wait_gone, process)
        if data_dir is not None:
            _wipe_redis_data(data_dir)
        replacement = await self._until(
            lambda: self._back(part, command, process.pid, db), BACK_WITHIN_SECONDS
        )
        if replacement is None:
            result.waited_for = "the part to come back"
            return result
        result.back_at, result.new_pid = time.time(), replacement
        waiting: list[str] = []

        async def serving() -> bool:
            waiting[:] = await self._lacking(client, db, result, number)
            return not waiting

        if await self._until(serving, RECOVER_WITHIN_SECONDS + 30) is None:
            result.waited_for = ", ".join(waiting)
            return result
        result.recovered_at = time.time()
        result.checks = await live_checks(db, await self._serving(client), serving_before)
        return result

    async def _until(self, probe: Callable[[], Awaitable[Any]], within: float) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                found = await probe()
            except Exception:  # noqa: BLE001 - not yet: the part is still coming back
                found = None
            if found:
                return found
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
        return None

    async def _back(
        self, part: Part, command: list[str], old_pid: int, db: Databases
    ) -> int | None:
        """The replacement's pid once it is ready."""
        process = self.processes.find(part, command)
        if process is None or process.pid == old_pid:
            return None
        if part.name == "postgres":
            async with db.inventory.connect() as connection:
                await connection.execute(text("SELECT 1"))
        elif part.marker == "redis-server":
            redis = aioredis.from_url(self.redis_url, socket_timeout=2)
            try:
                await redis.ping()
            finally:
                await redis.aclose()
        elif part.name == "broker":
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=3000
            )
            await admin.start()
            try:
                topics = await admin.list_topics()
            finally:
                await admin.close()
            if StampingSettings().requests_topic not in topics:
                return None
        else:
            address = self.processes.address(process)
            async with httpx.AsyncClient(timeout=2) as http:
                live = await http.get(f"http://{address}/livez")
            if live.status_code != 200:
                return None
        return process.pid

    async def _lacking(
        self, client: httpx.AsyncClient, db: Databases, result: FaultResult, number: int
    ) -> list[str]:
        """What the system does not yet do again (empty once it serves)."""
        lacking = []
        health = await client.get("/healthz")
        if health.status_code != 200:
            failing = [
                name
                for name, report in health.json().get("services", {}).items()
                if report.get("status") != "ok"
            ]
            lacking.append(f"healthz ({', '.join(failing)})")
        joined = await client.post("/queue/join", headers={"X-Forwarded-For": "10.255.0.1"})
        if joined.status_code != 200:
            lacking.append(f"join ({joined.status_code})")
        if not await self._canary(client, number):
            lacking.append("canary purchase and upload")
        assert result.back_at is not None  # noqa: S101 - only asked once the part is back
        finished = await db.rows(
            db.stamping,
            "SELECT 1 FROM stamping_jobs WHERE finished_at > :since LIMIT 1",
            since=datetime.fromtimestamp(result.back_at, UTC),
        )
        if not finished:
            lacking.append("a job finished")
        return lacking

    async def _canary(self, client: httpx.AsyncClient, number: int) -> bool:
        """A distributor buys one stamp and uploads a page with it (each once per fault:
        the Idempotency-Keys make the retries safe)."""
        headers = {"Authorization": f"Bearer {self.canary.api_key}"}
        run = f"{self.canary.name}-{number}"
        bought = await client.post(
            "/api/v1/purchases",
            json={"quantity": 1},
            headers={**headers, "Idempotency-Key": f"{run}-purchase"},
        )
        if bought.status_code != 201:
            return False
        serial = bought.json()["serials"][0]
        uploaded = await client.post(
            "/api/v1/stampings",
            files={"file": ("canary.pdf", self._document, "application/pdf")},
            data={"serial": serial},
            headers={**headers, "Idempotency-Key": f"{run}-upload"},
        )
        return uploaded.status_code == 202

    async def _serving(self, client: httpx.AsyncClient) -> int | None:
        try:
            view = await client.get("/ops/queue", headers=self.target.ops_headers)
            return int(view.json()["admitted"]) if view.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None


def _wait_gone(process: psutil.Process) -> None:
    try:
        process.wait(timeout=30)
    except psutil.TimeoutExpired:
        process.kill()
    except psutil.Error:
        pass


def _wipe_redis_data(directory: Path) -> None:
    """Delete what a stopped Redis server kept in `directory` (before the supervisor restarts
    it, a second later): it comes back empty."""
    shutil.rmtree(directory / "appendonlydir", ignore_errors=True)  # Redis 7
    for name in ("appendonly.aof", "dump.rdb"):  # Redis 6; a snapshot
        (directory / name).unlink(missing_ok=True)


async def _unfinished_jobs(db: Databases) -> list[str]:
    rows = await db.rows(
        db.stamping,
        "SELECT id::text AS id FROM stamping_jobs WHERE status IN ('queued', 'signing')",
    )
    return [row["id"] for row in rows]


async def live_checks(
    db: Databases, serving: int | None, serving_before: int | None
) -> list[Check]:
    """The invariants that hold at any moment, read right after the system recovered (the
    books in one snapshot: purchases go on meanwhile)."""
    snapshot = db.inventory.execution_options(isolation_level="REPEATABLE READ")
    async with transaction(create_sessionmaker(snapshot)) as session:
        books = await inventory.reconcile(session)
    twice = await db.rows(
        db.stamping,
        "SELECT serial FROM stamping_jobs WHERE status = 'done' GROUP BY serial "
        "HAVING count(*) > 1",
    )
    short = await db.rows(
        db.inventory,
        "SELECT p.id FROM purchases p WHERE p.status = 'paid' AND p.quantity <> "
        "(SELECT count(*) FROM serials s WHERE s.purchase_id = p.id)",
    )
    checks = [
        Check("ledger reconciles", books.ok, "; ".join(books.discrepancies) or "agrees"),
        Check("no serial stamped twice", not twice, f"{len(twice)} stamped twice"),
        Check(
            "paid purchases carry their serials",
            not short,
            f"{len(short)} paid purchases short of serials",
        ),
    ]
    if serving is not None and serving_before is not None:
        checks.append(
            Check(
                "the room's admission counter did not go back",
                serving >= serving_before,
                f"{serving_before} before, {serving} after",
            )
        )
    return checks


@dataclass(frozen=True)
class ClientView:
    """What the crowd saw during one fault's window."""

    requests: int
    outcomes: Counter[Outcome]
    server_errors: Counter[tuple[str, int]]

    @property
    def detail(self) -> str:
        parts = [f"{self.requests:,} requests"]
        parts += [f"{outcome.value} {n:,}" for outcome, n in self.outcomes.most_common()]
        if self.server_errors:
            parts.append(
                "5xx without Retry-After: "
                + ", ".join(
                    f"{step} {status}: {n}" for (step, status), n in self.server_errors.items()
                )
            )
        return "; ".join(parts)


def client_view(records: Records, result: FaultResult) -> ClientView:
    seen = [r for r in records.requests if overlaps(r, result.window)]
    return ClientView(
        requests=len(seen),
        outcomes=Counter(r.outcome for r in seen),
        server_errors=Counter(
            (r.step, r.status) for r in seen if r.outcome is Outcome.server_error
        ),
    )


async def assess(target: Target, records: Records, results: list[FaultResult]) -> None:
    """The checks that need the run to be over, added to each fault's."""
    db = Databases(target)
    try:
        for result in results:
            statuses = await db.rows(
                db.stamping,
                "SELECT status::text AS status, error_code FROM stamping_jobs "
                "WHERE id = ANY(CAST(:ids AS uuid[]))",
                ids=result.in_flight,
            )
            unfinished = [row for row in statuses if row["status"] in ("queued", "signing")]
            unexplained = [
                row for row in statuses if row["status"] == "failed" and not row["error_code"]
            ]
            counted = Counter(row["status"] for row in statuses)
            result.checks.append(
                Check(
                    "jobs in flight at the fault finished",
                    not unfinished and not unexplained and len(statuses) == len(result.in_flight),
                    f"{len(result.in_flight)} in flight: "
                    + ", ".join(f"{status} {n}" for status, n in counted.items()),
                )
            )
            result.checks.append(_numbers_in_order(records, result))
            view = client_view(records, result)
            result.clients = view.detail
            result.checks.append(
                Check(
                    "clients saw only refusals with Retry-After, or retried successfully",
                    not view.server_errors,
                    view.detail,
                )
            )
    finally:
        await db.close()


def _numbers_in_order(records: Records, result: FaultResult) -> Check:
    """Queue numbers given after the fault all follow those given before it."""
    start, end = result.window
    before = [
        a.queue_number
        for a in records.applicants
        if a.queue_number is not None and a.numbered_at is not None and a.numbered_at < start
    ]
    after = [
        a.queue_number
        for a in records.applicants
        if a.queue_number is not None and a.numbered_at is not None and a.numbered_at > end
    ]
    if not before or not after:
        return Check(
            "queue numbers after the fault follow those before",
            True,
            f"{len(before)} numbers before, {len(after)} after: nothing to compare",
        )
    ok = min(after) > max(before)
    return Check(
        "queue numbers after the fault follow those before",
        ok,
        f"{len(before)} given before (up to {max(before)}), {len(after)} after (from {min(after)})",
    )
