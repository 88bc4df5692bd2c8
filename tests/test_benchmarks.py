"""The signing benchmark still runs and measures what it says: a short run of its first part
(the one that needs no stack) prints both signers' figures and a signature pdfsig accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
