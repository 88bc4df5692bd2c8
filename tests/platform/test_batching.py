"""The coalescer: concurrent calls share a batch, results go back to the right callers, and a
failing batch fails only its own callers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.platform.batching import Coalescer


class Recorder:
    """A batch function that doubles its items and remembers every batch it ran."""

    def __init__(self, *, delay: float = 0.01, fail_when: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_when = fail_when

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_when is not None and self.fail_when in items:
            raise LookupError(f"batch with {self.fail_when} failed")
        return [item * 2 for item in items]


async def test_a_lone_call_runs_at_once() -> None:
    recorder = Recorder(delay=0)
    coalescer = Coalescer(recorder, max_batch=64, max_in_flight=1)
    assert await coalescer.submit(21) == 42
    assert recorder.batches == [[21]]


async def test_calls_arriving_while_a_batch_runs_share_the_next_one() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch=64, max_in_flight=1)
    results = await asyncio.gather(*(coalescer.submit(item) for item in range(10)))
    assert results == [item * 2 for item in range(10)]
    assert recorder.batches == [[0], list(range(1, 10))]


async def test_batches_are_capped_and_run_in_parallel_up_to_the_limit() -> None:
    """A batch starts beside a running one only when a whole batch is waiting; the rest wait
    for a batch to finish and go together."""
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch=4, max_in_flight=2)
    results = await asyncio.gather(*(coalescer.submit(item) for item in range(11)))
    assert results == [item * 2 for item in range(11)]
    assert [len(batch) for batch in recorder.batches] == [1, 4, 4, 2]
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(11))


async def test_a_failing_batch_fails_only_its_callers() -> None:
    recorder = Recorder(fail_when=0)
    coalescer = Coalescer(recorder, max_batch=64, max_in_flight=1)
    results = await asyncio.gather(
        *(coalescer.submit(item) for item in range(5)), return_exceptions=True
    )
    assert isinstance(results[0], LookupError)
    assert results[1:] == [2, 4, 6, 8]
    # And the coalescer carries on.
    assert await coalescer.submit(7) == 14


async def test_a_wrong_number_of_results_is_an_error_for_the_callers() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return list(items)[1:]

    coalescer = Coalescer(short)
    with pytest.raises(RuntimeError, match="returned 0 results"):
        await coalescer.submit(1)


async def test_a_cancelled_caller_does_not_cancel_its_batch() -> None:
    recorder = Recorder(delay=0.05)
    coalescer = Coalescer(recorder, max_batch=64, max_in_flight=1)
    first = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)
    impatient = asyncio.create_task(coalescer.submit(2))
    patient = asyncio.create_task(coalescer.submit(3))
    await asyncio.sleep(0)
    impatient.cancel()
    assert await first == 2
    assert await patient == 6
    with pytest.raises(asyncio.CancelledError):
        await impatient
    # The cancelled caller's item still ran, as a request already sent would.
    assert recorder.batches == [[1], [2, 3]]


async def test_drain_waits_for_running_batches() -> None:
    recorder = Recorder(delay=0.05)
    coalescer = Coalescer(recorder, max_batch=2, max_in_flight=1)
    tasks = [asyncio.create_task(coalescer.submit(item)) for item in range(5)]
    await asyncio.sleep(0)
    await coalescer.drain()
    assert all(task.done() for task in tasks)
    assert coalescer.waiting == 0
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(5))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Recorder(), max_in_flight=0)
