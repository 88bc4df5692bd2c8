"""Run a service app under uvicorn with Meterai's logging (not uvicorn's own config).

`python -m services.platform.serve services.inventory.app:create_app --port 8002`
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import socket
from collections.abc import Awaitable
from types import FrameType
from typing import Any, cast

import uvicorn
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from services.platform.direct import Answer, DirectAnswerer
from services.platform.stopping import stop_requested

KEEP_ALIVE_SECONDS = 75
# Writes held back for the next one (see `CoalescingTransport`) are at most this big.
HOLD_BELOW_BYTES = 16 * 1024


class CoalescingTransport:
    """A connection's transport on which a small write waits for the next one, at most until
    the event loop's current turn ends, and the two leave in one system call.

    uvicorn writes a response's head and its body separately: two system calls per response,
    and two wake-ups of the client, where one would do. On the waiting room's status poll they
    were about a fifth of the service's CPU. A write is never held longer than the loop turn
    in which it was made, and never more than one small one.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))  # one writev
        elif len(data) < HOLD_BELOW_BYTES:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (reading, flow control, addresses) is the transport's own.
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a `CoalescingTransport`, and answering
    the app's direct routes itself (see `services.platform.direct`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._answerer = _direct_answerer(self.app)
        # The message being parsed is the direct lane's, answered "now" or "later": uvicorn's
        # callbacks skip it.
        self._direct_message: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        answerer = self._answerer
        method = self.parser.get_method()
        if (
            answerer is not None
            and (method, self.url) in answerer.direct_routes
            and self._direct_ok()
        ):
            scope = cast("Scope", self.scope)  # uvicorn's TypedDict: an ASGI scope
            scope["method"] = method.decode("ascii")
            scope["path"] = self.url.decode("ascii")
            scope["raw_path"] = self.url
            scope["query_string"] = b""
            answer = answerer.answer_directly(scope)
            if isinstance(answer, Answer):
                self._direct_message = "now"
                self.transport.write(self._response(answer))
                return
            if answer is not None:
                self._direct_message = "later"
                self._answer_later(answer)
                return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._direct_message is None:  # a direct request has no body
            super().on_body(body)

    def on_message_complete(self) -> None:
        direct, self._direct_message = self._direct_message, None
        if direct is None:
            super().on_message_complete()
        elif direct == "now":
            self.on_response_complete()  # keep-alive, flow control, as after any response

    def _direct_ok(self) -> bool:
        """Whether this request may be answered directly: no body, keep-alive HTTP/1.1, no
        earlier request of the connection still being answered (answers keep their order),
        and the server under its concurrency limit, if it has one."""
        parser = self.parser
        if parser.get_http_version() != "1.1" or not parser.should_keep_alive():
            return False
        if parser.should_upgrade() or self.root_path:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        limit = self.limit_concurrency  # over uvicorn's limit, its 503 is the usual way's
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return False
        return True

    def _answer_later(self, answering: Awaitable[Answer]) -> None:
        # Stands in for uvicorn's response cycle until the answer is written: requests
        # pipelined behind it queue as they would behind any answer in progress, and
        # uvicorn's shutdown and lost connections find what they expect.
        pending = _Pending()
        self.cycle = pending  # type: ignore[assignment]
        task = self.loop.create_task(self._write_when_ready(pending, answering))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _write_when_ready(self, pending: _Pending, answering: Awaitable[Answer]) -> None:
        try:
            answer = await answering
        except Exception:
            self.logger.exception("Exception in a direct answer")
            pending.keep_alive = False
            answer = _crashed()
        pending.response_complete = True
        if pending.disconnected or self.transport.is_closing():
            return
        if not pending.keep_alive:
            answer.headers.append((b"connection", b"close"))
        self.transport.write(self._response(answer))
        if pending.keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()

    def _response(self, answer: Answer) -> bytes:
        parts = [STATUS_LINE[answer.status]]
        for name, value in (*self.server_state.default_headers, *answer.headers):
            parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", answer.body)
        return b"".join(parts)


class _Pending:
    """What uvicorn's protocol reads off its response cycle, for a direct answer awaited."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True  # uvicorn's shutdown sets it False: close once answered
        self.disconnected = False
        self.message_event = _NoEvent


class _NoEvent:
    @staticmethod
    def set() -> None:
        return None


def _crashed() -> Answer:
    """The answer to a direct answer that raised (the app's error handling was not in the
    way: `ServiceApp` answers its errors with problem documents itself)."""
    body = b"Internal Server Error"
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    return Answer(500, [*headers, (b"content-length", str(len(body)).encode())], body)


def _direct_answerer(app: Any) -> DirectAnswerer | None:
    """The app with direct routes inside the server's own wrappers (proxy headers), if any."""
    for _ in range(_MAX_WRAPPERS):
        if app is None or hasattr(app, "answer_directly"):
            return cast("DirectAnswerer | None", app)
        app = getattr(app, "app", None)
    return None


_MAX_WRAPPERS = 4


# uvicorn's fast parts, named rather than "auto": a missing wheel must fail the start, not
# halve the throughput (the tests' servers and the benchmarks' floor are served the same way).
LOOP = "uvloop"
HTTP = HttpProtocol
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
