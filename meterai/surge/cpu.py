"""Where the machine's CPU went during a surge: each part of the stack, the simulated crowd,
the payment provider, and everything else on the machine.

Only for a stack running on this machine (`meterai up`, whose process tree is known from its
stack file): on a few cores the crowd, the services and the signing workers share the same
CPUs, and the figures say how much of them signing got.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

SIGNING = "signing workers"
# Command-line markers of the stack's processes (see meterai.stack), in order of precedence.
_ROLES = (
    (SIGNING, "services.stamping.worker:"),
    ("stamping API", "services.stamping.app:"),
    ("gateway", "services.gateway.app:"),
    ("queue", "services.queue.app:"),
    ("inventory", "services.inventory.app:"),
    ("payment provider (simulated)", "meterai.paysim"),
    ("PostgreSQL", "postgres"),
    ("Redis", "redis-server"),
    ("Kafka broker", "tansu"),
)


def _role(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "other"
    for role, marker in _ROLES:
        if marker in command:
            return role
    return "other"


def _seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:  # exited meanwhile
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class CpuSnapshot:
    by_role: dict[str, float]
    machine: float  # busy CPU seconds of the whole machine

    @classmethod
    def take(cls, *roots: int) -> CpuSnapshot:
        """CPU seconds so far of the processes under `roots` (a stack's `meterai up`, say, and
        this surge's helpers), by part of the stack."""
        by_role: dict[str, float] = {}
        for root in roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for process in children:
                role = _role(process)
                by_role[role] = by_role.get(role, 0.0) + _seconds(process)
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return cls(by_role, float(busy))

    def since(self, earlier: CpuSnapshot) -> dict[str, float]:
        """CPU seconds each part used from `earlier` to this snapshot (all of it for processes
        started meanwhile)."""
        return {
            role: seconds - earlier.by_role.get(role, 0.0) for role, seconds in self.by_role.items()
        }


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds per part over the run (the crowd's own process reported separately)."""

    seconds: dict[str, float]
    wall_seconds: float
    cores: int

    @classmethod
    def between(
        cls, before: CpuSnapshot, after: CpuSnapshot, crowd_seconds: float, wall_seconds: float
    ) -> CpuUse:
        seconds = {role: value for role, value in after.since(before).items() if value > 0.05}
        seconds["simulated crowd (Locust)"] = crowd_seconds
        accounted = sum(seconds.values())
        seconds["everything else on the machine"] = max(
            0.0, after.machine - before.machine - accounted
        )
        return cls(seconds, wall_seconds, psutil.cpu_count() or 1)

    @property
    def capacity(self) -> float:
        """CPU seconds the machine had over the run."""
        return self.wall_seconds * self.cores

    def share(self, role: str) -> float:
        return self.seconds.get(role, 0.0) / self.capacity if self.capacity else 0.0
