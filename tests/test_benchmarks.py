"""The signing benchmark still runs and measures what it says: a short run of its first part
prints both signers' figures and a signature pdfsig accepts; a small one of its second part
drains every job with 1 and with 2 workers on one stack and prints the figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_signer_benchmark_prints_both_rates_and_a_valid_signature() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.stamping", "--part", "signer"]
        + ["--rounds", "1", "--seconds", "0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout
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
    assert "pdfsig on our output: valid, total document signed" in output


@pytest.mark.timeout(900)
def test_the_stack_benchmark_drains_with_one_and_then_two_workers_on_one_stack() -> None:
    # Enough jobs that the second worker to join the group still finds some (about 2 minutes).
    jobs = 400
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.stamping", "--part", "stack"]
        + ["--jobs", str(jobs), "--repeat", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    drains = re.findall(
        r"^  ([12]) workers?\s*:\s+([\d.]+) jobs/s .* workers ([\d.]+) ms, rest of the stack"
        r" ([\d.]+) ms",
        output,
        re.M,
    )
    # Two runs on one stack, each drain of 1 and of 2 workers with every job done.
    assert [workers for workers, *_ in drains] == ["1", "2", "1", "2"], output
    assert "FAILED" not in output, output
    for _, rate, worker_ms, rest_ms in drains:
        assert float(rate) > 0 and float(worker_ms) > 0 and float(rest_ms) > 0, output
    ratios = re.findall(r"run \d: 2 workers / 1 worker x([\d.]+)", output)
    assert len(ratios) == 2 and all(float(ratio) > 0 for ratio in ratios), output
    assert re.search(r"median 2 workers / 1 worker: x[\d.]+", output), output
