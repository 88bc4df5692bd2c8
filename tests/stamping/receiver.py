"""A distributor's callback endpoint for the tests: the external boundary, played by a real
HTTP server. It records every delivery and answers as the test tells it: 2xx, a failure for
the first few attempts or for ever, or no answer at all until released."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response

from tests.harness import Served


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class CallbackReceiver:
    """`fail_first` attempts get `failure_status`; with `always_fail` every one does; with
    `hang` requests get no answer until :meth:`release` (or :meth:`stop`)."""

    fail_first: int = 0
    always_fail: bool = False
    failure_status: int = 500
    hang: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    hanging: int = 0
    served: Served | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks/meterai")
        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.hang:
                self.hanging += 1
                try:
                    await self._released.wait()
                finally:
                    self.hanging -= 1
            failing = self.always_fail or len(self.deliveries) < self.fail_first
            status = self.failure_status if failing else 200
            self.deliveries.append(Delivery(dict(request.headers), body, status, time.monotonic()))
            return Response(b"receiver says no" if failing else b"ok", status_code=status)

        return app

    @property
    def url(self) -> str:
        assert self.served is not None
        return f"{self.served.url}/hooks/meterai"

    @property
    def accepted(self) -> list[Delivery]:
        return [delivery for delivery in self.deliveries if 200 <= delivery.answered < 300]

    def release(self) -> None:
        self.hang = False
        self._released.set()

    async def start(self) -> str:
        self.served = Served(self.app())
        await self.served.start()
        return self.url

    async def stop(self) -> None:
        self.release()
        if self.served is not None:
            await self.served.stop()
