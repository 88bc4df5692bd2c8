"""Run a service app under uvicorn with Meterai's logging (not uvicorn's own config).

`python -m services.platform.serve services.inventory.app:create_app --port 8002`
"""

from __future__ import annotations

import argparse

import uvicorn

KEEP_ALIVE_SECONDS = 75


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
    uvicorn.run(
        args.factory,
        factory=True,
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


if __name__ == "__main__":
    main()
