"""All inventory SQL. Functions take the caller's session and only flush; callers commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from services.inventory.models import (
    ApiKey,
    Distributor,
    LedgerEntry,
    LedgerUnit,
    PaymentEvent,
    PaymentOutcome,
    Purchase,
    PurchaseStatus,
    Serial,
    SerialState,
    idempotency_keys,
)
from services.platform.idempotency import IdempotencyStore
from services.platform.ids import new_id

idempotency = IdempotencyStore(idempotency_keys)
"""Idempotency-Keys of inventory's creating POSTs, kept in its own database."""


@dataclass(frozen=True)
class Leg:
    account: str
    amount: int
    unit: LedgerUnit = LedgerUnit.rupiah


def distributor_account(distributor_id: uuid.UUID) -> str:
    """The ledger account holding a distributor's prepaid balance."""
    return f"distributor:{distributor_id}"


def owned_stamps_account(owner: str) -> str:
    """The ledger account counting an owner's bought, unused stamps."""
    return f"stamps:owned:{owner}"


DEPOSITS_ACCOUNT = "deposits"
REVENUE_ACCOUNT = "revenue:stamps"
STAMPS_MINTED = "stamps:minted"
STAMPS_POOL = "stamps:pool"
STAMPS_RESERVED = "stamps:reserved"
STAMPS_USED = "stamps:used"


def payments_account(provider: str) -> str:
    """Money received through a payment provider (applicants pay there)."""
    return f"payments:{provider}"


def stamp_move(source: str, target: str, count: int) -> list[Leg]:
    """Legs moving `count` stamps from one ledger account to another."""
    return [Leg(source, -count, LedgerUnit.stamp), Leg(target, count, LedgerUnit.stamp)]


def money_move(source: str, target: str, amount: int) -> list[Leg]:
    """Legs moving `amount` rupiah from one ledger account to another."""
    return [Leg(source, -amount), Leg(target, amount)]


async def add_ledger_txn(session: AsyncSession, memo: str, legs: Sequence[Leg]) -> uuid.UUID:
    """Record one movement; per unit, its legs must sum to zero (one INSERT round trip)."""
    txn_id, rows = _ledger_rows(memo, legs)
    await _insert_ledger_rows(session, rows)
    return txn_id


def _ledger_rows(memo: str, legs: Sequence[Leg]) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """The entries of one movement under a new `txn_id`, once its legs are seen to balance."""
    for unit in {leg.unit for leg in legs}:
        if sum(leg.amount for leg in legs if leg.unit == unit) != 0:
            raise ValueError(f"ledger legs in {unit} must balance")
    txn_id = new_id()
    rows = [
        {
            "txn_id": txn_id,
            "account": leg.account,
            "unit": leg.unit.value,
            "amount": leg.amount,
            "memo": memo,
        }
        for leg in legs
        if leg.amount
    ]
    return txn_id, rows


async def distributor_by_key_hash(session: AsyncSession, key_hash: str) -> Distributor | None:
    """The distributor owning an unrevoked key with this hash."""
    return (
        await session.execute(
            select(Distributor)
            .join(ApiKey, ApiKey.distributor_id == Distributor.id)
            .where(
                ApiKey.key_hash == key_hash,
                ApiKey.revoked_at.is_(None),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()),
            )
        )
    ).scalar_one_or_none()


async def get_distributor(session: AsyncSession, distributor_id: uuid.UUID) -> Distributor | None:
    return await session.get(Distributor, distributor_id)


async def distributor_balance(
    session: AsyncSession | AsyncConnection, distributor_id: uuid.UUID
) -> int:
    balance = await session.scalar(
        select(Distributor.balance).where(Distributor.id == distributor_id)
    )
    return int(balance or 0)


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


async def use_claimed_serials(
    session: AsyncSession, jobs: Sequence[tuple[uuid.UUID, str]]
) -> list[tuple[str, str, uuid.UUID]]:
    """Mark `used` each (job, serial) whose serial is sold and unclaimed or claimed by that job,
    in one statement (rows locked in serial order); (serial, owner, job) of those it marked."""
    if not jobs:
        return []
    rows = await session.execute(
        text(
            """
            WITH done AS (
                SELECT * FROM unnest(CAST(:job_ids AS uuid[]), CAST(:serials AS varchar[]))
                    AS done(job_id, serial)
            ), locked AS (
                SELECT s.serial, done.job_id FROM serials s JOIN done ON done.serial = s.serial
                WHERE s.state = 'sold' AND (s.job_id IS NULL OR s.job_id = done.job_id)
                ORDER BY s.serial
                FOR UPDATE OF s
            )
            UPDATE serials s SET state = 'used', job_id = locked.job_id, used_at = now()
            FROM locked
            WHERE s.serial = locked.serial
            RETURNING s.serial, s.owner, s.job_id
            """
        ),
        {"job_ids": [job_id for job_id, _ in jobs], "serials": [serial for _, serial in jobs]},
    )
    return [(row.serial, row.owner, row.job_id) for row in rows]


