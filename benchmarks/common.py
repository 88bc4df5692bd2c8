"""Shared pieces of the benchmarks: a running `meterai up`, wrk, and the hello-world floor.

Benchmarks print figures; they do not pass or fail. Each compares against a FastAPI
hello-world endpoint measured in the same run on the same machine, because absolute numbers
drift from machine to machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.platform.embedded import free_port_range

ROOT = Path(__file__).resolve().parents[1]

HELLO_APP = textwrap.dedent(
    """
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    def create_app() -> FastAPI:
        return app
    """
)


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: str

    def line(self, label: str) -> str:
        return (
            f"{label:34} {self.requests_per_second:9,.0f} req/s   p50 {self.p50_ms:7.1f} ms"
            f"   p99 {self.p99_ms:7.1f} ms   non-2xx {self.non_2xx}{self.errors}"
        )


def free_base_port(span: int = 40) -> int:
    return free_port_range(span, start=23000)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit("wrk is needed: apt-get install wrk")
    return path


_LATENCY = re.compile(r"^\s+(50|99)\.000%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(
    url: str,
    *,
    connections: int = 64,
    seconds: int = 10,
    threads: int = 2,
    script: str | None = None,
) -> WrkResult:
    """Run wrk against `url` and parse throughput, latency percentiles and failures."""
    command = [
        require_wrk(),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        url,
    ]
    with tempfile.TemporaryDirectory() as scratch:
        if script is not None:
            path = Path(scratch) / "script.lua"
            path.write_text(script)
            command[1:1] = ["-s", str(path)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    percentiles = {match[0]: _ms(match[1], match[2]) for match in _LATENCY.findall(output)}
    if not percentiles:
        # wrk prints the plain distribution without --latency detail for tiny runs.
        dist = re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", output, re.MULTILINE)
        percentiles = {match[0]: _ms(match[1], match[2]) for match in dist}
    return WrkResult(
        requests_per_second=rate,
        p50_ms=percentiles.get("50", float("nan")),
        p99_ms=percentiles.get("99", float("nan")),
        requests=total,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=f"   socket errors: {errors.group(1)}" if errors else "",
    )


@contextmanager
def hello_world() -> Iterator[str]:
    """The floor: FastAPI's hello world in one uvicorn process, configured like our services."""
    port = free_base_port(1)
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "hello_app.py").write_text(HELLO_APP)
        # Served exactly as the services are (services.platform.serve: the same uvicorn
        # settings, event loop, HTTP parser and garbage collection), only the app differs.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.platform.serve",
                "hello_app:create_app",
                "--port",
                str(port),
            ],
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), scratch])},
        )
        try:
            url = f"http://127.0.0.1:{port}/hello"
            wait_ok(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(10)


def wait_ok(url: str, process: subprocess.Popen[bytes], within: float = 90) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up")


@dataclass
class Stack:
    data_dir: Path
    gateway: str
    env: dict[str, str]
    base_port: int

    @property
    def queue(self) -> str:
        """The waiting room's own address (`meterai up` puts it next to the gateway)."""
        return f"http://127.0.0.1:{self.base_port + 1}"

    def meterai(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "meterai", "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
        )
        return result.stdout


@contextmanager
def meterai_up(workers: int = 0, settings: dict[str, str] | None = None) -> Iterator[Stack]:
    """`meterai up` in a scratch data directory, on free ports, stopped afterwards; `settings`
    are environment variables for every process (e.g. METERAI_STAMPING_WORKER_CONCURRENCY)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERAI_")}
    env["METERAI_LOG_LEVEL"] = "WARNING"
    env.update(settings or {})
    base = free_base_port()
    with tempfile.TemporaryDirectory(prefix="meterai-bench-") as scratch:
        data_dir = Path(scratch) / "data"
        log = open(Path(scratch) / "up.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterai",
                "--data-dir",
                str(data_dir),
                "up",
                "--workers",
                str(workers),
                "--base-port",
                str(base),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            gateway = f"http://127.0.0.1:{base}"
            deadline = time.monotonic() + 180
            # `up` writes stack.json once every process is ready.
            while not (data_dir / "stack.json").exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(scratch) / "up.log").read_text())
                time.sleep(0.3)
            yield Stack(data_dir, gateway, env, base)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(120)
            log.close()


def json_body(value: object) -> str:
    return json.dumps(value).replace('"', '\\"')
