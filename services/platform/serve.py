"""Run a service app under uvicorn with Meterai's logging (not uvicorn's own config).

`python -m services.platform.serve services.inventory.app:create_app --port 8002`
"""

from __future__ import annotations

import argparse
import signal
from types import FrameType

import uvicorn

from services.platform.stopping import stop_requested

KEEP_ALIVE_SECONDS = 75
# uvicorn's fast parts, named rather than "auto": a missing wheel must fail the start, not
# halve the throughput (the tests' servers and the benchmarks' floor are served the same way).
LOOP = "uvloop"
HTTP = "httptools"


def main(argv: list[str] | None = None) -> None:
    """Serve the app built by the given factory until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="Run a Meterai service.")
    parser.add_argument("factory", help="module:function returning the ASGI app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--graceful-seconds", type=float, default=10.0, help="time to finish open requests"
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
    _Server(config).run()


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Loops that take work (signing workers) stop taking it now, not at lifespan shutdown.
        stop_requested()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # Also what SIGTERM does before uvicorn installs its own handler: stop, right away.
    raise SystemExit(0)


if __name__ == "__main__":
    main()
