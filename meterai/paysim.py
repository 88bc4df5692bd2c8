"""A payment provider simulator: the external boundary of a purchase, played by a real server.

Applicants pay at `POST /charges {reference, amount}`; like Midtrans or Xendit, the provider
then POSTs a callback signed with the shared secret (`X-Signature`, see
`services.platform.signatures`) to Meterai's notify URL, and tries again while Meterai answers
429 or 5xx or does not answer (after its `Retry-After`, else a doubling delay).
`POST /charges/{id}/resend` delivers the same event again, as providers do after a timeout.

`meterai surge` runs it as a process of its own; the tests serve the same app in-process:

    METERAI_PAYSIM_SECRET=... python -m meterai.paysim --port 8100 \\
        --notify-url http://127.0.0.1:8000/api/v1/payments/notify
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from services.platform import signatures

SECRET_ENV = "METERAI_PAYSIM_SECRET"  # noqa: S105 - the name of the variable
# Answers worth trying again: the receiver is busy or broken, not refusing the event.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ChargeIn(BaseModel):
    reference: str
    amount: int
    status: str = "paid"


@dataclass
class Delivery:
    event_id: str
    status_code: int
    body: dict[str, Any]
    attempts: int = 1


@dataclass
class PaymentProvider:
    """The provider: charges, signed callbacks, resends. `deliveries` keeps every outcome."""

    notify_url: str
    secret: str
    attempts: int = 5
    first_delay_seconds: float = 0.2
    max_delay_seconds: float = 5.0
    timeout_seconds: float = 30.0
    deliveries: list[Delivery] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    _client: httpx.AsyncClient | None = None

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self._client = httpx.AsyncClient(
                timeout=self.timeout_seconds, limits=httpx.Limits(max_connections=64)
            )
            try:
                yield
            finally:
                client, self._client = self._client, None
                await client.aclose()

        app = FastAPI(title="Payment provider simulator", lifespan=lifespan)

        @app.post("/charges")
        async def charge(body: ChargeIn) -> dict[str, Any]:
            event: dict[str, Any] = {
                "event_id": f"evt_{uuid.uuid4().hex}",
                "reference": body.reference,
                "amount": body.amount,
                "currency": "IDR",
                "status": body.status,
                "provider_charge_id": f"ch_{uuid.uuid4().hex[:12]}",
            }
            self.events[event["provider_charge_id"]] = event
            delivery = await self.deliver(event)
            return {"charge_id": event["provider_charge_id"], **delivery.__dict__}

        @app.post("/charges/{charge_id}/resend")
        async def resend(charge_id: str) -> dict[str, Any]:
            delivery = await self.deliver(self.events[charge_id])
            return delivery.__dict__

        @app.get("/livez")
        async def livez() -> dict[str, str]:
            return {"status": "ok"}

        return app

    async def deliver(self, event: dict[str, Any]) -> Delivery:
        """POST the signed event (signed afresh on every attempt), trying again while Meterai
        answers 429 or 5xx or cannot be reached, up to `attempts` times."""
        body = json.dumps(event).encode()
        if self._client is not None:
            return await self._deliver(self._client, event, body)
        async with httpx.AsyncClient(timeout=self.timeout_seconds) as client:
            return await self._deliver(client, event, body)

    async def _deliver(
        self, client: httpx.AsyncClient, event: dict[str, Any], body: bytes
    ) -> Delivery:
        delay = self.first_delay_seconds
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                response = await client.post(
                    self.notify_url,
                    content=body,
                    headers={
                        "content-type": "application/json",
                        signatures.SIGNATURE_HEADER: signatures.sign(self.secret, body),
                    },
                )
            except httpx.TransportError as exc:
                if last:
                    delivery = Delivery(str(event["event_id"]), 0, {"error": repr(exc)}, attempt)
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.max_delay_seconds)
                continue
            if response.status_code not in _RETRY_STATUSES or last:
                delivery = Delivery(
                    str(event["event_id"]), response.status_code, _json(response), attempt
                )
                break
            await asyncio.sleep(_retry_after(response, delay, self.max_delay_seconds))
            delay = min(2 * delay, self.max_delay_seconds)
        self.deliveries.append(delivery)
        return delivery


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"text": response.text[:500]}
    return body if isinstance(body, dict) else {"body": body}


def _retry_after(response: httpx.Response, default: float, cap: float) -> float:
    value = response.headers.get("retry-after", "")
    return min(float(value), cap) if value.isdigit() else default


def main(argv: list[str] | None = None) -> None:
    """Serve the simulator until SIGINT or SIGTERM (the secret comes from the environment)."""
    parser = argparse.ArgumentParser(description="Payment provider simulator for Meterai.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--notify-url", required=True, help="Meterai's payment callback URL")
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        parser.error(f"set {SECRET_ENV} to the payment secret Meterai checks callbacks with")
    provider = PaymentProvider(args.notify_url, secret, attempts=8)
    uvicorn.run(
        provider.app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
