"""A small process supervisor: start groups of processes in order, wait until each is ready,
restart what crashes (with backoff) and stop everything in reverse order, leaving nothing behind.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the supervisor,
which then stops them in a safe order; a parent-death signal stops them even if the supervisor
itself is killed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pwd
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

ReadyCheck = Callable[[], Awaitable[object]]
Announce = Callable[[str], None]

_PR_SET_PDEATHSIG = 1
_MAX_BACKOFF = 30.0


@dataclass
class ProcessSpec:
    """How to run one process and how to tell that it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    user: str | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 20.0
    ready: ReadyCheck | None = None
    ready_timeout: float = 60.0
    restart: bool = True
    log_path: Path | None = None
    # Runs after every start once the process is ready (e.g. recreate a broker's topics).
    on_ready: ReadyCheck | None = None


def _die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    def preexec() -> None:
        # Linux only; elsewhere the supervisor's own shutdown path is the only guarantee.
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
        except (OSError, AttributeError):
            pass

    return preexec


def run_as(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments that drop to `user` with that user's own group only.

    Setting only the uid would keep root's groups, and group permission bits then apply.
    """
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _open_log(path: Path) -> BinaryIO:
    # Opening a local file is quick; the child inherits the descriptor and writes to it.
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # noqa: SIM115 - closed by the caller once the child has it


class ManagedProcess:
    """One child process with its restart bookkeeping."""

    def __init__(self, spec: ProcessSpec, announce: Announce) -> None:
        self.spec = spec
        self.announce = announce
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self._backoff = 1.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Spawn the process (its output appended to its log file)."""
        spec = self.spec
        env = {**os.environ, **spec.env}
        log = _open_log(spec.log_path) if spec.log_path is not None else None
        try:
            self.process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=env,
                cwd=spec.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log or asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                **run_as(spec.user),
                preexec_fn=_die_with_parent(spec.stop_signal),  # noqa: PLW1509
            )
        finally:
            if log is not None:
                log.close()
        self.started_at = time.monotonic()

    async def wait_ready(self) -> None:
        """Poll the ready check until it passes; fail if the process exits or time runs out."""
        check = self.spec.ready
        if check is None:
            if self.spec.on_ready is not None:
                await self.spec.on_ready()
            return
        deadline = time.monotonic() + self.spec.ready_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with code {self.returncode} while starting"
                    f"{self._log_hint()}"
                )
            try:
                await check()
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last_error = exc
                await asyncio.sleep(0.2)
                continue
            if self.spec.on_ready is not None:
                await self.spec.on_ready()
            return
        raise TimeoutError(
            f"{self.spec.name} was not ready after {self.spec.ready_timeout:.0f}s "
            f"({last_error!r}){self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f"; see {self.spec.log_path}" if self.spec.log_path else ""

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def stop(self) -> None:
        """Ask the process to stop; kill its whole process group after `stop_timeout`."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        try:
            process.send_signal(self.spec.stop_signal)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(process.wait(), self.spec.stop_timeout)
        except TimeoutError:
            self.announce(
                f"{self.spec.name} did not stop in {self.spec.stop_timeout:.0f}s; killing"
            )
        self._kill_group(process.pid)
        await process.wait()

    @staticmethod
    def _kill_group(pgid: int) -> None:
        # Also reaps grandchildren (e.g. PostgreSQL backends) left in the child's session.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def next_backoff(self) -> float:
        """Seconds to wait before a restart: doubles while it keeps crashing, resets after a
        minute of healthy running."""
        if time.monotonic() - self.started_at > 60:
            self._backoff = 1.0
        delay = self._backoff
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
        return delay


class Supervisor:
    """Starts groups in order (each group concurrently), restarts crashes, stops in reverse."""

    def __init__(self, announce: Announce) -> None:
        self.announce = announce
        self.groups: list[list[ManagedProcess]] = []
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()

    def processes(self) -> list[ManagedProcess]:
        return [process for group in self.groups for process in group]

    def find(self, name: str) -> ManagedProcess:
        """The managed process called `name`."""
        for process in self.processes():
            if process.spec.name == name:
                return process
        raise KeyError(name)

    async def start_group(self, specs: Sequence[ProcessSpec]) -> None:
        """Start `specs` together and return when all are ready."""
        group = [ManagedProcess(spec, self.announce) for spec in specs]
        self.groups.append(group)
        for process in group:
            await process.start()
        await asyncio.gather(*(process.wait_ready() for process in group))
        for process in group:
            self.announce(f"{process.spec.name} ready (pid {process.pid})")
            task = asyncio.create_task(self._watch(process), name=f"watch-{process.spec.name}")
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _watch(self, process: ManagedProcess) -> None:
        while not self._stopping:
            assert process.process is not None  # noqa: S101 - started before being watched
            code = await process.process.wait()
            if self._stopping:
                return
            if not process.spec.restart:
                self.announce(f"{process.spec.name} exited with code {code}")
                return
            delay = process.next_backoff()
            self.announce(
                f"{process.spec.name} exited with code {code}; restarting in {delay:.0f}s"
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            process.restarts += 1
            await process.start()
            try:
                await process.wait_ready()
                self.announce(f"{process.spec.name} ready again (pid {process.pid})")
            except (RuntimeError, TimeoutError) as exc:
                self.announce(str(exc))

    async def stop(self) -> None:
        """Stop every group, last started first."""
        self._stopping = True
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for group in reversed(self.groups):
            await asyncio.gather(*(process.stop() for process in group))
            for process in group:
                if process.returncode is not None:
                    self.announce(f"{process.spec.name} stopped")
