"""Inventory rules: distributors, minting, purchases that never oversell, serial claims."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory import repository as repo
from services.inventory.models import (
    ApiKey,
    Distributor,
    Purchase,
    PurchaseStatus,
    Serial,
    SerialState,
)
from services.platform.errors import Conflict, MeteraiError, NotFound, Unauthorized
from services.platform.tokens import display_prefix, generate_api_key, hash_api_key

SERIAL_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SERIAL_LENGTH = 22


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"
    title = "Invalid API key"


class InsufficientBalance(MeteraiError):
    status = 409
    code = "insufficient_balance"
    title = "Insufficient balance"


class QuantityTooLarge(MeteraiError):
    status = 422
    code = "quantity_too_large"
    title = "Quantity too large"


class SoldOut(MeteraiError):
    status = 409
    code = "sold_out"
    title = "Sold out"


class SerialUnavailable(MeteraiError):
    status = 409
    code = "serial_unavailable"
    title = "Serial cannot be used"


class NoSerialAvailable(MeteraiError):
    status = 409
    code = "no_unused_serial"
    title = "No unused serial"


def new_serial() -> str:
    """An unguessable serial: 22 characters of [0-9A-Z] (about 113 random bits)."""
    # 128 random bits reduced modulo 36**22: the bias is below one part in 19,000.
    value = int.from_bytes(secrets.token_bytes(16), "big") % (36**SERIAL_LENGTH)
    digits = []
    for _ in range(SERIAL_LENGTH):
        value, digit = divmod(value, 36)
        digits.append(SERIAL_ALPHABET[digit])
    return "".join(reversed(digits))


@dataclass(frozen=True)
class NewDistributor:
    distributor: Distributor
    api_key: str


async def create_distributor(session: AsyncSession, name: str, balance: int) -> NewDistributor:
    """A distributor with an opening balance (recorded in the ledger) and its first API key."""
    if balance < 0:
        raise ValueError("the opening balance cannot be negative")
    distributor = Distributor(id=uuid.uuid4(), name=name, balance=balance)
    session.add(distributor)
    await session.flush()
    if balance:
        await repo.add_ledger_txn(
            session,
            f"opening balance of {name}",
            [
                repo.Leg(repo.DEPOSITS_ACCOUNT, -balance),
                repo.Leg(repo.distributor_account(distributor.id), balance),
            ],
        )
    api_key = await issue_api_key(session, distributor.id)
    return NewDistributor(distributor=distributor, api_key=api_key)


async def issue_api_key(session: AsyncSession, distributor_id: uuid.UUID) -> str:
    """A new key for the distributor; the key itself is returned once and never stored."""
    api_key = generate_api_key()
    session.add(
        ApiKey(
            distributor_id=distributor_id,
            key_hash=hash_api_key(api_key),
            prefix=display_prefix(api_key),
        )
    )
    await session.flush()
    return api_key


async def mint_serials(session: AsyncSession, count: int, *, batch: int = 5_000) -> int:
    """Add `count` fresh serials to the pool (a collision is skipped and replaced)."""
    if count < 1:
        raise ValueError("count must be positive")
    minted = 0
    while minted < count:
        size = min(batch, count - minted)
        minted += await repo.insert_serials(session, [new_serial() for _ in range(size)])
    return minted


@dataclass(frozen=True)
class PurchaseResult:
    purchase: Purchase
    serials: list[str]


async def purchase_for_distributor(
    session: AsyncSession, *, distributor_id: uuid.UUID, quantity: int, unit_price: int
) -> PurchaseResult:
    """Debit the balance and allocate `quantity` serials, all or nothing.

    Raises `InsufficientBalance` or `SoldOut`; the caller's transaction then rolls back, so a
    refused purchase leaves no trace.
    """
    amount = quantity * unit_price
    if await repo.debit_balance(session, distributor_id, amount) is None:
        distributor = await repo.get_distributor(session, distributor_id)
        balance = distributor.balance if distributor else 0
        raise InsufficientBalance(
            f"{quantity} stamps cost Rp {amount:,}; the balance is Rp {balance:,}.",
            extra={"balance": balance, "amount": amount},
        )
    owner = f"distributor:{distributor_id}"
    purchase = Purchase(
        id=uuid.uuid4(),
        owner=owner,
        quantity=quantity,
        unit_price=unit_price,
        amount=amount,
        status=PurchaseStatus.paid,
        paid_at=datetime.now(UTC),
    )
    session.add(purchase)
    await session.flush()
    serials = await repo.allocate_serials(
        session, quantity=quantity, owner=owner, purchase_id=purchase.id, state=SerialState.sold
    )
    if len(serials) < quantity:
        raise SoldOut(
            f"Only {len(serials)} of the {quantity} stamps asked for are available.",
            extra={"available": len(serials)},
        )
    await repo.add_ledger_txn(
        session,
        f"purchase {purchase.id}",
        [
            repo.Leg(repo.distributor_account(distributor_id), -amount),
            repo.Leg(repo.REVENUE_ACCOUNT, amount),
        ],
    )
    return PurchaseResult(purchase=purchase, serials=serials)


async def claim_serial(
    session: AsyncSession, *, owner: str, job_id: uuid.UUID, serial: str | None
) -> str:
    """Reserve a sold, unused serial of `owner` for a stamping job (idempotent per job)."""
    existing = await repo.serial_of_job(session, job_id)
    if existing is not None:
        if serial is not None and existing.serial != serial:
            raise Conflict("This job already holds another serial.")
        return existing.serial
    row: Serial | None
    if serial is None:
        row = await repo.first_unclaimed_serial(session, owner)
        if row is None:
            raise NoSerialAvailable("You hold no bought, unused serial; buy stamps first.")
    else:
        row = await repo.get_serial_for_update(session, serial)
        # Someone else's serial is reported exactly like a missing one: no probing.
        if row is None or row.owner != owner:
            raise NotFound(f"Serial {serial} is not one of yours.")
        if row.state is not SerialState.sold or row.job_id is not None:
            raise SerialUnavailable(
                f"Serial {serial} is {'already used' if row.job_id else row.state.value}.",
                extra={"serial": serial},
            )
    row.job_id = job_id
    await session.flush()
    return row.serial


async def release_serial(session: AsyncSession, job_id: uuid.UUID) -> str | None:
    """Give a failed job's serial back to its owner, unused (idempotent)."""
    row = await repo.serial_of_job(session, job_id)
    if row is None or row.state is not SerialState.sold:
        return None
    row.job_id = None
    await session.flush()
    return row.serial


async def mark_used(session: AsyncSession, job_id: uuid.UUID, serial: str) -> bool:
    """Record that `job_id` affixed `serial`; True the first time, False on redelivery."""
    row = await repo.get_serial_for_update(session, serial)
    if row is None:
        raise NotFound(f"unknown serial {serial}")
    if row.state is SerialState.used:
        if row.job_id != job_id:
            raise Conflict(f"serial {serial} was used by another job")
        return False
    if row.job_id not in (None, job_id) or row.state is not SerialState.sold:
        raise Conflict(f"serial {serial} is {row.state.value}, held by job {row.job_id}")
    row.job_id = job_id
    row.state = SerialState.used
    row.used_at = datetime.now(UTC)
    await session.flush()
    return True
