"""What the load process saw, written as plain files and read back for the checks and the
report. Times are Unix seconds, so they line up with the databases' timestamps.

- `requests.csv`: every HTTP request: when it started, by whom (applicant or distributor),
  its step, how long it took, the status (0: no answer) and its outcome;
- `milestones.csv`: when each applicant arrived, was admitted, bought, paid, uploaded, saw
  its stamp, downloaded it (and verified it, for the sample), or gave up;
- `room.csv`: the waiting room as operators see it (`GET /ops/queue`), every second;
- `applicants.jsonl`, `jobs.jsonl`: what each applicant and each distributor upload ended
  with (queue number, purchase, serial, job, sha256 of the download, verdict);
- `summary.json`: the run's start and end, and how the load generator fared.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Outcome(StrEnum):
    ok = "ok"
    # Refused for now, with Retry-After (429 rate limits, 503 shedding): sent again later.
    retried = "retried"
    # An answer the client did not expect (a 4xx it could not act on).
    error = "error"
    # A 5xx that is not a shed 503 with Retry-After: a bug.
    server_error = "server_error"
    # No answer at all (refused connection, timeout, reset).
    transport = "transport"


class Milestone(StrEnum):
    arrived = "arrived"
    admitted = "admitted"
    bought = "bought"
    paid = "paid"
    uploaded = "uploaded"
    stamped = "stamped"
    downloaded = "downloaded"
    verified = "verified"
    gave_up = "gave_up"


@dataclass(frozen=True)
class Request:
    at: float
    actor: str  # "applicant" or "distributor"
    step: str
    ms: float
    status: int
    outcome: Outcome


@dataclass(frozen=True)
class Mark:
    at: float
    who: str
    milestone: Milestone


@dataclass(frozen=True)
class RoomSample:
    at: float
    length: int
    active: int
    admitted: int
    effective_per_minute: float
    measured_per_minute: float
    load_cpu_percent: float  # the load generator's own process


@dataclass
class ApplicantResult:
    index: int
    address: str
    queue_number: int | None = None
    numbered_at: float | None = None  # when the room gave it that number
    purchase_id: str | None = None
    payment_reference: str | None = None
    serial: str | None = None
    job_id: str | None = None
    job_status: str | None = None
    sha256: str | None = None
    verdict: str | None = None
    done: bool = False
    failure: str | None = None


@dataclass
class JobResult:
    distributor: str
    job_id: str
    serial: str | None = None
    job_status: str | None = None
    sha256: str | None = None
    failure: str | None = None


@dataclass
class Summary:
    started: float
    ramp_ended: float = 0.0
    ended: float = 0.0
    applicants: int = 0
    verify_fraction: float = 0.0
    finished: int = 0
    distributor_purchases: list[str] = field(default_factory=list)
    load_cpu_saturated: bool = False
    cpu_seconds: float = 0.0  # the load process's own
    timed_out: bool = False


REQUESTS, MILESTONES, ROOM = "requests.csv", "milestones.csv", "room.csv"
APPLICANTS, JOBS, SUMMARY = "applicants.jsonl", "jobs.jsonl", "summary.json"


class RecordWriter:
    """Appends as the run goes (rows are buffered in memory and written at the end)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[tuple[float, str, str, float, int, str]] = []
        self.marks: list[tuple[float, str, str]] = []
        self.room: list[tuple[float, int, int, int, float, float, float]] = []

    def request(
        self, at: float, actor: str, step: str, ms: float, status: int, outcome: Outcome
    ) -> None:
        self.requests.append((at, actor, step, ms, status, outcome.value))

    def mark(self, at: float, who: str, milestone: Milestone) -> None:
        self.marks.append((at, who, milestone.value))

    def room_sample(self, sample: RoomSample) -> None:
        self.room.append(
            (
                sample.at,
                sample.length,
                sample.active,
                sample.admitted,
                sample.effective_per_minute,
                sample.measured_per_minute,
                sample.load_cpu_percent,
            )
        )

    def write(
        self, applicants: list[ApplicantResult], jobs: list[JobResult], summary: Summary
    ) -> None:
        d = self.directory
        _write_csv(d / REQUESTS, ("at", "actor", "step", "ms", "status", "outcome"), self.requests)
        _write_csv(d / MILESTONES, ("at", "who", "milestone"), self.marks)
        _write_csv(
            d / ROOM,
            (
                "at",
                "length",
                "active",
                "admitted",
                "effective_per_minute",
                "measured_per_minute",
                "load_cpu_percent",
            ),
            self.room,
        )
        _write_jsonl(d / APPLICANTS, [asdict(a) for a in applicants])
        _write_jsonl(d / JOBS, [asdict(j) for j in jobs])
        (d / SUMMARY).write_text(json.dumps(asdict(summary), indent=2))


@dataclass
class Records:
    requests: list[Request]
    marks: list[Mark]
    room: list[RoomSample]
    applicants: list[ApplicantResult]
    jobs: list[JobResult]
    summary: Summary

    @classmethod
    def read(cls, directory: Path) -> Records:
        return cls(
            requests=[
                Request(
                    float(r["at"]),
                    r["actor"],
                    r["step"],
                    float(r["ms"]),
                    int(r["status"]),
                    Outcome(r["outcome"]),
                )
                for r in _read_csv(directory / REQUESTS)
            ],
            marks=[
                Mark(float(r["at"]), r["who"], Milestone(r["milestone"]))
                for r in _read_csv(directory / MILESTONES)
            ],
            room=[
                RoomSample(
                    float(r["at"]),
                    int(r["length"]),
                    int(r["active"]),
                    int(r["admitted"]),
                    float(r["effective_per_minute"]),
                    float(r["measured_per_minute"]),
                    float(r["load_cpu_percent"]),
                )
                for r in _read_csv(directory / ROOM)
            ],
            applicants=[ApplicantResult(**v) for v in _read_jsonl(directory / APPLICANTS)],
            jobs=[JobResult(**v) for v in _read_jsonl(directory / JOBS)],
            summary=Summary(**json.loads((directory / SUMMARY).read_text())),
        )


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
