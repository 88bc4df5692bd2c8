"""After the rush: what the databases say, held against what the clients saw.

Each invariant is a `Check` (a name, whether it holds, and the figures behind it). The stamping
throughput of the run is measured here too, from the jobs' own `finished_at` timestamps.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from meterai.surge.plan import in_sample
from meterai.surge.prepare import Target
from meterai.surge.records import Outcome, Records, Request
from services.inventory import service as inventory
from services.platform.db import create_engine, create_sessionmaker, transaction


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Throughput:
    """Jobs of the run finished per second, from the jobs' `finished_at`."""

    finished_at: list[float] = field(default_factory=list)  # done jobs, sorted
    rate: float = 0.0  # between 10% and 90% of them

    @classmethod
    def of(cls, finished_at: Sequence[float]) -> Throughput:
        times = sorted(finished_at)
        if len(times) < 10:
            return cls(times, 0.0)
        first, last = math.floor(0.1 * len(times)), math.ceil(0.9 * len(times)) - 1
        span = times[last] - times[first]
        return cls(times, (last - first) / span if span > 0 else 0.0)


@dataclass
class Verdict:
    checks: list[Check]
    throughput: Throughput

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


class Databases:
    """The stack's two databases, read with plain SQL (the surge owns none of their tables)."""

    def __init__(self, target: Target) -> None:
        self.inventory: AsyncEngine = create_engine(target.inventory_db, pool_size=2)
        self.stamping: AsyncEngine = create_engine(target.stamping_db, pool_size=2)

    async def close(self) -> None:
        await self.inventory.dispose()
        await self.stamping.dispose()

    async def rows(self, engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with engine.connect() as connection:
            result = await connection.execute(text(sql), params)
            return [dict(row._mapping) for row in result]


def _since(records: Records) -> datetime:
    return datetime.fromtimestamp(records.summary.started - 1, UTC)


async def settle(
    target: Target, records: Records, within: float, say: Callable[[str], None]
) -> None:
    """Wait (at most `within` seconds) until every job accepted since the run began has
    finished and inventory has heard of every stamp it affixed."""
    db = Databases(target)
    deadline = time.monotonic() + within
    last_said = 0.0
    try:
        while True:
            unfinished = await db.rows(
                db.stamping,
                "SELECT count(*) AS n FROM stamping_jobs "
                "WHERE created_at >= :since AND status IN ('queued', 'signing')",
                since=_since(records),
            )
            done = await db.rows(
                db.stamping,
                "SELECT serial FROM stamping_jobs WHERE created_at >= :since AND status = 'done'",
                since=_since(records),
            )
            serials = [row["serial"] for row in done]
            unused = await db.rows(
                db.inventory,
                "SELECT count(*) AS n FROM serials WHERE serial = ANY(:serials) "
                "AND state <> 'used'",
                serials=serials,
            )
            waiting, unheard = int(unfinished[0]["n"]), int(unused[0]["n"])
            if waiting == 0 and unheard == 0:
                return
            now = time.monotonic()
            if now > deadline:
                say(f"still {waiting} jobs unfinished and {unheard} stamps not booked; checking")
                return
            if now - last_said > 10:
                say(f"settling: {waiting} jobs unfinished, {unheard} stamps not yet booked used")
                last_said = now
            await asyncio.sleep(1.0)
    finally:
        await db.close()


async def verify_run(
    target: Target, records: Records, faults: Sequence[tuple[float, float]] = ()
) -> Verdict:
    """Every invariant of the run, and its stamping throughput. During `faults` (windows of
    time a part was down) requests that got no answer and were sent again are expected."""
    db = Databases(target)
    try:
        jobs = await db.rows(
            db.stamping,
            "SELECT id::text AS id, serial, status::text AS status, error_code, output_sha256, "
            "extract(epoch FROM finished_at)::float8 AS finished_at "
            "FROM stamping_jobs WHERE created_at >= :since",
            since=_since(records),
        )
        twice = await db.rows(
            db.stamping,
            "SELECT serial, count(*) AS n FROM stamping_jobs WHERE status = 'done' "
            "GROUP BY serial HAVING count(*) > 1",
        )
        purchase_ids = [a.purchase_id for a in records.applicants if a.purchase_id]
        purchase_ids += records.summary.distributor_purchases
        purchases = await db.rows(
            db.inventory,
            "SELECT id::text AS id, status::text AS status, quantity, payment_reference "
            "FROM purchases WHERE id = ANY(CAST(:ids AS uuid[]))",
            ids=purchase_ids,
        )
        serials = await db.rows(
            db.inventory,
            "SELECT serial, state::text AS state, job_id::text AS job_id, "
            "purchase_id::text AS purchase_id FROM serials "
            "WHERE purchase_id = ANY(CAST(:ids AS uuid[]))",
            ids=purchase_ids,
        )
        references = [p["payment_reference"] for p in purchases if p["payment_reference"]]
        payments = await db.rows(
            db.inventory,
            "SELECT reference, outcome::text AS outcome FROM payment_events "
            "WHERE reference = ANY(:refs)",
            refs=references,
        )
        async with transaction(create_sessionmaker(db.inventory)) as session:
            books = await inventory.reconcile(session)
    finally:
        await db.close()

    by_id = {job["id"]: job for job in jobs}
    checks = [
        _paid_stamps_once(purchases, serials, payments, by_id, twice),
        _jobs_finished(jobs, records),
        Check(
            "The ledger reconciles (meterai reconcile)",
            books.ok,
            "; ".join(books.discrepancies)
            or "ledger, balances and serials agree"
            + (
                f"; {len(books.needs_attention)} payments need an operator"
                if books.needs_attention
                else ""
            ),
        ),
        _queue_numbers_unique(records),
        _downloads_recorded(records, by_id),
        _sample_verified(records),
        _everyone_stamped(records),
        _no_server_errors(records, faults),
    ]
    done = [job["finished_at"] for job in jobs if job["status"] == "done" and job["finished_at"]]
    return Verdict(checks, Throughput.of(done))


def _paid_stamps_once(
    purchases: list[dict[str, Any]],
    serials: list[dict[str, Any]],
    payments: list[dict[str, Any]],
    jobs: dict[str, dict[str, Any]],
    twice: list[dict[str, Any]],
) -> Check:
    paid = {p["id"]: p for p in purchases if p["status"] == "paid"}
    problems: list[str] = []
    stamps = sum(int(p["quantity"]) for p in paid.values())
    of_paid = [s for s in serials if s["purchase_id"] in paid]
    states = Counter(s["state"] for s in of_paid)
    if len(of_paid) != stamps:
        problems.append(f"{stamps} stamps paid for but {len(of_paid)} serials carry them")
    if set(states) - {"sold", "used"}:
        problems.append(f"paid serials in states {dict(states)}")
    for serial in of_paid:
        if serial["state"] != "used":
            continue
        job = jobs.get(serial["job_id"] or "")
        if job is None or job["status"] != "done" or job["serial"] != serial["serial"]:
            problems.append(f"serial {serial['serial']} is used by no done job of its own")
    applied = Counter(p["reference"] for p in payments if p["outcome"] == "applied")
    for purchase in paid.values():
        reference = purchase["payment_reference"]
        if reference is not None and applied[reference] != 1:
            problems.append(f"purchase {purchase['id']}: {applied[reference]} payments applied")
    if twice:
        problems.append(f"{len(twice)} serials stamped by more than one job")
    detail = (
        f"{len(paid)} purchases paid ({sum(applied.values())} by the provider's callbacks), "
        f"{stamps} stamps: {states['used']} affixed by exactly one job, {states['sold']} not "
        f"yet used; no serial stamped twice"
        if not problems
        else "; ".join(problems[:10])
        + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
    )
    return Check("Every paid stamp exists exactly once", not problems, detail)


def _jobs_finished(jobs: list[dict[str, Any]], records: Records) -> Check:
    statuses = Counter(job["status"] for job in jobs)
    failed_codes = Counter(job["error_code"] for job in jobs if job["status"] == "failed")
    known = {a.job_id for a in records.applicants if a.job_id}
    known |= {j.job_id for j in records.jobs if j.job_id}
    missing = known - {j["id"] for j in jobs}
    unexplained = failed_codes.get(None, 0)
    unfinished = statuses["queued"] + statuses["signing"]
    ok = not unfinished and not missing and not unexplained
    detail = f"{len(jobs)} jobs accepted: {statuses['done']} done, {statuses['failed']} failed"
    if failed_codes:
        detail += f" ({', '.join(f'{code}: {n}' for code, n in failed_codes.items())})"
    detail += f", {unfinished} unfinished"
    if missing:
        detail += f"; {len(missing)} jobs the clients were given are not in the database"
    return Check("Every accepted job finished (done, or failed with a reason)", ok, detail)


def _queue_numbers_unique(records: Records) -> Check:
    numbers = [a.queue_number for a in records.applicants if a.queue_number is not None]
    repeated = [n for n, count in Counter(numbers).items() if count > 1]
    ok = not repeated and len(numbers) == len(records.applicants)
    detail = f"{len(numbers)} numbers for {len(records.applicants)} applicants"
    detail += f", {len(repeated)} given twice" if repeated else ", all different"
    if numbers:
        detail += f" ({min(numbers)}..{max(numbers)})"
    return Check("Queue numbers are unique", ok, detail)


def _downloads_recorded(records: Records, jobs: dict[str, dict[str, Any]]) -> Check:
    downloads = [(a.job_id, a.sha256) for a in records.applicants if a.sha256]
    downloads += [(j.job_id, j.sha256) for j in records.jobs if j.sha256]
    wrong = [
        job_id
        for job_id, sha in downloads
        if jobs.get(job_id or "", {}).get("output_sha256") != sha
    ]
    return Check(
        "Every download is the stamped document on record",
        not wrong,
        f"{len(downloads)} downloads, {len(wrong)} differ from the job's recorded sha256",
    )


def _sample_verified(records: Records) -> Check:
    fraction = records.summary.verify_fraction
    sample = [a for a in records.applicants if in_sample(a.index, fraction) and a.sha256]
    verdicts = Counter(a.verdict for a in sample)
    ok = set(verdicts) <= {"valid"}
    detail = f"{len(sample)} downloaded documents sent to POST /api/v1/verify: " + (
        ", ".join(f"{verdict or 'no answer'} {n}" for verdict, n in verdicts.items()) or "none"
    )
    return Check("Sampled stamped documents verify as valid", ok, detail)


def _everyone_stamped(records: Records) -> Check:
    done = sum(1 for a in records.applicants if a.done)
    reasons = Counter(a.failure for a in records.applicants if not a.done)
    batches = [j.failure for j in records.jobs if j.failure]
    ok = done == records.summary.applicants and not batches
    detail = f"{done} of {records.summary.applicants} applicants downloaded their stamp"
    if reasons:
        detail += "; " + "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(5))
    distributor_jobs = sum(1 for j in records.jobs if j.sha256)
    detail += f"; distributors: {distributor_jobs} stamps downloaded, {len(batches)} failures"
    return Check("Every applicant and distributor got their stamps", ok, detail)


def overlaps(request: Request, window: tuple[float, float]) -> bool:
    """Whether the request was under way at some moment of `window` (it may have started
    before a fault and ended, unanswered, because of it)."""
    start, end = window
    return request.at <= end and request.at + request.ms / 1000 >= start


def _no_server_errors(records: Records, faults: Sequence[tuple[float, float]] = ()) -> Check:
    def during_fault(request: Request) -> bool:
        return any(overlaps(request, window) for window in faults)

    unanswered = [r for r in records.requests if r.outcome is Outcome.transport]
    excused = [r for r in unanswered if during_fault(r)]
    bad = Counter(
        (r.step, r.status)
        for r in records.requests
        if r.outcome is Outcome.server_error
        or (r.outcome is Outcome.transport and not during_fault(r))
    )
    shed = sum(1 for r in records.requests if r.status == 503 and r.outcome is Outcome.retried)
    detail = f"{len(records.requests):,} requests; {shed:,} shed with 503 and Retry-After"
    if excused:
        detail += f"; {len(excused):,} unanswered while a part was down, sent again"
    if bad:
        detail += "; " + ", ".join(
            f"{step} {status or 'no answer'}: {n}" for (step, status), n in bad.most_common(8)
        )
    return Check("No 5xx other than shed 503s, and every request answered", not bad, detail)
