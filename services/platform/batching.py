"""Coalesce concurrent calls into batches: many requests, one database round trip.

While a batch is in flight, new submissions wait and go together in the next one, so under
light load every call runs at once on its own (no timer, no added latency) and under a surge
the batches grow by themselves: the classic group commit. One failing batch fails only its
own callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs ``run(items)`` for the items submitted concurrently; ``run`` returns one result
    per item, in order.

    At most ``max_in_flight`` batches run at once, each with at most ``max_batch`` items; a
    second one starts while another runs only when a whole batch is waiting. A
    caller that is cancelled does not cancel its batch (its item may still take effect, as a
    request already sent to a server would).
    """

    def __init__(
        self,
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Items submitted but not yet in a running batch."""
        return len(self._waiting)

    async def submit(self, item: T) -> R:
        """Run ``item`` in the next batch and return its result (or raise its batch's error)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._launch()
        return await future

    async def drain(self) -> None:
        """Wait until every submitted item has run (for shutdown)."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _launch(self) -> None:
        # Another batch starts beside a running one only with a full batch waiting: a tiny
        # batch running beside a big one costs a round trip (and a commit) for almost nothing,
        # and when both need the same row (one distributor's balance) it only waits for the
        # first, while the next arrivals wait for it. Measured on purchases: 2,000 to 2,400/s.
        while (
            self._waiting
            and len(self._in_flight) < self._max_in_flight
            and (not self._in_flight or len(self._waiting) >= self._max_batch)
        ):
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            task = asyncio.create_task(self._execute(batch), name="coalescer-batch")
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._launch()

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
