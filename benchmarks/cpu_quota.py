"""A CPU limit for a benchmark's process, as a pod's `limits: cpu` sets it: a CFS quota in a
cgroup of its own (cgroup v1's `cpu` controller or cgroup v2's), made for the process and
removed after it. Needs write access to the cgroup file system (root on a plain VM or
machine); :func:`cpu_quota_support` says why not where it is missing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PERIOD_US = 100_000  # the kernel's default CFS period, as Kubernetes uses it

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def _v2_root() -> Path | None:
    controllers = _V2 / "cgroup.controllers"
    subtree = _V2 / "cgroup.subtree_control"
    if not controllers.exists() or "cpu" not in controllers.read_text().split():
        return None
    if "cpu" not in subtree.read_text().split():
        try:
            subtree.write_text("+cpu")
        except OSError:
            return None
    return _V2


def _root() -> tuple[Path, bool]:
    """Where to make the cgroup, and whether it is cgroup v2."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, False
    v2 = _v2_root()
    if v2 is not None:
        return v2, True
    raise OSError("no cgroup CPU controller is mounted (cgroup v1 `cpu` or v2 with `cpu`)")


def cpu_quota_support() -> str | None:
    """None if :func:`cpu_quota` can work here, else why not."""
    try:
        root, _ = _root()
    except OSError as exc:
        return str(exc)
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (CPU limits need root)"
    return None


@contextmanager
def cpu_quota(pid: int, cpus: float) -> Iterator[Path]:
    """Limit process `pid` (its threads too, those it starts later included) to `cpus` CPUs
    of time per CFS period, in a cgroup of its own (yielded), until the block ends; the
    cgroup is removed then (a process still in it goes back to the root cgroup first)."""
    root, v2 = _root()
    group = root / f"meterai-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        quota = max(1000, round(cpus * PERIOD_US))
        if v2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        yield group
    finally:
        for left in (group / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(left)
            except OSError:
                pass  # it exited meanwhile
        group.rmdir()
