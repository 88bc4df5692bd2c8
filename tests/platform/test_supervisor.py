"""The process supervisor with real child processes: readiness, restarts, stopping, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs installed
import pytest

from services.platform.supervisor import ProcessSpec, Supervisor
from tests.harness import ROOT, wait_for


def living(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie awaiting its reaper has already died)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def process_group(pgid: int) -> list[int]:
    """The living processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return living(members)


async def group_gone(pgid: int, children: list[int]) -> None:
    """Wait until the group's leader, its children and the whole group are gone. Orphans got
    SIGKILL from the group kill, but stop() does not wait for them to finish dying: on a busy
    machine one can still be running when it returns."""

    async def gone() -> bool:
        return living([pgid, *children]) == [] and process_group(pgid) == []

    await wait_for(gone, within=2, interval=0.01)


class Recorder:
    """The supervisor's announcements, with the monotonic time of each."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.times: list[float] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.times.append(time.monotonic())

    def time_of(self, fragment: str) -> float:
        return next(t for t, m in zip(self.times, self.messages, strict=True) if fragment in m)

    def any(self, fragment: str) -> bool:
        return any(fragment in message for message in self.messages)


@pytest.fixture
def announced() -> Recorder:
    return Recorder()


@pytest.fixture
async def supervisor(announced: Recorder) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(announced)
    try:
        yield supervisor
    finally:
        try:
            await stop(supervisor)
        finally:
            # Even if stop() failed, leave none of this test's children behind.
            for process in supervisor.processes():
                if process.pid is not None and process_group(process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)


async def stop(supervisor: Supervisor) -> None:
    """`supervisor.stop()`, bounded: a hang is a failure, not a stuck test run."""
    await asyncio.wait_for(supervisor.stop(), timeout=10)


def pid_of(supervisor: Supervisor, name: str) -> int:
    pid = supervisor.find(name).pid
    assert pid is not None
    return pid


async def test_start_group_returns_once_the_ready_check_passes(
    supervisor: Supervisor, announced: Recorder, tmp_path: Path
) -> None:
    flag = tmp_path / "ready.flag"
    calls = 0

    async def ready() -> None:
        nonlocal calls
        calls += 1
        if not flag.exists():
            raise FileNotFoundError(flag)

    spec = ProcessSpec(
        name="slow-starter",
        argv=["sh", "-c", 'sleep 0.5; touch "$0"; exec sleep 1000', str(flag)],
        ready=ready,
        ready_timeout=10,
    )
    clock = asyncio.get_running_loop()
    started = clock.time()
    await supervisor.start_group([spec])
    assert clock.time() - started >= 0.5
    assert flag.exists()
    assert calls >= 2
    pid = pid_of(supervisor, "slow-starter")
    assert living([pid]) == [pid]
    assert announced.any(f"slow-starter ready (pid {pid})")


async def test_children_get_their_environment_cwd_and_log_file(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "greeter.log"
    spec = ProcessSpec(
        name="greeter",
        argv=["sh", "-c", 'echo "hello $GREETING from $(pwd)"; echo oops >&2; exec sleep 1000'],
        env={"GREETING": "meterai"},
        cwd=tmp_path,
        log_path=log,
    )
    await supervisor.start_group([spec])

    async def logged() -> bool:
        return log.exists() and "oops" in log.read_text()

    await wait_for(logged, within=5, interval=0.05)
    assert log.read_text().splitlines() == [f"hello meterai from {tmp_path}", "oops"]


async def test_a_process_that_exits_is_restarted_with_backoff_and_on_ready_each_time(
    supervisor: Supervisor, announced: Recorder
) -> None:
    ready_at: list[float] = []
    one_shot_ready = 0

    async def ready() -> None:
        return None

    async def on_ready() -> None:
        ready_at.append(time.monotonic())

    async def one_shot_on_ready() -> None:
        nonlocal one_shot_ready
        one_shot_ready += 1

    crasher = ProcessSpec(
        name="crasher",
        argv=["sh", "-c", "sleep 0.2; exit 3"],
        ready=ready,
        on_ready=on_ready,
    )
    one_shot = ProcessSpec(
        name="one-shot", argv=["sh", "-c", "exit 4"], restart=False, on_ready=one_shot_on_ready
    )
    await supervisor.start_group([crasher, one_shot])
    first_pid = pid_of(supervisor, "crasher")

    async def restarted_twice() -> bool:
        return len(ready_at) >= 3

    await wait_for(restarted_twice, within=15, interval=0.05)
    process = supervisor.find("crasher")
    assert process.restarts >= 2
    assert process.pid != first_pid
    # The supervisor waits 1 s after the first exit, then 2 s after the second.
    first_exit = announced.time_of("crasher exited with code 3; restarting in 1s")
    second_exit = announced.time_of("crasher exited with code 3; restarting in 2s")
    assert ready_at[0] < first_exit < ready_at[1] < second_exit < ready_at[2]
    assert ready_at[1] - first_exit >= 1.0
    assert ready_at[2] - second_exit >= 2.0
    assert announced.any("crasher ready again")
    # restart=False: reported, never restarted.
    assert announced.any("one-shot exited with code 4")
    assert supervisor.find("one-shot").restarts == 0
    assert one_shot_ready == 1


async def test_stop_kills_the_whole_process_group_after_the_stop_timeout(
    supervisor: Supervisor, announced: Recorder
) -> None:
    async def has_a_child() -> None:
        if not psutil.Process(pid_of(supervisor, "stubborn")).children():
            raise RuntimeError("no child yet")

    spec = ProcessSpec(
        name="stubborn",
        argv=["sh", "-c", 'trap "" TERM; sleep 1000 & wait'],
        stop_timeout=0.5,
        ready=has_a_child,
    )
    await supervisor.start_group([spec])
    pid = pid_of(supervisor, "stubborn")
    children = [child.pid for child in psutil.Process(pid).children(recursive=True)]
    assert children
    assert os.getpgid(pid) == pid  # its own session and group
    assert sorted(process_group(pid)) == sorted([pid, *children])
    clock = asyncio.get_running_loop()
    started = clock.time()
    await stop(supervisor)
    elapsed = clock.time() - started
    assert 0.5 <= elapsed < 3
    assert announced.any("stubborn did not stop in")
    assert supervisor.find("stubborn").returncode == -signal.SIGKILL
    await group_gone(pid, children)


async def test_stop_also_kills_children_left_behind_by_a_process_that_stopped(
    supervisor: Supervisor, announced: Recorder
) -> None:
    async def has_a_child() -> None:
        if not psutil.Process(pid_of(supervisor, "parent")).children():
            raise RuntimeError("no child yet")

    spec = ProcessSpec(
        name="parent", argv=["sh", "-c", "sleep 1000 & wait"], stop_timeout=5, ready=has_a_child
    )
    await supervisor.start_group([spec])
    pid = pid_of(supervisor, "parent")
    children = [child.pid for child in psutil.Process(pid).children()]
    clock = asyncio.get_running_loop()
    started = clock.time()
    await stop(supervisor)
    assert clock.time() - started < 2  # it obeyed SIGTERM: no waiting for the timeout
    assert not announced.any("did not stop")
    assert announced.any("parent stopped")
    assert supervisor.find("parent").returncode == -signal.SIGTERM

    await group_gone(pid, children)


async def test_groups_stop_in_reverse_order(supervisor: Supervisor, announced: Recorder) -> None:
    await supervisor.start_group([ProcessSpec(name="database", argv=["sleep", "1000"])])
    await supervisor.start_group([ProcessSpec(name="service", argv=["sleep", "1000"])])
    await stop(supervisor)
    stopped = [message for message in announced.messages if message.endswith(" stopped")]
    assert stopped == ["service stopped", "database stopped"]


PARENT = """
import asyncio
from services.platform.supervisor import ProcessSpec, Supervisor

