"""Where a leaked asyncio stream was opened.

A `StreamWriter` that is never closed is reported by the garbage collector ("unclosed
<StreamWriter ...>", an error under the suite's warning filter), long after the fact and in
whichever test happens to be running then. Tracemalloc would tell where it was made, but slows
the whole suite several times over. This records just that, for streams only: the test that was
running and the few frames that opened the stream, shown in the writer's repr and so in the
warning.
"""

from __future__ import annotations

import asyncio
import os
import traceback
from typing import Any

_ORIGIN = "_meterai_opened_in"


def trace_stream_writers() -> None:
    """Make every `asyncio.StreamWriter` remember where it was opened (idempotent)."""
    writer = asyncio.StreamWriter
    if getattr(writer, "_meterai_traced", False):
        return
    init, describe = writer.__init__, writer.__repr__

    def __init__(self: asyncio.StreamWriter, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        frames = traceback.extract_stack(limit=20)[:-1]
        setattr(self, _ORIGIN, (os.environ.get("PYTEST_CURRENT_TEST", "no test"), frames))

    def __repr__(self: asyncio.StreamWriter) -> str:
        origin = getattr(self, _ORIGIN, None)
        if origin is None:
            return describe(self)
        test, frames = origin
        opened = " <- ".join(
            f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno} {frame.name}"
            for frame in reversed(frames)
        )
        return f"{describe(self)} opened during {test} at {opened}"

    writer.__init__ = __init__  # type: ignore[method-assign]
    writer.__repr__ = __repr__  # type: ignore[method-assign]
    writer._meterai_traced = True  # type: ignore[attr-defined]
