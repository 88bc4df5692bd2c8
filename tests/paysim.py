"""The payment provider for the tests: `meterai.paysim`, served in the test's event loop."""

from __future__ import annotations

from dataclasses import dataclass

from meterai.paysim import ChargeIn, Delivery
from meterai.paysim import PaymentProvider as _PaymentProvider
from tests.harness import PAYMENT_SECRET, Served, ServiceStack

__all__ = ["ChargeIn", "Delivery", "PaymentProvider"]


@dataclass
class PaymentProvider(_PaymentProvider):
    """The simulator on a real port of this process (`start` returns its URL)."""

    served: Served | None = None

    @classmethod
    def for_stack(cls, stack: ServiceStack) -> PaymentProvider:
        """The simulator, sending its signed callbacks to the stack's public notify URL."""
        return cls(f"{stack.gateway_url}/api/v1/payments/notify", PAYMENT_SECRET)

    async def start(self) -> str:
        self.served = Served(self.app())
        await self.served.start()
        return self.served.url

    async def stop(self) -> None:
        if self.served is not None:
            await self.served.stop()
