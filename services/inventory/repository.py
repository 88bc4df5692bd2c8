"""All inventory SQL. Functions take the caller's session and only flush; callers commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory.models import (
    ApiKey,
    Distributor,
    LedgerEntry,
    Purchase,
    Serial,
    SerialState,
)


@dataclass(frozen=True)
class Leg:
    account: str
    amount: int


def distributor_account(distributor_id: uuid.UUID) -> str:
    """The ledger account holding a distributor's prepaid balance."""
    return f"distributor:{distributor_id}"


DEPOSITS_ACCOUNT = "deposits"
REVENUE_ACCOUNT = "revenue:stamps"


async def add_ledger_txn(session: AsyncSession, memo: str, legs: Sequence[Leg]) -> uuid.UUID:
    """Record one balanced movement (the legs must sum to zero)."""
    if sum(leg.amount for leg in legs) != 0:
        raise ValueError("ledger legs must balance")
    txn_id = uuid.uuid4()
    await session.execute(
        insert(LedgerEntry),
        [
            {"txn_id": txn_id, "account": leg.account, "amount": leg.amount, "memo": memo}
            for leg in legs
        ],
    )
    return txn_id


async def distributor_by_key_hash(session: AsyncSession, key_hash: str) -> Distributor | None:
    """The distributor owning an unrevoked key with this hash."""
    return (
        await session.execute(
            select(Distributor)
            .join(ApiKey, ApiKey.distributor_id == Distributor.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
    ).scalar_one_or_none()


async def get_distributor(session: AsyncSession, distributor_id: uuid.UUID) -> Distributor | None:
    return await session.get(Distributor, distributor_id)


async def debit_balance(
    session: AsyncSession, distributor_id: uuid.UUID, amount: int
) -> int | None:
    """Take `amount` from the balance if it covers it; the new balance, or None if it does not.

    One conditional UPDATE: the row lock serialises a distributor's concurrent purchases.
    """
    return (
        await session.execute(
            update(Distributor)
            .where(Distributor.id == distributor_id, Distributor.balance >= amount)
            .values(balance=Distributor.balance - amount)
            .returning(Distributor.balance)
        )
    ).scalar_one_or_none()


async def allocate_serials(
    session: AsyncSession, *, quantity: int, owner: str, purchase_id: uuid.UUID, state: SerialState
) -> list[str]:
    """Move up to `quantity` available serials to `owner`; concurrent callers never share one.

    SKIP LOCKED lets concurrent purchases take different rows instead of queueing on the same
    ones; a caller that gets fewer than it asked for must roll back (sold out).
    """
    picked = (
        select(Serial.serial)
        .where(Serial.state == SerialState.available)
        .limit(quantity)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = await session.execute(
        update(Serial)
        .where(Serial.serial.in_(picked))
        .values(state=state, owner=owner, purchase_id=purchase_id, sold_at=func.now())
        .returning(Serial.serial)
    )
    return sorted(rows.scalars().all())


async def serials_of_purchase(session: AsyncSession, purchase_id: uuid.UUID) -> list[str]:
    rows = await session.execute(
        select(Serial.serial).where(Serial.purchase_id == purchase_id).order_by(Serial.serial)
    )
    return list(rows.scalars().all())


async def get_purchase(session: AsyncSession, purchase_id: uuid.UUID) -> Purchase | None:
    return await session.get(Purchase, purchase_id)


async def insert_serials(session: AsyncSession, serials: Sequence[str]) -> int:
    """Add serials to the pool, skipping any that already exist; how many were new."""
    result = await session.execute(
        pg_insert(Serial)
        .values([{"serial": serial, "state": SerialState.available} for serial in serials])
        .on_conflict_do_nothing()
        .returning(Serial.serial)
    )
    return len(result.scalars().all())


async def serial_counts(session: AsyncSession, owner: str | None = None) -> dict[str, int]:
    """How many serials are in each state (for one owner, or the whole pool)."""
    query = select(Serial.state, func.count()).group_by(Serial.state)
    if owner is not None:
        query = query.where(Serial.owner == owner)
    counts = {state.value: 0 for state in SerialState}
    for state, count in (await session.execute(query)).all():
        counts[SerialState(state).value] = int(count)
    return counts


async def list_serials(
    session: AsyncSession, *, owner: str, state: SerialState | None, limit: int, after: str | None
) -> list[Serial]:
    query = select(Serial).where(Serial.owner == owner).order_by(Serial.serial).limit(limit)
    if state is not None:
        query = query.where(Serial.state == state)
    if after is not None:
        query = query.where(Serial.serial > after)
    return list((await session.execute(query)).scalars().all())


async def get_serial_for_update(session: AsyncSession, serial: str) -> Serial | None:
    return (
        await session.execute(select(Serial).where(Serial.serial == serial).with_for_update())
    ).scalar_one_or_none()


async def serial_of_job(session: AsyncSession, job_id: uuid.UUID) -> Serial | None:
    return (
        await session.execute(select(Serial).where(Serial.job_id == job_id).with_for_update())
    ).scalar_one_or_none()


async def first_unclaimed_serial(session: AsyncSession, owner: str) -> Serial | None:
    """Any sold serial of `owner` that no job has claimed yet."""
    return (
        await session.execute(
            select(Serial)
            .where(Serial.owner == owner, Serial.state == SerialState.sold, Serial.job_id.is_(None))
            .order_by(Serial.serial)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
    ).scalar_one_or_none()
