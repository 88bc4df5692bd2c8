"""Inventory tables: distributors and their keys, serials, purchases, and the money ledger."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import make_metadata
from services.platform.idempotency import idempotency_table


class Base(DeclarativeBase):
    metadata = make_metadata()


idempotency_keys = idempotency_table(Base.metadata)


class SerialState(StrEnum):
    available = "available"
    reserved = "reserved"
    sold = "sold"
    used = "used"


class PurchaseStatus(StrEnum):
    pending_payment = "pending_payment"
    paid = "paid"
    expired = "expired"


class Distributor(Base):
    __tablename__ = "distributors"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Rupiah, whole units: the only price is Rp 10,000 and nothing is ever fractional.
    balance: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    distributor_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("distributors.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the key was rotated: it keeps working until then, so clients can switch over.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Serial(Base):
    __tablename__ = "serials"
    __table_args__ = (
        # The purchase hot path picks any available serial; keep that index small.
        Index(
            "ix_serials_available",
            "serial",
            postgresql_where=text("state = 'available'"),
        ),
        Index("ix_serials_owner_state", "owner", "state"),
        Index("uq_serials_job_id", "job_id", unique=True),
        # Claims whose job has not reported back, oldest check first (see `outcomes`).
        Index(
            "ix_serials_open_claims",
            text("coalesce(claim_checked_at, claimed_at)"),
            postgresql_where=text("state = 'sold' AND job_id IS NOT NULL"),
        ),
    )

    serial: Mapped[str] = mapped_column(String(22), primary_key=True)
    state: Mapped[SerialState] = mapped_column(
        Enum(SerialState, name="serial_state", native_enum=True), default=SerialState.available
    )
    owner: Mapped[str | None] = mapped_column(String(100))
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("purchases.id"))
    # The stamping job this serial is (or was) affixed by; one serial, one job, ever.
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # When a job claimed this serial, and when inventory last asked stamping about that job.
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The upload attempt that made (or last renewed) the claim: a give-back by an earlier
    # attempt of the same job, arriving late, leaves a later attempt's claim alone.
    claim_attempt: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    claim_checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    minted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sold_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Purchase(Base):
    __tablename__ = "purchases"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        # The sweeper looks only at reservations still waiting for their payment.
        Index(
            "ix_purchases_pending_expiry",
            "expires_at",
            postgresql_where=text("status = 'pending_payment'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[PurchaseStatus] = mapped_column(
        Enum(PurchaseStatus, name="purchase_status", native_enum=True)
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Applicants' purchases wait for a payment quoting this reference until `expires_at`.
    payment_reference: Mapped[str | None] = mapped_column(String(40), unique=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LedgerUnit(StrEnum):
    rupiah = "IDR"
    stamp = "STAMP"


class LedgerEntry(Base):
    """One leg of a balanced movement of money or stamps: per unit, the legs of a `txn_id`
    sum to zero."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    txn_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    account: Mapped[str] = mapped_column(String(120), index=True)
    unit: Mapped[str] = mapped_column(String(8), default=LedgerUnit.rupiah.value)
    amount: Mapped[int] = mapped_column(BigInteger)
    memo: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PaymentOutcome(StrEnum):
    applied = "applied"
    duplicate = "duplicate"  # the same provider event again
    already_paid = "already_paid"  # another event for a purchase that is paid: refund it
    late = "late"  # paid after the reservation expired: refund it (or honour it by hand)
    amount_mismatch = "amount_mismatch"
    unknown_reference = "unknown_reference"
    not_paid = "not_paid"  # the provider reports a failed or cancelled payment


class PaymentEvent(Base):
    """Every callback the payment provider sent, with what it did; operators work from the
    ones that need a refund."""

    __tablename__ = "payment_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(100), unique=True)
    reference: Mapped[str] = mapped_column(String(40), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))
    outcome: Mapped[PaymentOutcome] = mapped_column(
        Enum(PaymentOutcome, name="payment_outcome", native_enum=True)
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