async def add_ledger_txns(session: AsyncSession, txns: Sequence[tuple[str, Sequence[Leg]]]) -> None:
    """Record several movements (memo, legs) in one INSERT, each its own balanced `txn_id`."""
    await _insert_ledger_rows(
        session, [row for memo, legs in txns for row in _ledger_rows(memo, legs)[1]]
    )


# One statement for any number of entries, as arrays: prepared once, where a multi-row VALUES
# would be compiled and prepared anew for every count of rows (a batch of stamping results
# spent half its CPU compiling it).
_INSERT_LEDGER_ROWS = text(
    """
    INSERT INTO ledger_entries (txn_id, account, unit, amount, memo)
    SELECT * FROM unnest(
        CAST(:txn_ids AS uuid[]), CAST(:accounts AS varchar[]), CAST(:units AS varchar[]),
        CAST(:amounts AS bigint[]), CAST(:memos AS varchar[])
    )
    """
)


async def _insert_ledger_rows(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    await session.execute(
        _INSERT_LEDGER_ROWS,
        {
            "txn_ids": [row["txn_id"] for row in rows],
            "accounts": [row["account"] for row in rows],
            "units": [row["unit"] for row in rows],
            "amounts": [row["amount"] for row in rows],
            "memos": [row["memo"] for row in rows],
        },
    )


@dataclass(frozen=True)
class OpenClaim:
    serial: str
    job_id: uuid.UUID
    claimed_at: datetime


async def take_due_claims(
    session: AsyncSession, *, checked_before: datetime, limit: int
) -> list[OpenClaim]:
    """Claims not checked (or made) since `checked_before`, oldest first, marked checked now.
    Rows another replica is checking are skipped."""
    rows = await session.execute(
        text(
            """
            UPDATE serials SET claim_checked_at = now()
            WHERE serial IN (
                SELECT serial FROM serials
                WHERE state = 'sold' AND job_id IS NOT NULL
                  AND coalesce(claim_checked_at, claimed_at) < :checked_before
                ORDER BY coalesce(claim_checked_at, claimed_at)
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            RETURNING serial, job_id, claimed_at
            """
        ),
        {"checked_before": checked_before, "limit": limit},
    )
    return [OpenClaim(row.serial, row.job_id, row.claimed_at) for row in rows]


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


async def lock_owner(session: AsyncSession, owner: str) -> None:
    """Serialise one owner's purchases for the rest of the transaction (limits per applicant)."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))


async def stamps_held(session: AsyncSession, owner: str) -> int:
    """Serials reserved, bought or used by `owner`."""
    count = await session.scalar(
        select(func.count()).select_from(Serial).where(Serial.owner == owner)
    )
    return int(count or 0)


async def purchase_by_reference_for_update(
    session: AsyncSession, reference: str
) -> Purchase | None:
    return (
        await session.execute(
            select(Purchase).where(Purchase.payment_reference == reference).with_for_update()
        )
    ).scalar_one_or_none()


async def set_purchase_serials_state(
    session: AsyncSession,
    purchase_id: uuid.UUID,
    *,
    from_state: SerialState,
    to_state: SerialState,
    release: bool = False,
) -> int:
    """Move a purchase's serials between states; `release` gives them back to the pool."""
    values: dict[str, object] = {"state": to_state}
    if release:
        values.update(owner=None, purchase_id=None, sold_at=None)
    else:
        values.update(sold_at=func.now())
    result = await session.execute(
        update(Serial)
        .where(Serial.purchase_id == purchase_id, Serial.state == from_state)
        .values(**values)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def record_payment_event(
    session: AsyncSession,
    *,
    event_id: str,
    reference: str,
    amount: int,
    status: str,
    payload: dict[str, object],
) -> PaymentEvent | None:
    """Store a provider event; None if it was stored before (a duplicate delivery)."""
    row = await session.execute(
        pg_insert(PaymentEvent)
        .values(
            event_id=event_id,
            reference=reference,
            amount=amount,
            status=status,
            outcome=PaymentOutcome.applied,
            payload=payload,
        )
        .on_conflict_do_nothing(index_elements=[PaymentEvent.event_id])
        .returning(PaymentEvent)
    )
    return row.scalar_one_or_none()


async def expired_reservations(session: AsyncSession, limit: int) -> list[Purchase]:
    """Reservations past their expiry, locked so that sweepers in other replicas skip them."""
    rows = await session.execute(
        select(Purchase)
        .where(Purchase.status == PurchaseStatus.pending_payment, Purchase.expires_at < func.now())
        .order_by(Purchase.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(rows.scalars().all())


async def api_keys_of(session: AsyncSession, distributor_id: uuid.UUID) -> list[ApiKey]:
    rows = await session.execute(
        select(ApiKey).where(ApiKey.distributor_id == distributor_id).order_by(ApiKey.created_at)
    )
    return list(rows.scalars().all())


async def distributor_by_name(session: AsyncSession, name: str) -> Distributor | None:
    return (
        await session.execute(select(Distributor).where(Distributor.name == name))
    ).scalar_one_or_none()


async def ledger_totals(session: AsyncSession) -> dict[tuple[str, str], int]:
    """The balance of every (account, unit)."""
    rows = await session.execute(
        select(LedgerEntry.account, LedgerEntry.unit, func.sum(LedgerEntry.amount)).group_by(
            LedgerEntry.account, LedgerEntry.unit
        )
    )
    return {(account, unit): int(total) for account, unit, total in rows.all()}


async def unbalanced_transactions(session: AsyncSession) -> list[tuple[uuid.UUID, str, int]]:
    rows = await session.execute(
        select(LedgerEntry.txn_id, LedgerEntry.unit, func.sum(LedgerEntry.amount))
        .group_by(LedgerEntry.txn_id, LedgerEntry.unit)
        .having(func.sum(LedgerEntry.amount) != 0)
    )
    return [(txn, unit, int(total)) for txn, unit, total in rows.all()]


async def serial_counts_by_owner(session: AsyncSession) -> dict[tuple[str | None, str], int]:
    rows = await session.execute(
        select(Serial.owner, Serial.state, func.count()).group_by(Serial.owner, Serial.state)
    )
    return {(owner, SerialState(state).value): int(n) for owner, state, n in rows.all()}


async def paid_revenue(session: AsyncSession) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(Purchase.amount), 0)).where(
            Purchase.status == PurchaseStatus.paid
        )
    )
    return int(total or 0)


async def inconsistent_serials(session: AsyncSession) -> list[str]:
    """Serials whose row contradicts the rules (each kind named with a count)."""
    checks = {
        "sold or used serials without an owner": "state IN ('sold', 'used') AND owner IS NULL",
        "used serials without a job": "state = 'used' AND job_id IS NULL",
        "available serials with an owner": "state = 'available' AND owner IS NOT NULL",
        "reserved serials outside a pending purchase": (
            "state = 'reserved' AND NOT EXISTS (SELECT 1 FROM purchases p "
            "WHERE p.id = serials.purchase_id AND p.status = 'pending_payment')"
        ),
    }
    found = []
    for label, condition in checks.items():
        count = await session.scalar(
            select(func.count()).select_from(Serial).where(text(condition))
        )
        if count:
            found.append(f"{count} {label}")
    return found


async def payment_events_needing_attention(session: AsyncSession) -> list[PaymentEvent]:
    rows = await session.execute(
        select(PaymentEvent)
        .where(
            PaymentEvent.outcome.in_(
                [
                    PaymentOutcome.late,
                    PaymentOutcome.already_paid,
                    PaymentOutcome.amount_mismatch,
                    PaymentOutcome.unknown_reference,
                ]
            )
        )
        .order_by(PaymentEvent.received_at)
    )
    return list(rows.scalars().all())


async def all_distributors(session: AsyncSession) -> list[Distributor]:
    return list((await session.execute(select(Distributor))).scalars().all())


_BUY_STAMPS = text(
    """
    SELECT * FROM buy_stamps_batch(
        CAST(:purchase_ids AS uuid[]), CAST(:distributor_ids AS uuid[]),
        CAST(:quantities AS integer[]), CAST(:unit_price AS bigint), CAST(:txn_ids AS uuid[]),
        CAST(:owners AS varchar[]), CAST(:money_accounts AS varchar[]),
        CAST(:stamps_accounts AS varchar[])
    )
    """
)


@dataclass(frozen=True)
class DistributorOrder:
    purchase_id: uuid.UUID
    distributor_id: uuid.UUID
    quantity: int

    @property
    def owner(self) -> str:
        return f"distributor:{self.distributor_id}"


@dataclass(frozen=True)
class DistributorPurchaseRow:
    outcome: str  # ok, sold_out or insufficient_balance
    available: int
    created_at: datetime | None
    paid_at: datetime | None
    serials: list[str]


async def buy_for_distributors(
    connection: AsyncSession | AsyncConnection,
    orders: Sequence[DistributorOrder],
    *,
    unit_price: int,
) -> list[DistributorPurchaseRow]:
    """Distributor purchases in one statement (one round trip), one after the other, each all
    or nothing (see the `buy_stamps_batch` function in the migrations): take the serials (SKIP
    LOCKED), debit the balance if it covers them, record the purchase, sell the serials and
    book both ledger movements. A refused order changes nothing and leaves the others alone.
    The distributors' rows are locked in the order of their ids, whatever the order of
    `orders` (batches running at once wait for each other but never deadlock), and stay
    locked until the caller's transaction ends. The rows come back in the order of `orders`.
    """
    rows = await connection.execute(
        _BUY_STAMPS,
        {
            "purchase_ids": [order.purchase_id for order in orders],
            "distributor_ids": [order.distributor_id for order in orders],
            "quantities": [order.quantity for order in orders],
            "txn_ids": [new_id() for _ in orders],
            "owners": [order.owner for order in orders],
            "money_accounts": [distributor_account(order.distributor_id) for order in orders],
            "stamps_accounts": [owned_stamps_account(order.owner) for order in orders],
            "unit_price": unit_price,
        },
    )
    return [
        DistributorPurchaseRow(
            outcome=row.outcome,
            available=row.available,
            created_at=row.created_at,
            paid_at=row.paid_at,
            serials=list(row.serials or ()),
        )
        for row in rows
    ]
