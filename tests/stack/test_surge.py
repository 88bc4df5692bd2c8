"""`meterai surge` against `meterai up`: a reduced deadline rush (300 applicants over 15 s,
two distributors, two signing workers) holds every invariant, exits 0 and writes a report with
charts; one whose applicants are never admitted exits 1 and says which invariant failed; and a
rush during which every part of the stack is killed or restarted in turn (issue 8) loses
nothing, with each part serving again within 30 s of coming back.

What the surge claims is checked again here from outside: the books (`meterai reconcile`),
the jobs in the stamping database, and the records the load wrote."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pytest
from PIL import Image

from meterai.surge.report import CHARTS
from services.platform.embedded import free_port_range
from tests.stack.running import RunningStack, clean_env, meterai, meterai_up

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

APPLICANTS, DISTRIBUTORS, BATCH, BATCHES = 300, 2, 10, 2
INVARIANTS = 8


@pytest.fixture(scope="module")
async def up() -> AsyncIterator[tuple[Path, RunningStack]]:
    """One `meterai up` with two signing workers for the module (its data outside pytest's
    temporary folders, which another pytest session on the machine may prune)."""
    root = Path(tempfile.mkdtemp(prefix="meterai-test-surge-"))
    try:
        async with meterai_up(root / "data", free_port_range(40), workers=2) as running:
            yield root / "data", running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def surge(
    data_dir: Path, report: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meterai",
            "--data-dir",
            str(data_dir),
            "surge",
            "--report",
            str(report),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


def plotted_pixels(path: Path) -> int:
    """Pixels of a colour (the plotted lines; axes, text and background are grey)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum())


async def stamping_jobs(data_dir: Path) -> dict[str, int]:
    env = json.loads((data_dir / "stack.json").read_text())["env"]
    connection = await asyncpg.connect(env["METERAI_STAMPING_DATABASE_URL"])
    try:
        rows = await connection.fetch(
            "SELECT status::text AS status, count(*) AS n FROM stamping_jobs GROUP BY status"
        )
    finally:
        await connection.close()
    return {row["status"]: row["n"] for row in rows}


