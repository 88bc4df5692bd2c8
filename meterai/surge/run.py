"""`meterai surge` from start to verdict: prepare, rush, settle, check, report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from meterai.surge.checks import settle, verify_run
from meterai.surge.cpu import SIGNING, CpuSnapshot, CpuUse
from meterai.surge.document import reference_document
from meterai.surge.faults import Injector, assess, parse_faults
from meterai.surge.plan import Plan
from meterai.surge.prepare import (
    SurgeError,
    Target,
    check_health,
    create_distributors,
    ensure_serials,
    payment_provider,
    room,
    set_room,
)
from meterai.surge.records import Records
from meterai.surge.report import figures, write_report
from services.queue.config import QueueSettings
from services.stamping.config import StampingSettings


@dataclass(frozen=True)
class SurgeOptions:
    gateway: str
    report_dir: Path
    applicants: int = 20_000
    ramp_seconds: float = 60.0
    curve: str = "linear"
    distributors: int = 3
    batch_size: int = 20
    batches: int = 3
    batch_interval_seconds: float = 15.0
    verify_fraction: float = 0.02
    admit_per_minute: int | None = None
    max_active: int | None = None
    baseline: float | None = None
    max_seconds: float = 1800.0
    drain_seconds: float = 300.0
    connections: int = 2048
    stack_pid: int | None = None  # a local `meterai up`: its CPU use is reported
    faults: str | None = None  # "all", or part names with commas (see meterai.surge.faults)
    fault_first_after: float = 15.0
    fault_gap: float = 10.0


def _cpu_snapshot(options: SurgeOptions) -> CpuSnapshot | None:
    if options.stack_pid is None:
        return None
    return CpuSnapshot.take(options.stack_pid, os.getpid())


def _injector(
    target: Target, options: SurgeOptions, run_id: str, say: Callable[[str], None]
) -> Injector:
    """The fault injector for a local `meterai up`, with a canary distributor of its own."""
    if options.stack_pid is None:
        raise SurgeError("faults are injected only into a local `meterai up` (no --gateway)")
    parts = parse_faults(options.faults or "")
    (canary,) = asyncio.run(create_distributors(target, 1, len(parts), f"{run_id}-canary"))
    injector = Injector(
        target,
        options.stack_pid,
        parts,
        canary,
        first_after=options.fault_first_after,
        gap=options.fault_gap,
        say=say,
        redis_url=QueueSettings().redis_url,
        kafka_bootstrap=StampingSettings().kafka_bootstrap_servers,
    )
    injector.check_parts()
    return injector


async def _restore_room(target: Target, settings: dict[str, Any]) -> None:
    """Put the room back as it was (retried: a fault may have just ended)."""
    for attempt in range(10):
        try:
            await set_room(target, **settings)
            return
        except (SurgeError, httpx.HTTPError):
            if attempt == 9:
                raise
            await asyncio.sleep(1.0)


def run_surge(options: SurgeOptions, say: Callable[[str], None]) -> int:
    """Run the surge; 0 if every invariant held and no server error was seen, else 1."""
    target = Target.from_environment(options.gateway)
    asyncio.run(check_health(target))
    before = asyncio.run(room(target))
    if before["paused"]:
        raise SurgeError("the room is paused: resume it first (PATCH /ops/queue {paused: false})")
    out = options.report_dir
    (out / "records").mkdir(parents=True, exist_ok=True)
    run_id = datetime.now().strftime("%Y%m%d%H%M%S")
    accounts = asyncio.run(
        create_distributors(
            target, options.distributors, options.batches * options.batch_size, run_id
        )
    )
    distributor_stamps = options.distributors * options.batches * options.batch_size
    injector = None
    if options.faults:
        injector = _injector(target, options, run_id, say)
        distributor_stamps += len(injector.parts)
    minted = asyncio.run(ensure_serials(target, options.applicants + distributor_stamps))
    if minted:
        say(f"minted {minted:,} serials")
    changes: dict[str, Any] = {}
    if options.admit_per_minute is not None:
        changes["admit_per_minute"] = options.admit_per_minute
    if options.max_active is not None:
        changes["max_active"] = options.max_active
    view = asyncio.run(set_room(target, **changes)) if changes else before
    if view["max_active"] < options.applicants:
        say(
            f"note: the room admits at most {view['max_active']:,} active sessions; later "
            "applicants wait for sessions to end (--max-active raises it for the run)"
        )
    say(
        f"surge: {options.applicants:,} applicants over {options.ramp_seconds:g} s "
        f"({options.curve}), {options.distributors} distributors; room admits "
        f"{view['admit_per_minute']:,}/min; report in {out}"
    )
    cpu_before = cpu_after = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="meterai-surge-") as private,
            payment_provider(target, out / "paysim.log") as paysim,
        ):
            document = Path(private) / "reference.pdf"
            document.write_bytes(reference_document())
            plan = Plan(
                gateway=target.gateway,
                paysim=paysim,
                ops_token=target.ops_token,
                document=str(document),
                out_dir=str(out / "records"),
                applicants=options.applicants,
                ramp_seconds=options.ramp_seconds,
                curve=options.curve,
                distributors=accounts,
                batch_size=options.batch_size,
                batches=options.batches,
                batch_interval_seconds=options.batch_interval_seconds,
                verify_fraction=options.verify_fraction,
                max_seconds=options.max_seconds,
                connections=options.connections,
            )
            plan_path = Path(private) / "plan.json"
            plan.write(plan_path)
            cpu_before = _cpu_snapshot(options)
            if injector is not None:
                injector.start()
            try:
                load = subprocess.run(  # noqa: S603 - our own module, with fixed arguments
                    [sys.executable, "-m", "meterai.surge.load", str(plan_path)], check=False
                )
            finally:
                if injector is not None:
                    injector.stop()  # a fault under way is seen through; no new one starts
            if load.returncode != 0:
                raise SurgeError(f"the load process failed (exit {load.returncode})")
            cpu_after = _cpu_snapshot(options)
    finally:
        if changes:
            asyncio.run(_restore_room(target, {name: before[name] for name in changes}))
    records = Records.read(out / "records")
    cpu = None
    if cpu_before is not None and cpu_after is not None:
        wall = records.summary.ended - records.summary.started
        cpu = CpuUse.between(cpu_before, cpu_after, records.summary.cpu_seconds, wall)
    say("load over; waiting for the last jobs and bookings to settle")
    asyncio.run(settle(target, records, options.drain_seconds, say))
    faults = injector.results if injector is not None else []
    verdict = asyncio.run(verify_run(target, records, faults=[f.window for f in faults]))
    if injector is not None:
        asyncio.run(assess(target, records, faults))
        verdict.checks.append(injector.verdict())
    numbers = figures(records, verdict, options.baseline, cpu)
    page = write_report(
        records,
        verdict,
        numbers,
        out,
        gateway=target.gateway,
        ramp_seconds=options.ramp_seconds,
        curve=options.curve,
        distributors=options.distributors,
        faults=faults,
    )
    ratio = f" = {100 * numbers.ratio:.0f}% of standalone" if numbers.ratio is not None else ""
    if cpu is not None:
        ratio += f"; signing had {100 * cpu.share(SIGNING):.0f}% of the machine's CPU"
    say(
        f"{numbers.downloaded:,} of {options.applicants:,} applicants stamped in "
        f"{numbers.duration_seconds:.0f} s; stamping {numbers.stamping_rate:.1f} jobs/s{ratio}"
    )
    for check in verdict.checks:
        say(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    (out / "verdict.json").write_text(
        json.dumps(
            {
                "passed": verdict.ok,
                "checks": [asdict(check) for check in verdict.checks],
                "stamping_jobs_per_second": numbers.stamping_rate,
                "baseline_jobs_per_second": numbers.baseline_rate,
                "ratio_to_baseline": numbers.ratio,
                "duration_seconds": numbers.duration_seconds,
                "applicants": options.applicants,
                "downloaded": numbers.downloaded,
                "steps": [asdict(step) for step in numbers.steps],
                "cpu_seconds": cpu.seconds if cpu else None,
                "signing_share_of_machine": cpu.share(SIGNING) if cpu else None,
                "faults": [fault.as_dict() for fault in faults],
            },
            indent=2,
        )
    )
    say(f"report: {page}")
    return 0 if verdict.ok else 1
