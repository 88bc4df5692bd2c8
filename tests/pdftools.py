"""Independent validators (poppler's pdfsig, qpdf): they must agree with pyHanko."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PdfsigReport:
    output: str

    @property
    def signatures(self) -> int:
        return self.output.count("Signature #")

    @property
    def all_valid(self) -> bool:
        return (
            self.signatures > 0
            and self.output.count("Signature Validation: Signature is Valid.") == self.signatures
        )

    @property
    def total_document_signed(self) -> bool:
        return "Total document signed" in self.output


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (apt-get install poppler-utils qpdf)")
    return path


def pdfsig(path: Path) -> PdfsigReport:
    result = subprocess.run(
        [require("pdfsig"), str(path)], capture_output=True, text=True, timeout=60
    )
    return PdfsigReport(result.stdout + result.stderr)


def qpdf_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("qpdf"), "--check", str(path)], capture_output=True, text=True, timeout=60
    )
