"""`meterai up` as a subprocess, for the whole-stack tests: start it, wait for health, run CLI
commands against it, stop it leaving nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil

from tests.harness import wait_for


def spawn_up(
    data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `meterai up` in the background, its output going to `log`."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "meterai", "--data-dir", str(data_dir), "up", *args],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**clean_env(), **(env or {})},
        )


def meterai(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `meterai` CLI command against the stack in `data_dir`."""
    return subprocess.run(
        [sys.executable, "-m", "meterai", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def clean_env() -> dict[str, str]:
    # The stack under test must use its own embedded servers, whatever the caller's shell says.
    return {name: value for name, value in os.environ.items() if not name.startswith("METERAI_")}


class RunningStack:
    def __init__(self, process: subprocess.Popen[bytes], gateway: str, log: Path) -> None:
        self.process = process
        self.gateway = gateway
        self.log = log

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


@asynccontextmanager
async def meterai_up(
    data_dir: Path, base_port: int, workers: int = 2, env: dict[str, str] | None = None
) -> AsyncIterator[RunningStack]:
    """`meterai up` on `base_port`, yielded once the gateway reports the system healthy."""
    log = data_dir.parent / f"up-{base_port}-{os.urandom(3).hex()}.log"
    process = spawn_up(
        data_dir, log, "--workers", str(workers), "--base-port", str(base_port), env=env
    )
    stack = RunningStack(process, f"http://127.0.0.1:{base_port}", log)
    try:
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=5) as client:

            async def healthy() -> dict[str, object] | None:
                if process.poll() is not None:
                    raise AssertionError(f"meterai up exited early:\n{log.read_text()}")
                try:
                    response = await client.get("/healthz")
                except httpx.TransportError:
                    return None
                body: dict[str, object] = response.json()
                return body if response.status_code == 200 else None

            await wait_for(healthy, within=120, interval=0.5)
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(process.wait, 90)
            except subprocess.TimeoutExpired:
                for child in stack.descendants():
                    child.kill()
                process.kill()
                raise
