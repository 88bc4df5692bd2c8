"""The report of a surge: PNG charts over time (matplotlib) and one HTML page that shows them
with the figures and the invariants."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from jinja2 import Environment, select_autoescape  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from meterai.surge.checks import Verdict  # noqa: E402
from meterai.surge.cpu import SIGNING, CpuUse  # noqa: E402
from meterai.surge.faults import FaultResult  # noqa: E402
from meterai.surge.records import Milestone, Outcome, Records  # noqa: E402

CHARTS = ("progress.png", "room.png", "throughput.png", "latency.png", "errors.png")
# The stages of an applicant's journey, between two milestones.
STAGES = (
    ("waiting in the room", Milestone.arrived, Milestone.admitted),
    ("buying and paying", Milestone.admitted, Milestone.paid),
    ("upload to stamp", Milestone.uploaded, Milestone.stamped),
    ("arrival to download", Milestone.arrived, Milestone.downloaded),
)
LATENCY_BIN_SECONDS = 5.0


@dataclass(frozen=True)
class StepFigures:
    step: str
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    retried: int
    failed: int


@dataclass(frozen=True)
class Figures:
    """The headline numbers of the run (also printed at the end)."""

    duration_seconds: float
    arrived: int
    admitted: int
    bought: int
    stamped: int
    downloaded: int
    verified: int
    stamping_rate: float
    baseline_rate: float | None
    retried: Counter[int]
    outcomes: Counter[Outcome]
    steps: list[StepFigures]
    stages: list[tuple[str, int, float, float]]  # name, count, p50 s, p99 s
    cpu: CpuUse | None

    @property
    def ratio(self) -> float | None:
        if not self.baseline_rate:
            return None
        return self.stamping_rate / self.baseline_rate


def figures(
    records: Records, verdict: Verdict, baseline: float | None, cpu: CpuUse | None = None
) -> Figures:
    counts = Counter(mark.milestone for mark in records.marks)
    by_step: dict[str, list[float]] = defaultdict(list)
    retried_by_step: Counter[str] = Counter()
    failed_by_step: Counter[str] = Counter()
    retried_statuses: Counter[int] = Counter()
    for request in records.requests:
        if request.outcome is Outcome.ok:
            by_step[request.step].append(request.ms)
        elif request.outcome is Outcome.retried:
            retried_by_step[request.step] += 1
            retried_statuses[request.status] += 1
        else:
            failed_by_step[request.step] += 1
    steps = []
    for step in sorted(set(by_step) | set(retried_by_step) | set(failed_by_step), key=_step_order):
        times = by_step.get(step, [])
        steps.append(
            StepFigures(
                step,
                len(times),
                _percentile(times, 50),
                _percentile(times, 99),
                max(times, default=math.nan),
                retried_by_step[step],
                failed_by_step[step],
            )
        )
    summary = records.summary
    return Figures(
        duration_seconds=summary.ended - summary.started,
        arrived=counts[Milestone.arrived],
        admitted=counts[Milestone.admitted],
        bought=counts[Milestone.bought],
        stamped=counts[Milestone.stamped],
        downloaded=counts[Milestone.downloaded],
        verified=counts[Milestone.verified],
        stamping_rate=verdict.throughput.rate,
        baseline_rate=baseline,
        retried=retried_statuses,
        outcomes=Counter(request.outcome for request in records.requests),
        steps=steps,
        stages=_stages(records),
        cpu=cpu,
    )


_STEP_ORDER = (
    "join",
    "queue status",
    "purchase",
    "pay at the provider",
    "purchase status",
    "upload",
    "stamping status",
    "download",
    "verify",
)


def _step_order(step: str) -> tuple[int, str]:
    return (_STEP_ORDER.index(step) if step in _STEP_ORDER else len(_STEP_ORDER), step)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _stages(records: Records) -> list[tuple[str, int, float, float]]:
    when: dict[str, dict[Milestone, float]] = defaultdict(dict)
    for mark in records.marks:
        when[mark.who].setdefault(mark.milestone, mark.at)
    stages = []
    for name, start, end in STAGES:
        spans = [m[end] - m[start] for m in when.values() if start in m and end in m]
        stages.append((name, len(spans), _percentile(spans, 50), _percentile(spans, 99)))
    return stages


# --- Charts ----------------------------------------------------------------------------------


def _relative(times: Iterable[float], start: float) -> np.ndarray:
    return np.array(sorted(t - start for t in times))


def _cumulative(ax: Axes, times: np.ndarray, label: str) -> None:
    if len(times):
        ax.step(
            np.concatenate(([0.0], times)), np.arange(len(times) + 1), where="post", label=label
        )


def _per_bin(times: np.ndarray, end: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Events per second in bins of `width` seconds, at the bins' centres."""
    edges = np.arange(0.0, max(end, width) + width, width)
    counts, _ = np.histogram(times, bins=edges)
    return edges[:-1] + width / 2, counts / width


