"""Answers made inside the server's protocol, without the ASGI machinery.

A few routes carry most of a surge's requests, and what they answer is small: the waiting
room's status poll (from the process's memory) and its join (one batched round trip to
Redis). For them, `ServiceApp.add_direct_route` registers a function that makes the whole
answer, and the server (see `services.platform.serve.HttpProtocol`) writes it once the
request's head is parsed: no ASGI messages, no response cycle, and for an answer made at once
no task either. When that function cannot answer at once it returns an awaitable of the
answer, or None to send the request the usual way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from starlette.types import Scope


@dataclass(slots=True)
class Answer:
    """A whole HTTP response: its status, its headers (the server adds the date; the observer
    the request id) and its body."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


# A direct route's function: an answer now, an awaitable of one, or None for the usual way.
DirectAnswer = Callable[[Scope], "Answer | Awaitable[Answer] | None"]


class DirectAnswerer(Protocol):
    """What the server looks for in the app it serves (`ServiceApp` is one)."""

    # (method, path) of the routes it may answer directly.
    direct_routes: frozenset[tuple[bytes, bytes]]

    def answer_directly(self, scope: Scope) -> Answer | Awaitable[Answer] | None:
        """The answer to the request in `scope` (its method, path and headers are set), or
        None for the usual way."""


def json_answer(payload: object, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """A 200 with `payload` as JSON, never cached, and `headers` besides."""
    body = orjson.dumps(payload)
    return Answer(
        200,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *(headers or ()),
        ],
        body,
    )