async def main() -> None:
    supervisor = Supervisor(lambda message: None)
    await supervisor.start_group([ProcessSpec(name="sleeper", argv=["sleep", "1000"])])
    print(supervisor.find("sleeper").pid, flush=True)
    await asyncio.sleep(1000)

asyncio.run(main())
"""


async def test_a_child_dies_when_its_supervisor_is_killed() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    sleeper = 0
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), timeout=20)
        sleeper = int(line)
        assert living([sleeper]) == [sleeper]
        assert psutil.Process(sleeper).ppid() == parent.pid
        parent.kill()  # SIGKILL: the supervisor gets no chance to stop anything itself
        await parent.wait()

        async def sleeper_gone() -> bool:
            return living([sleeper]) == []

        await wait_for(sleeper_gone, within=5, interval=0.05)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if sleeper and living([sleeper]):
            os.kill(sleeper, signal.SIGKILL)


async def test_a_process_never_ready_raises_timeout_error_pointing_at_its_log(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    async def never() -> None:
        raise ConnectionRefusedError("port closed")

    log = tmp_path / "logs" / "hopeless.log"
    spec = ProcessSpec(
        name="hopeless", argv=["sleep", "1000"], ready=never, ready_timeout=0.5, log_path=log
    )
    clock = asyncio.get_running_loop()
    started = clock.time()
    with pytest.raises(TimeoutError) as raised:
        await supervisor.start_group([spec])
    assert 0.5 <= clock.time() - started < 3
    message = str(raised.value)
    assert message.startswith("hopeless was not ready after")
    assert "ConnectionRefusedError('port closed')" in message
    assert message.endswith(f"; see {log}")
    pid = pid_of(supervisor, "hopeless")
    await stop(supervisor)  # the caller's cleanup still reaches the half-started process
    assert living([pid]) == []


async def test_a_process_that_exits_while_starting_raises_with_its_exit_code(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    async def never() -> None:
        raise ConnectionRefusedError

    log = tmp_path / "broken.log"
    spec = ProcessSpec(
        name="broken",
        argv=["sh", "-c", "echo 'bad config'; exit 7"],
        ready=never,
        ready_timeout=10,
        log_path=log,
    )
    with pytest.raises(RuntimeError, match=r"broken exited with code 7 while starting; see "):
        await supervisor.start_group([spec])
    assert log.read_text() == "bad config\n"
