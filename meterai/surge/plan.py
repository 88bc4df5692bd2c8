"""What a surge simulates: who arrives when, what they do, and where the stack is.

The plan is written to a private file (it carries API keys and the operations token) that the
load process reads; both sides use this module, which imports neither gevent nor asyncio.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

CURVES = ("linear", "accelerating", "burst")


def arrived_fraction(curve: str, elapsed: float, ramp_seconds: float) -> float:
    """The share of all applicants that has arrived `elapsed` seconds into the ramp.

    - `linear`: a steady stream;
    - `accelerating`: the stream grows as the deadline nears (the arrival rate rises linearly
      from zero to twice the average);
    - `burst`: half of everyone in the first tenth of the ramp (the sale opens), the rest
      steadily.
    """
    if ramp_seconds <= 0 or elapsed >= ramp_seconds:
        return 1.0
    x = max(0.0, elapsed / ramp_seconds)
    if curve == "linear":
        return x
    if curve == "accelerating":
        return x * x
    if curve == "burst":
        return 5 * x if x < 0.1 else 0.5 + 0.5 * (x - 0.1) / 0.9
    raise ValueError(f"unknown arrival curve {curve!r}; one of {', '.join(CURVES)}")


def arrivals_by(curve: str, elapsed: float, ramp_seconds: float, applicants: int) -> int:
    """How many applicants have arrived `elapsed` seconds into the ramp."""
    return min(applicants, math.floor(applicants * arrived_fraction(curve, elapsed, ramp_seconds)))


@dataclass(frozen=True)
class DistributorAccount:
    name: str
    api_key: str


@dataclass
class Plan:
    """Everything the load process needs (times in seconds)."""

    gateway: str
    paysim: str
    ops_token: str
    document: str  # the reference PDF every applicant uploads
    out_dir: str  # where the load process writes its records
    applicants: int
    ramp_seconds: float
    curve: str = "linear"
    distributors: list[DistributorAccount] = field(default_factory=list)
    batch_size: int = 20
    batches: int = 3
    batch_interval_seconds: float = 15.0
    verify_fraction: float = 0.02
    max_seconds: float = 1800.0  # the load stops here, finished or not
    progress_seconds: float = 5.0
    connections: int = 2048
    # The page's own timings (services/queue/static/beli.js).
    purchase_poll_seconds: float = 4.0
    job_poll_seconds: float = 2.0
    seed: int = 2024

    def write(self, path: Path) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self), handle, indent=2)

    @classmethod
    def read(cls, path: Path) -> Plan:
        values = json.loads(path.read_text())
        values["distributors"] = [DistributorAccount(**d) for d in values["distributors"]]
        return cls(**values)

    @property
    def distributor_stamps(self) -> int:
        return len(self.distributors) * self.batches * self.batch_size


def applicant_address(index: int) -> str:
    """The address applicant `index` calls from (sent as X-Forwarded-For, as the load balancer
    in front of the gateway would): one each, in 10.0.0.0/8."""
    number = index + 1
    return f"10.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"


def in_sample(index: int, fraction: float) -> bool:
    """Whether applicant `index` verifies its stamp: every 1/fraction-th, spread evenly."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)
