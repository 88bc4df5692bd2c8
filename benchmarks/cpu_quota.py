"""A CPU limit for a benchmark's process, as a pod's `limits: cpu` sets it: a CFS quota in a
cgroup of its own (cgroup v1's `cpu` controller or cgroup v2's), made for the process and
removed after it (and the groups of earlier benchmarks killed outright, once empty). Needs
write access to the cgroup file system (root on a plain VM or machine);
:func:`cpu_quota_support` says why not where it is missing."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PERIOD_US = 100_000  # the kernel's default CFS period, as Kubernetes uses it

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


_GROUP_PREFIX = "meterai-bench-"
_STALE_SECONDS = 600  # a group this old and empty was left by a benchmark killed outright


def _root() -> tuple[Path, bool]:
    """Where to make the cgroup, and whether it is cgroup v2 (whose root may still have to
    enable the `cpu` controller for its children, see :func:`_enable_v2_cpu`)."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, False
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _V2, True
    raise OSError("no cgroup CPU controller is mounted (cgroup v1 `cpu` or v2 with `cpu`)")


def _v2_cpu_enabled(root: Path) -> bool:
    return "cpu" in (root / "cgroup.subtree_control").read_text().split()


def _enable_v2_cpu(root: Path) -> None:
    if not _v2_cpu_enabled(root):
        (root / "cgroup.subtree_control").write_text("+cpu")


def cpu_quota_support() -> str | None:
    """None if :func:`cpu_quota` can work here, else why not. Changes nothing."""
    try:
        root, v2 = _root()
    except OSError as exc:
        return str(exc)
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (CPU limits need root)"
    subtree = root / "cgroup.subtree_control"
    if v2 and not _v2_cpu_enabled(root) and not os.access(subtree, os.W_OK):
        return f"{subtree} does not enable `cpu` and is not writable"
    return None


def _remove_stale_groups(root: Path) -> None:
    """Remove the empty groups that benchmarks killed outright (SIGKILL) left behind.

    Only old ones: a group another benchmark has just made may not hold its process yet.
    The kernel refuses to remove a group that still holds a process."""
    now = time.time()
    for group in root.glob(f"{_GROUP_PREFIX}*"):
        try:
            if now - group.stat().st_mtime > _STALE_SECONDS:
                group.rmdir()
        except OSError:
            pass  # in use, or gone meanwhile


@contextmanager
def cpu_quota(pid: int, cpus: float) -> Iterator[Path]:
    """Limit process `pid` (its threads too, those it starts later included) to `cpus` CPUs
    of time per CFS period, in a cgroup of its own (yielded), until the block ends; the
    cgroup is removed then (a process still in it goes back to the root cgroup first)."""
    root, v2 = _root()
    if v2:
        _enable_v2_cpu(root)
    _remove_stale_groups(root)
    group = root / f"{_GROUP_PREFIX}{uuid.uuid4().hex[:8]}"
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