def _figure(rows: int = 1, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(rows, 1, figsize=(10, height * rows), sharex=True, squeeze=False)
    return fig, [row[0] for row in axes]


def _save(fig: Figure, path: Path, xlabel: str = "seconds since the first arrival") -> None:
    fig.axes[-1].set_xlabel(xlabel)
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_charts(records: Records, verdict: Verdict, baseline: float | None, out: Path) -> None:
    start = records.summary.started
    end = max(records.summary.ended, *(verdict.throughput.finished_at or [start])) - start
    marks: dict[Milestone, list[float]] = defaultdict(list)
    for mark in records.marks:
        marks[mark.milestone].append(mark.at)

    fig, (ax,) = _figure(height=4.5)
    for milestone in (
        Milestone.arrived,
        Milestone.admitted,
        Milestone.paid,
        Milestone.uploaded,
        Milestone.stamped,
        Milestone.downloaded,
    ):
        _cumulative(ax, _relative(marks[milestone], start), milestone.value)
    _cumulative(ax, _relative(marks[Milestone.gave_up], start), "gave up")
    ax.set_ylabel("applicants (cumulative)")
    ax.set_title("Arrivals, admissions and stamps")
    ax.legend(loc="upper left")
    _save(fig, out / "progress.png")

    fig, (top, bottom) = _figure(2)
    room_t = np.array([s.at - start for s in records.room])
    top.plot(room_t, [s.length for s in records.room], label="waiting (queue length)")
    top.plot(room_t, [s.active for s in records.room], label="active admitted sessions")
    top.set_ylabel("people")
    top.set_title("The waiting room (GET /ops/queue, every second)")
    top.legend(loc="upper left")
    admitted_t, admitted_rate = _per_bin(_relative(marks[Milestone.admitted], start), end, 5.0)
    bottom.plot(admitted_t, 60 * admitted_rate, label="admitted per minute (clients)")
    bottom.plot(
        room_t,
        [s.effective_per_minute for s in records.room],
        label="effective admission rate (closed loop)",
    )
    bottom.set_ylabel("per minute")
    bottom.legend(loc="upper left")
    cpu = bottom.twinx()
    cpu.plot(room_t, [s.load_cpu_percent for s in records.room], color="grey", alpha=0.5)
    cpu.set_ylabel("load generator CPU %", color="grey")
    _save(fig, out / "room.png")

    fig, (ax,) = _figure(height=4.5)
    t, rate = _per_bin(_relative(verdict.throughput.finished_at, start), end, 5.0)
    ax.plot(t, rate, label="jobs finished per second (finished_at)")
    t, rate = _per_bin(_relative(marks[Milestone.uploaded], start), end, 5.0)
    ax.plot(t, rate, label="applicants' uploads accepted per second", alpha=0.7)
    ax.axhline(
        verdict.throughput.rate,
        color="tab:green",
        linestyle="--",
        label=f"surge rate (10%-90%): {verdict.throughput.rate:.1f}/s",
    )
    if baseline:
        ax.axhline(baseline, color="black", linestyle=":", label=f"standalone: {baseline:.1f}/s")
        ax.axhline(0.8 * baseline, color="tab:red", linestyle=":", label="80% of standalone")
    ax.set_ylabel("per second")
    ax.set_title("Stamping throughput")
    ax.legend(loc="upper left")
    _save(fig, out / "throughput.png")

    fig, (p50, p99) = _figure(2)
    by_step: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for request in records.requests:
        if request.outcome is Outcome.ok:
            by_step[request.step].append((request.at - start, request.ms))
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    for number, step in enumerate(sorted(by_step, key=_step_order)):
        points = np.array(by_step[step])
        bins = np.floor(points[:, 0] / LATENCY_BIN_SECONDS)
        centres, medians, tails = [], [], []
        for b in np.unique(bins):
            values = points[bins == b, 1]
            centres.append((b + 0.5) * LATENCY_BIN_SECONDS)
            medians.append(np.percentile(values, 50))
            tails.append(np.percentile(values, 99))
        style: dict[str, Any] = {
            "label": step,
            "color": colours[number % len(colours)],
            "linestyle": "--" if step.startswith("distributor") else "-",
        }
        p50.plot(centres, medians, **style)
        p99.plot(centres, tails, **style)
    for ax, name in ((p50, "p50"), (p99, "p99")):
        ax.set_yscale("log")
        ax.set_ylabel(f"{name} latency, ms")
    p50.set_title(f"Request latency per step ({LATENCY_BIN_SECONDS:.0f} s bins, answered requests)")
    p50.legend(loc="upper left", fontsize="small", ncol=3)
    _save(fig, out / "latency.png")

    fig, (ax,) = _figure(height=4.0)
    kinds: dict[str, list[float]] = defaultdict(list)
    for request in records.requests:
        if request.outcome is Outcome.retried:
            kinds[f"{request.status} (retried after Retry-After)"].append(request.at)
        elif request.outcome is not Outcome.ok:
            kinds[f"{request.outcome.value} {request.status or ''}".strip()].append(request.at)
    for kind, times in sorted(kinds.items()):
        t, rate = _per_bin(_relative(times, start), end, 5.0)
        ax.plot(t, rate, label=f"{kind}: {len(times):,}")
    if not kinds:
        ax.text(0.5, 0.5, "no refusals and no errors", ha="center", transform=ax.transAxes)
        ax.set_xlim(0, end)
    else:
        ax.legend(loc="upper left")
    ax.set_ylabel("per second")
    ax.set_title("Refusals (429, shed 503) and errors")
    _save(fig, out / "errors.png")


# --- The page --------------------------------------------------------------------------------

TEMPLATE = Path(__file__).with_name("report.html")


def write_report(
    records: Records,
    verdict: Verdict,
    figures_: Figures,
    out: Path,
    *,
    gateway: str,
    ramp_seconds: float,
    curve: str,
    distributors: int,
    faults: Sequence[FaultResult] = (),
) -> Path:
    """Draw the charts and write `index.html` next to them; returns the page's path."""
    draw_charts(records, verdict, figures_.baseline_rate, out)
    environment = Environment(autoescape=select_autoescape(default=True))
    page = environment.from_string(TEMPLATE.read_text())
    html = page.render(
        when=datetime.fromtimestamp(records.summary.started).strftime("%Y-%m-%d %H:%M:%S"),
        gateway=gateway,
        applicants=records.summary.applicants,
        ramp=f"{ramp_seconds:g}",
        curve=curve,
        distributors=distributors,
        passed=verdict.ok,
        checks=verdict.checks,
        f=figures_,
        retried=", ".join(f"{status}: {n:,}" for status, n in sorted(figures_.retried.items())),
        outcomes=", ".join(f"{o.value}: {n:,}" for o, n in figures_.outcomes.most_common()),
        saturated=records.summary.load_cpu_saturated,
        cpu_rows=_cpu_rows(figures_.cpu, records.summary.applicants),
        signing_share=figures_.cpu.share(SIGNING) if figures_.cpu else None,
        charts=CHARTS,
        faults=[_fault_row(fault, records) for fault in faults],
    )
    path = out / "index.html"
    path.write_text(html)
    return path


def _cpu_rows(cpu: CpuUse | None, applicants: int) -> list[tuple[str, float, float, float]]:
    """Per part: CPU seconds, ms per applicant, share of the machine's CPU."""
    if cpu is None:
        return []
    return [
        (role, seconds, 1000 * seconds / max(1, applicants), cpu.share(role))
        for role, seconds in sorted(cpu.seconds.items(), key=lambda item: -item[1])
    ]


def _fault_row(fault: FaultResult, records: Records) -> dict[str, Any]:
    return {
        "what": fault.what,
        "at": fault.at - records.summary.started,
        "back": fault.back_after,
        "recovered": fault.recovered_after,
        "waited_for": fault.waited_for,
        "ok": fault.ok,
        "clients": fault.clients,
        "checks": fault.checks,
    }
