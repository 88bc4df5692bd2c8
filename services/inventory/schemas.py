"""Request and response bodies of the inventory API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from services.inventory.models import PaymentOutcome, PurchaseStatus, SerialState

SerialNumber = Annotated[str, Field(pattern=r"^[0-9A-Z]{22}$", examples=["2C5NV74I6D0HJ1EZ000DU9"])]


class StrictBody(BaseModel):
    """Bodies refuse unknown fields."""

    model_config = ConfigDict(extra="forbid")


class PurchaseCreate(StrictBody):
    # Strict: `"3"`, `3.0` and `true` are not quantities.
    quantity: StrictInt = Field(gt=0, le=1_000_000, description="How many stamps to buy.")


class PurchaseOut(BaseModel):
    id: uuid.UUID
    status: PurchaseStatus
    quantity: int
    unit_price: int = Field(description="Rupiah per stamp.")
    amount: int = Field(description="Rupiah charged for the purchase.")
    currency: str = "IDR"
    serials: list[SerialNumber]
    created_at: datetime
    paid_at: datetime | None = None
    payment_reference: str | None = Field(
        None, description="Applicants: quote this reference when paying."
    )
    expires_at: datetime | None = Field(
        None, description="Applicants: the reservation is released if unpaid by then."
    )


class PaymentNotification(BaseModel):
    """The payment provider's callback body (signed with the `X-Signature` header)."""

    model_config = ConfigDict(extra="allow")

    event_id: str = Field(min_length=1, max_length=100)
    reference: str = Field(min_length=1, max_length=40)
    amount: StrictInt = Field(ge=0)
    currency: str = "IDR"
    status: str = Field(min_length=1, max_length=20, examples=["paid", "failed"])


class PaymentAck(BaseModel):
    outcome: PaymentOutcome


class StampCounts(BaseModel):
    reserved: int
    sold: int = Field(
        description="Bought and not yet affixed; a stamp moves to `used` moments after its "
        "stamping job shows `done` (the result reaches the inventory over Kafka)."
    )
    used: int = Field(description="Affixed to a document.")


class BalanceOut(BaseModel):
    distributor_id: uuid.UUID
    name: str
    balance: int = Field(description="Prepaid balance in rupiah.")
    currency: str = "IDR"
    stamp_price: int
    stamps: StampCounts


class SerialOut(BaseModel):
    serial: SerialNumber
    state: SerialState
    purchase_id: uuid.UUID | None
    job_id: uuid.UUID | None
    sold_at: datetime | None
    used_at: datetime | None


class SerialPage(BaseModel):
    items: list[SerialOut]
    next_cursor: str | None = Field(description="Pass as `after` to get the next page.")


# Internal (service-to-service) bodies.


class AuthenticateIn(StrictBody):
    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuthenticatedDistributor(BaseModel):
    distributor_id: uuid.UUID
    name: str


class ClaimIn(StrictBody):
    owner: str = Field(min_length=1, max_length=100)
    job_id: uuid.UUID
    serial: SerialNumber | None = None
    # The upload attempt asking (absent from callers that predate attempts).
    attempt: uuid.UUID | None = None


class ClaimOut(BaseModel):
    serial: SerialNumber


class ReleaseIn(StrictBody):
    job_id: uuid.UUID
    # Give back only what this attempt still holds; absent: whatever the job holds.
    attempt: uuid.UUID | None = None
