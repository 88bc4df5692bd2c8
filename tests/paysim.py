"""A payment provider for the tests: the external boundary, played by a real HTTP server.

Applicants (the tests) pay at `POST /charges {reference, amount}`; like Midtrans or Xendit, the
provider then POSTs a signed callback to Meterai's notify URL, and retries it while Meterai
does not answer 2xx. `POST /charges/{id}/resend` delivers the same event again, as providers
do after a timeout.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from services.platform import signatures
from tests.harness import Served


class ChargeIn(BaseModel):
    reference: str
    amount: int
    status: str = "paid"


@dataclass
class Delivery:
    event_id: str
    status_code: int
    body: dict[str, Any]


@dataclass
class PaymentProvider:
    notify_url: str
    secret: str
    deliveries: list[Delivery] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    served: Served | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/charges")
        async def charge(body: ChargeIn) -> dict[str, Any]:
            event = {
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

        return app

    async def deliver(self, event: dict[str, Any]) -> Delivery:
        """POST the signed event, trying again (3 tries) while Meterai answers 5xx."""
        body = json.dumps(event).encode()
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                response = await client.post(
                    self.notify_url,
                    content=body,
                    headers={
                        "content-type": "application/json",
                        signatures.SIGNATURE_HEADER: signatures.sign(self.secret, body),
                    },
                )
                if response.status_code < 500:
                    break
                await asyncio.sleep(0.2)
        delivery = Delivery(str(event["event_id"]), response.status_code, response.json())
        self.deliveries.append(delivery)
        return delivery

    async def start(self) -> str:
        self.served = Served(self.app())
        await self.served.start()
        return self.served.url

    async def stop(self) -> None:
        if self.served is not None:
            await self.served.stop()
