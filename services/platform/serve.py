"""Run a service app under uvicorn with Meterai's logging (not uvicorn's own config).

`python -m services.platform.serve services.inventory.app:create_app --port 8002`
"""

from __future__ import annotations

import argparse
import gc
import signal
import socket
from types import FrameType

import uvicorn

from services.platform.stopping import stop_requested

KEEP_ALIVE_SECONDS = 75
# uvicorn's fast parts, named rather than "auto": a missing wheel must fail the start, not
# halve the throughput (the tests' servers and the benchmarks' floor are served the same way).
LOOP = "uvloop"
HTTP = "httptools"
# CPython collects its youngest generation every 700 allocations of container objects; a
# request allocates hundreds (headers, a pydantic model, a SQLAlchemy row...), so a busy
# service collected every request or two, each time also walking whatever survived. Once
# started, a service collects every GC_THRESHOLD allocations instead, and first moves what
# startup built (modules, routes, models, pools: long-lived, hundreds of thousands of objects)
# out of the collector's sight with `gc.freeze()`, so that older-generation collections do not
# walk it again and again. Measured on purchases through the gateway: 3,100-3,600 purchases/s
# with p99 of 83-99 ms before, 3,700-4,400/s with p99 of 28-34 ms after (docs/operations.md F4).
GC_THRESHOLD = 10_000


def main(argv: list[str] | None = None) -> None:
    """Serve the app built by the given factory until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="Run a Meterai service.")
    parser.add_argument("factory", help="module:function returning the ASGI app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--graceful-seconds", type=float, default=10.0, help="time to finish open requests"
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=GC_THRESHOLD,
        help="allocations between collections of the youngest generation, once started",
    )
    args = parser.parse_args(argv)
    # uvicorn raises the stop signal again once it has shut down cleanly, so that the process
    # dies of it (exit status 143); for process managers a clean stop on SIGTERM is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn.Config(
        args.factory,
        factory=True,
        loop=LOOP,
        http=HTTP,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(args.graceful_seconds),
        # Longer than any client's idle keep-alive (the gateway's is 30 s): the side that closes
        # idle connections must be the client, or a request can race the server's close.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    _Server(config, gc_threshold=args.gc_threshold).run()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, gc_threshold: int) -> None:
        super().__init__(config)
        self.gc_threshold = gc_threshold

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # After the app's lifespan startup: what it built lives as long as the process.
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(self.gc_threshold, older, oldest)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Loops that take work (signing workers) stop taking it now, not at lifespan shutdown.
        stop_requested()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # Also what SIGTERM does before uvicorn installs its own handler: stop, right away.
    raise SystemExit(0)


if __name__ == "__main__":
    main()