async def test_a_reduced_surge_holds_every_invariant_and_writes_its_report(
    up: tuple[Path, RunningStack], tmp_path: Path
) -> None:
    data_dir, running = up
    report = tmp_path / "report"
    result = await asyncio.to_thread(
        surge,
        data_dir,
        report,
        *("--applicants", str(APPLICANTS), "--over", "15"),
        *("--distributors", str(DISTRIBUTORS), "--batch-size", str(BATCH)),
        *("--batches", str(BATCHES), "--batch-interval", "5"),
        *("--verify-fraction", "0.02", "--admit-per-minute", "3000", "--max-minutes", "3"),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # Live progress, a line every few seconds.
    progress = re.findall(r"^\[\s*(\d+) s\] arrived\s+([\d,]+)", result.stdout, re.M)
    assert len(progress) >= 3, result.stdout
    assert progress[-1][1].replace(",", "") == str(APPLICANTS)

    verdict = json.loads((report / "verdict.json").read_text())
    assert [c for c in verdict["checks"] if not c["ok"]] == []
    assert verdict["passed"] and len(verdict["checks"]) == INVARIANTS
    assert verdict["downloaded"] == APPLICANTS
    assert verdict["stamping_jobs_per_second"] > 0

    # From outside: the books agree, and every job of the run is done.
    books = await asyncio.to_thread(meterai, data_dir, "reconcile")
    assert books.returncode == 0, books.stdout + books.stderr
    assert await stamping_jobs(data_dir) == {"done": APPLICANTS + DISTRIBUTORS * BATCH * BATCHES}
    applicants = [
        json.loads(line)
        for line in (report / "records" / "applicants.jsonl").read_text().splitlines()
    ]
    assert len(applicants) == APPLICANTS and all(a["done"] for a in applicants)
    numbers = [a["queue_number"] for a in applicants]
    assert len(set(numbers)) == APPLICANTS
    assert [a["verdict"] for a in applicants if a["verdict"]] == ["valid"] * 6

    # The report: the page, and charts with something drawn on them.
    page = (report / "index.html").read_text()
    assert "PASSED" in page and "Every paid stamp exists exactly once" in page
    for chart in CHARTS:
        assert f'src="{chart}"' in page
        with Image.open(report / chart) as image:
            assert image.format == "PNG" and image.width >= 800 and image.height >= 300
    for chart in ("progress.png", "room.png", "throughput.png", "latency.png"):
        assert plotted_pixels(report / chart) > 2_000, chart


async def test_a_surge_whose_applicants_are_never_admitted_fails(
    up: tuple[Path, RunningStack], tmp_path: Path
) -> None:
    data_dir, running = up
    async with httpx.AsyncClient(base_url=running.gateway, timeout=10) as client:
        token = json.loads((data_dir / "stack.json").read_text())["env"][
            "METERAI_GATEWAY_OPS_TOKEN"
        ]
        ops = {"Authorization": f"Bearer {token}"}
        rate = (await client.get("/ops/queue", headers=ops)).json()["admit_per_minute"]
        report = tmp_path / "report"
        result = await asyncio.to_thread(
            surge,
            data_dir,
            report,
            *("--applicants", "10", "--over", "1", "--distributors", "0"),
            *("--admit-per-minute", "0", "--max-minutes", "0.25", "--settle-seconds", "2"),
        )
        assert result.returncode == 1, result.stdout + result.stderr
        verdict = json.loads((report / "verdict.json").read_text())
        failed = [c["name"] for c in verdict["checks"] if not c["ok"]]
        assert failed == ["Every applicant and distributor got their stamps"]
        assert "0 of 10 applicants downloaded their stamp" in result.stdout
        assert "FAILED" in (report / "index.html").read_text()
        # The operator's admission rate is given back.
        assert (await client.get("/ops/queue", headers=ops)).json()["admit_per_minute"] == rate


FAULTS = [
    "worker",
    "stamping",
    "inventory",
    "queue",
    "gateway",
    "broker",
    "postgres",
    "redis",
    "redis-lost",
]
FAULT_APPLICANTS = 400


@pytest.mark.timeout(480)
async def test_every_part_killed_during_a_surge_loses_nothing_and_recovers_within_30_s(
    up: tuple[Path, RunningStack], tmp_path: Path
) -> None:
    data_dir, running = up
    report = tmp_path / "report"
    before = await stamping_jobs(data_dir)
    result = await asyncio.to_thread(
        surge,
        data_dir,
        report,
        *("--applicants", str(FAULT_APPLICANTS), "--over", "150"),
        *("--distributors", "2", "--batch-size", "10", "--batches", "3"),
        *("--batch-interval", "40", "--admit-per-minute", "3000", "--max-minutes", "6"),
        *("--faults", "all", "--fault-first-after", "8", "--fault-gap", "3"),
        timeout=420,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    verdict = json.loads((report / "verdict.json").read_text())
    assert [c for c in verdict["checks"] if not c["ok"]] == []
    faults = verdict["faults"]
    assert [fault["part"] for fault in faults] == FAULTS
    for fault in faults:
        assert fault["ok"], fault
        assert fault["back_after_seconds"] is not None, fault
        assert 0 <= fault["recovered_after_seconds"] <= 30, fault
        checks = {check["name"]: check for check in fault["checks"]}
        assert all(check["ok"] for check in checks.values()), fault
        # During the rush: the crowd was there to see each fault.
        seen = checks["clients saw only refusals with Retry-After, or retried successfully"]
        assert not seen["detail"].startswith("0 requests"), fault
    # Killing the gateway, the crowd's connections were refused and sent again; killing the
    # stamping API, uploads were shed or refused with Retry-After: both seen, neither a 5xx.
    clients = {fault["part"]: fault["checks"][-1]["detail"] for fault in faults}
    assert "transport" in clients["gateway"], clients
    assert "5xx" not in " ".join(clients.values()), clients
    assert verdict["downloaded"] == FAULT_APPLICANTS

    # From outside: the books agree, and every job of the run is done.
    books = await asyncio.to_thread(meterai, data_dir, "reconcile")
    assert books.returncode == 0, books.stdout + books.stderr
    after = await stamping_jobs(data_dir)
    stamped = FAULT_APPLICANTS + 2 * 10 * 3 + len(FAULTS)  # applicants, batches, canaries
    assert after == {"done": before.get("done", 0) + stamped}, (before, after)

    page = (report / "index.html").read_text()
    assert "<h2>Faults</h2>" in page
    assert page.count("SIGKILL") >= 8 and "restart PostgreSQL" in page
    # Redis came back empty once: the room was rebuilt, numbers jumped ahead, none given twice.
    lost = faults[-1]["checks"]
    (order,) = [c for c in lost if c["name"] == "queue numbers after the fault follow those before"]
    assert order["ok"], order
    # The stack is whole again: every service and its dependencies report ok.
    async with httpx.AsyncClient(base_url=running.gateway, timeout=10) as client:
        health = await client.get("/healthz")
    assert health.status_code == 200, health.text
