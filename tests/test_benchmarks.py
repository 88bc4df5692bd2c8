"""The signing benchmark still runs and measures what it says: a short run of its first part
prints both signers' figures and a signature pdfsig accepts; a small one of its second part
drains every job with 1 and with 2 workers on one stack and prints the figures."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.cpu_quota import cpu_quota, cpu_quota_support

ROOT = Path(__file__).resolve().parent.parent


def test_the_signer_benchmark_prints_both_rates_and_a_valid_signature() -> None:
    output = _benchmark(["--part", "signer", "--rounds", "1", "--seconds", "0.1"], timeout=300)
    size = re.search(r"reference document: ([\d,]+) bytes", output)
    assert size is not None, output
    # Like a CPNS upload: about 800 KB.
    assert 600_000 <= int(size.group(1).replace(",", "")) <= 1_000_000
    median = re.search(
        r"median:\s+StampSigner ([\d.]+) \[[\d.]+\] stamps/s .* x([\d.]+) \[x[\d.]+\] pyHanko's",
        output,
    )
    assert median is not None, output
    # Figures, not goals: speed is for the benchmark to judge, not for a test.
    assert float(median.group(1)) > 0 and float(median.group(2)) > 0, output
    # How fast this machine is, next to the one the goal was set on.
    sign = re.search(r"RSA-2048 signature takes ([\d.]+) ms .* x([\d.]+)\)", output)
    assert sign is not None, output
    assert float(sign.group(1)) > 0 and float(sign.group(2)) > 0, output
    assert "pdfsig on our output: valid, total document signed" in output


@pytest.mark.timeout(600)
def test_the_stack_benchmark_drains_with_one_and_then_two_workers_a_core_each_and_limited() -> None:
    # Enough jobs that the second worker to join the group still finds some (about 2 minutes).
    jobs = 300
    limited = cpu_quota_support() is None
    output = _benchmark(
        ["--part", "stack", "--jobs", str(jobs), "--repeat", "1", "--worker-cpus", "core", "0.5"],
        timeout=540,
    )
    drains = re.findall(
        r"^  ([12]) workers?\s*:\s+([\d.]+) jobs/s .* workers ([\d.]+) ms, rest of the stack"
        r" ([\d.]+) ms",
        output,
        re.M,
    )
    # On one stack, a drain of 1 and one of 2 workers with a core each, then with half a CPU
    # each, every job done.
    assert [workers for workers, *_ in drains] == ["1", "2"] * (2 if limited else 1), output
    assert "FAILED" not in output, output
    for _, rate, worker_ms, rest_ms in drains:
        assert float(rate) > 0 and float(worker_ms) > 0 and float(rest_ms) > 0, output
    ratios = re.findall(r"^  run 1, (.+): 2 workers / 1 worker x([\d.]+)", output, re.M)
    expected = ["a core each", "0.5 CPU each"] if limited else ["a core each"]
    assert [each for each, _ in ratios] == expected, output
    assert all(float(ratio) > 0 for _, ratio in ratios), output
    if limited:
        # The limit holds: the lone worker used at most about half a core (jobs/s times its
        # CPU per job), while the one with a core of its own used more.
        busy = [float(rate) * float(ms) / 1000 for _, rate, ms, _ in drains[::2]]
        assert busy[1] < 0.6 < busy[0], (busy, output)
    else:
        assert "Workers limited in CPU: not measured" in output, output


def _benchmark(arguments: list[str], timeout: float) -> str:
    """Run `python -m benchmarks.stamping` with `arguments`; its output. Should it overrun
    `timeout`, it is interrupted as Ctrl-C would (it stops the stack it started), then
    killed with everything it started."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.stamping", *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the benchmark overran {timeout} s:\n{stdout}\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def test_a_cpu_quota_holds_a_busy_process_to_its_share_and_goes_with_it() -> None:
    unsupported = cpu_quota_support()
    if unsupported is not None:
        pytest.skip(unsupported)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with cpu_quota(spinner.pid, 0.2) as group:
            assert f"/{group.name}\n" in Path(f"/proc/{spinner.pid}/cgroup").read_text()
            before = psutil.Process(spinner.pid).cpu_times()
            time.sleep(1.5)
            after = psutil.Process(spinner.pid).cpu_times()
        # A fifth of a CPU, give or take a period's worth; unlimited it would use a whole one.
        used = (after.user + after.system - before.user - before.system) / 1.5
        assert 0.1 < used < 0.35, used
        # The cgroup is gone, and the process still runs, back where it was.
        assert not group.exists()
        assert group.name not in Path(f"/proc/{spinner.pid}/cgroup").read_text()
        assert spinner.poll() is None
    finally:
        spinner.kill()
        spinner.wait()


def test_a_cpu_quota_clears_what_killed_benchmarks_left_but_not_a_group_in_use() -> None:
    unsupported = cpu_quota_support()
    if unsupported is not None:
        pytest.skip(unsupported)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with cpu_quota(sleeper.pid, 0.5) as in_use:
        root = in_use.parent
        long_ago = time.time() - 3600
        left, recent = root / "meterai-bench-left0000", root / "meterai-bench-recent00"
        left.mkdir()
        recent.mkdir()
        try:
            # A group of a benchmark killed an hour ago, one just made by another benchmark,
            # and one in use that looks old: only the first is removed.
            os.utime(left, (long_ago, long_ago))
            os.utime(in_use, (long_ago, long_ago))
            spinner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            try:
                with cpu_quota(spinner.pid, 0.5):
                    assert not left.exists()
                    assert recent.exists()
                    assert f"/{in_use.name}\n" in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
            finally:
                spinner.kill()
                spinner.wait()
        finally:
            for group in (left, recent):
                if group.exists():
                    group.rmdir()
            sleeper.kill()
            sleeper.wait()
