"""Reading PDFs from strangers at a bounded cost.

pyHanko parses lazily and in pure Python: a few megabytes of dense objects (a /Kids array of a
million entries) cost seconds of CPU and hundreds of megabytes, and a small compressed stream
can inflate to gigabytes. :class:`BudgetedReader` bounds both: every read of the input and
every object lookup ticks a :class:`CpuBudget`, and streams decode under :data:`DECODE_LIMITS`.
Stamping decodes document structure only (object and xref streams, XMP metadata), never page
content or images, so those limits sit well below pyHanko's defaults for untrusted input.
"""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

from pyhanko.pdf_utils.decode_limits import (
    DEFAULT_PURPOSE_LIMITS,
    DecodeLimits,
    DecodePurpose,
    DocumentDecodeBudget,
    StreamDecodeLimits,
)
from pyhanko.pdf_utils.misc import PdfDecodeLimitError
from pyhanko.pdf_utils.reader import PdfFileReader

__all__ = [
    "DECODE_LIMITS",
    "DEFAULT_CPU_BUDGET_SECONDS",
    "BudgetedReader",
    "CpuBudget",
    "exceeded_limit",
]

DEFAULT_CPU_BUDGET_SECONDS = 3.0
"""CPU time reading one document may take (``StampingSettings.document_cpu_budget_seconds``
sets it for the services); the heaviest ordinary documents measured need about half a second
(5,000 pages, or 30,000 objects in one object stream)."""

_MiB = 1024 * 1024

DECODE_LIMITS = DecodeLimits(
    per_stream=StreamDecodeLimits(max_output_size=64 * _MiB),
    per_purpose={
        **DEFAULT_PURPOSE_LIMITS,
        # Object and xref streams are parsed from memory, where the CPU budget only looks in
        # between: these caps bound one such stretch to about a second. Finding one object in
        # an object stream parses its index up to the object; ordinary object streams hold 100
        # to 200 objects in kilobytes. 2 MiB of xref stream lists 230,000 objects or more.
        DecodePurpose.OBJECT_STREAM: StreamDecodeLimits(
            max_ratio=100, ratio_floor=_MiB, max_output_size=2 * _MiB
        ),
        DecodePurpose.XREF_STREAM: StreamDecodeLimits(max_output_size=2 * _MiB),
        # The signer rewrites XMP metadata; parsing it costs about a hundred times its size in
        # memory and a second per megabyte (ordinary packets are a few kilobytes).
        DecodePurpose.XMP_METADATA: StreamDecodeLimits(
            max_ratio=100, ratio_floor=_MiB, max_output_size=_MiB
        ),
    },
    document_budget=DocumentDecodeBudget(base_allowance=64 * _MiB, max_ratio=10),
)
"""Decompression limits for everything :class:`BudgetedReader` decodes."""


class OverBudget(Exception):
    """Reading the document used up its CPU-time budget."""


class CpuBudget:
    """CPU time the calling thread may spend on one document (other threads' work does not
    count), shared by every reader of that document on that thread.

    Parsing calls :meth:`tick` at every step. Asking for the thread's CPU time is a system
    call (~0.6 us, as much as a parsing step), so a tick reads the cheap wall clock and looks
    at CPU time only every 10 ms.
    """

    _LOOK_EVERY = 0.01

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until = time.thread_time() + seconds
        self.next_look = time.monotonic() + self._LOOK_EVERY
        """When :meth:`tick` next looks at the CPU time (by ``time.monotonic``)."""

    def tick(self) -> None:
        """Raise OverBudget once the thread has used up the budget."""
        if time.monotonic() >= self.next_look:
            self.look()

    def look(self) -> None:
        """Raise OverBudget if the thread has used up the budget (a system call)."""
        self.next_look = time.monotonic() + self._LOOK_EVERY
        if time.thread_time() > self._until:
            raise OverBudget(f"reading the document takes more than {self.seconds:g} s of CPU")


_read_bytes = BytesIO.read


class _BudgetedInput(BytesIO):
    """The document's bytes: parsing an object from the file reads here, a few bytes a time."""

    def __init__(self, pdf: bytes, budget: CpuBudget) -> None:
        super().__init__(pdf)
        self._budget = budget

    def read(self, size: int | None = -1, /) -> bytes:
        # CpuBudget.tick, inlined: pyHanko's parser reads a byte or a token at a time, and
        # the two calls saved here were 14% of opening the benchmark's reference document
        # and finding its last page.
        if time.monotonic() >= self._budget.next_look:
            self._budget.look()
        return _read_bytes(self, size)


class BudgetedReader(PdfFileReader):
    """A pyHanko reader (strict unless told otherwise) under ``budget`` and DECODE_LIMITS.

    Objects inside object streams are parsed from memory, not from the input, so resolving
    any object ticks the budget too; the object stream limit bounds what one lookup costs.
    Use it on the thread that made the budget.
    """

    def __init__(self, pdf: bytes, budget: CpuBudget, *, strict: bool = True) -> None:
        super().__init__(_BudgetedInput(pdf, budget), strict=strict, decode_limits=DECODE_LIMITS)
        self._budget = budget

    def get_object(self, ref: Any, *args: Any, **kwargs: Any) -> Any:
        """Resolve a reference (pyHanko's lookup, after a tick of the budget)."""
        self._budget.tick()
        return super().get_object(ref, *args, **kwargs)  # type: ignore[no-untyped-call]


def exceeded_limit(exc: BaseException) -> str | None:
    """Why ``exc`` means the document exceeds a limit (CPU time, decompressed size, nesting
    depth, memory), or None if it does not. pyHanko wraps some errors, so the cause chain
    counts too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RecursionError):
            return "the document's objects are nested too deeply"
        if isinstance(current, MemoryError):
            return "reading the document needs too much memory"
        if isinstance(current, OverBudget | PdfDecodeLimitError):
            return str(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
