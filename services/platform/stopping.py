"""The process was asked to stop (SIGTERM, SIGINT): tell the loops that take work.

The server reaches an app's lifespan shutdown only after it stopped listening and closed its
connections; a loop that takes work from a queue must stop taking it as soon as the signal
arrives, and use the grace period to finish what it has. `services.platform.serve` calls
`stop_requested()` from its signal handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

_listeners: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []


def on_stop_requested(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` in the running event loop when the process is asked to stop; returns
    a function that unregisters it."""
    entry = (asyncio.get_running_loop(), callback)
    _listeners.append(entry)

    def unregister() -> None:
        if entry in _listeners:
            _listeners.remove(entry)

    return unregister


def stop_requested() -> None:
    """Notify every listener (safe to call from a signal handler)."""
    for loop, callback in list(_listeners):
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback)
