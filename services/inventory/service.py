"""Inventory rules: distributors, minting, purchases that never oversell, serial claims."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from services.inventory import repository as repo
from services.inventory.models import (
    ApiKey,
    Distributor,
    PaymentOutcome,
    Purchase,
    PurchaseStatus,
    SerialState,
)
from services.platform.batching import Coalescer
from services.platform.db import autocommit
from services.platform.errors import Conflict, MeteraiError, NotFound, Unauthorized
from services.platform.ids import new_id
from services.platform.tokens import display_prefix, generate_api_key, hash_api_key

log = structlog.get_logger(__name__)

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


class ApplicantLimit(MeteraiError):
    status = 409
    code = "applicant_limit"
    title = "Stamp limit per applicant reached"


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
    distributor = Distributor(id=new_id(), name=name, balance=balance)
    session.add(distributor)
    await session.flush()
    if balance:
        await repo.add_ledger_txn(
            session,
            f"opening balance of {name}",
            repo.money_move(
                repo.DEPOSITS_ACCOUNT, repo.distributor_account(distributor.id), balance
            ),
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
    await repo.add_ledger_txn(
        session, f"minted {minted}", repo.stamp_move(repo.STAMPS_MINTED, repo.STAMPS_POOL, minted)
    )
    return minted


@dataclass(frozen=True)
class PaidPurchase:
    """A distributor's purchase as its statement recorded it: the row's values without an ORM
    object (whose bookkeeping cost about 8% of a purchase in inventory, to be thrown away)."""

    id: uuid.UUID
    owner: str
    quantity: int
    unit_price: int
    amount: int
    created_at: datetime | None
    paid_at: datetime | None
    status: PurchaseStatus = PurchaseStatus.paid
    payment_reference: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class PurchaseResult:
    purchase: Purchase | PaidPurchase
    serials: list[str]


async def purchase_for_distributor(
    session: AsyncSession | AsyncConnection,
    *,
    distributor_id: uuid.UUID,
    quantity: int,
    unit_price: int,
) -> PurchaseResult:
    """Allocate `quantity` serials and debit the balance, all or nothing, in the caller's
    transaction.

    Raises `InsufficientBalance` or `SoldOut`; a refused purchase changes nothing.
    """
    order = repo.DistributorOrder(new_id(), distributor_id, quantity)
    [row] = await repo.buy_for_distributors(session, [order], unit_price=unit_price)
    return await _distributor_outcome(session, order, row, unit_price)


class DistributorPurchases:
    """Distributor purchases without an Idempotency-Key, coalesced: the purchases that arrive
    while a batch is running go together in the next one, as one statement and one commit
    (purchases of one distributor otherwise queue for its balance row, one commit each).
    Each purchase is still all or nothing on its own."""

    def __init__(
        self, engine: AsyncEngine, *, unit_price: int, max_batch: int, max_in_flight: int
    ) -> None:
        self._engine = engine
        self._unit_price = unit_price
        self._batches: Coalescer[repo.DistributorOrder, repo.DistributorPurchaseRow] = Coalescer(
            self._run, max_batch=max_batch, max_in_flight=max_in_flight
        )

    async def buy(self, distributor_id: uuid.UUID, quantity: int) -> PurchaseResult:
        """Raises `InsufficientBalance` or `SoldOut` like `purchase_for_distributor`."""
        order = repo.DistributorOrder(new_id(), distributor_id, quantity)
        row = await self._batches.submit(order)
        if row.outcome == "ok":
            return _distributor_outcome_ok(order, row, self._unit_price)
        async with autocommit(self._engine) as connection:
            return await _distributor_outcome(connection, order, row, self._unit_price)

    async def drain(self) -> None:
        """Let the running batches finish (on shutdown)."""
        await self._batches.drain()

    async def _run(
        self, orders: Sequence[repo.DistributorOrder]
    ) -> list[repo.DistributorPurchaseRow]:
        # One statement in autocommit is one transaction and one round trip.
        async with autocommit(self._engine) as connection:
            return await repo.buy_for_distributors(connection, orders, unit_price=self._unit_price)


async def _distributor_outcome(
    connection: AsyncSession | AsyncConnection,
    order: repo.DistributorOrder,
    row: repo.DistributorPurchaseRow,
    unit_price: int,
) -> PurchaseResult:
    if row.outcome == "sold_out":
        raise SoldOut(
            f"Only {row.available} of the {order.quantity} stamps asked for are available.",
            extra={"available": row.available},
        )
    if row.outcome == "insufficient_balance":
        amount = order.quantity * unit_price
        balance = await repo.distributor_balance(connection, order.distributor_id)
        raise InsufficientBalance(
            f"{order.quantity} stamps cost Rp {amount:,}; the balance is Rp {balance:,}.",
            extra={"balance": balance, "amount": amount},
        )
    return _distributor_outcome_ok(order, row, unit_price)


def _distributor_outcome_ok(
    order: repo.DistributorOrder, row: repo.DistributorPurchaseRow, unit_price: int
) -> PurchaseResult:
    if row.outcome != "ok":
        raise RuntimeError(f"unexpected purchase outcome {row.outcome!r}")
    purchase = PaidPurchase(
        id=order.purchase_id,
        owner=order.owner,
        quantity=order.quantity,
        unit_price=unit_price,
        amount=order.quantity * unit_price,
        created_at=row.created_at,
        paid_at=row.paid_at,
    )
    return PurchaseResult(purchase=purchase, serials=row.serials)


async def reserve_for_applicant(
    session: AsyncSession,
    *,
    applicant: str,
    quantity: int,
    unit_price: int,
    max_stamps: int,
    ttl: timedelta,
) -> PurchaseResult:
    """Reserve `quantity` serials for an admitted applicant until they pay (or `ttl` passes).

    One applicant holds at most `max_stamps` (reserved, bought or used); their purchases are
    serialised so that parallel tabs cannot exceed it.
    """
    await repo.lock_owner(session, applicant)
    held = await repo.stamps_held(session, applicant)
    if held + quantity > max_stamps:
        raise ApplicantLimit(
            f"An applicant may hold at most {max_stamps} stamps; you hold {held}.",
            extra={"max_stamps": max_stamps, "held": held},
        )
    now = datetime.now(UTC)
    purchase = Purchase(
        id=new_id(),
        owner=applicant,
        quantity=quantity,
        unit_price=unit_price,
        amount=quantity * unit_price,
        status=PurchaseStatus.pending_payment,
        payment_reference=new_payment_reference(),
        expires_at=now + ttl,
    )
    session.add(purchase)
    await session.flush()
    serials = await repo.allocate_serials(
        session,
        quantity=quantity,
        owner=applicant,
        purchase_id=purchase.id,
        state=SerialState.reserved,
    )
    if len(serials) < quantity:
        raise SoldOut(
            f"Only {len(serials)} of the {quantity} stamps asked for are available.",
            extra={"available": len(serials)},
        )
    await repo.add_ledger_txn(
        session,
        f"reservation {purchase.id}",
        repo.stamp_move(repo.STAMPS_POOL, repo.STAMPS_RESERVED, quantity),
    )
    return PurchaseResult(purchase=purchase, serials=serials)


def new_payment_reference() -> str:
    """What the applicant quotes when paying: unguessable, short enough to type."""
    return "MTR-" + new_serial()[:16]


@dataclass(frozen=True)
class PaymentNotice:
    """A payment provider's callback, as inventory understands it."""

    event_id: str
    reference: str
    amount: int
    status: str
    payload: dict[str, Any]


async def apply_payment(
    session: AsyncSession, notice: PaymentNotice, *, provider: str
) -> PaymentOutcome:
    """Mark a reservation paid exactly once; every other case is recorded for operators.

    A repeated event is a no-op; a payment for an expired reservation, a paid purchase or an
    unknown reference is kept (it needs a refund) rather than silently dropped.
    """
    event = await repo.record_payment_event(
        session,
        event_id=notice.event_id,
        reference=notice.reference,
        amount=notice.amount,
        status=notice.status,
        payload=notice.payload,
    )
    if event is None:
        return PaymentOutcome.duplicate
    purchase = await repo.purchase_by_reference_for_update(session, notice.reference)
    outcome = _payment_outcome(notice, purchase)
    event.outcome = outcome
    if outcome is PaymentOutcome.applied:
        assert purchase is not None  # noqa: S101 - applied implies a purchase
        await repo.set_purchase_serials_state(
            session, purchase.id, from_state=SerialState.reserved, to_state=SerialState.sold
        )
        purchase.status = PurchaseStatus.paid
        purchase.paid_at = datetime.now(UTC)
        await repo.add_ledger_txn(
            session,
            f"payment {notice.event_id} for {purchase.id}",
            [
                *repo.money_move(
                    repo.payments_account(provider), repo.REVENUE_ACCOUNT, purchase.amount
                ),
                *repo.stamp_move(
                    repo.STAMPS_RESERVED,
                    repo.owned_stamps_account(purchase.owner),
                    purchase.quantity,
                ),
            ],
        )
    elif outcome is not PaymentOutcome.not_paid:
        log.warning(
            "payment_needs_attention",
            outcome=outcome.value,
            reference=notice.reference,
            event_id=notice.event_id,
            amount=notice.amount,
        )
    await session.flush()
    return outcome


def _payment_outcome(notice: PaymentNotice, purchase: Purchase | None) -> PaymentOutcome:
    if notice.status != "paid":
        return PaymentOutcome.not_paid
    if purchase is None:
        return PaymentOutcome.unknown_reference
    if purchase.status is PurchaseStatus.paid:
        return PaymentOutcome.already_paid
    expired = purchase.expires_at is not None and purchase.expires_at <= datetime.now(UTC)
    if purchase.status is PurchaseStatus.expired or expired:
        return PaymentOutcome.late
    if notice.amount != purchase.amount:
        return PaymentOutcome.amount_mismatch
    return PaymentOutcome.applied


async def expire_reservations(session: AsyncSession, *, limit: int = 500) -> int:
    """Give the serials of unpaid, expired reservations back to the pool."""
    purchases = await repo.expired_reservations(session, limit)
    for purchase in purchases:
        released = await repo.set_purchase_serials_state(
            session,
            purchase.id,
            from_state=SerialState.reserved,
            to_state=SerialState.available,
            release=True,
        )
        purchase.status = PurchaseStatus.expired
        await repo.add_ledger_txn(
            session,
            f"reservation {purchase.id} expired",
            repo.stamp_move(repo.STAMPS_RESERVED, repo.STAMPS_POOL, released),
        )
    await session.flush()
    return len(purchases)


async def claim_serial(
    session: AsyncSession,
    *,
    owner: str,
    job_id: uuid.UUID,
    serial: str | None,
    attempt: uuid.UUID | None = None,
) -> str:
    """Reserve a sold, unused serial of `owner` for a stamping job (idempotent per job).

    `attempt` names the upload attempt asking. Stamping gives a retried upload the same job id,
    so a claim its first attempt left behind (that attempt failed after the claim and could not
    give it back) is the retry's: claiming again renews it under the new attempt, and the first
    attempt's late give-back then releases nothing (see `release_serial`).
    """
    row = await repo.serial_of_job(session, job_id)
    if row is not None:
        if serial is not None and row.serial != serial:
            raise Conflict("This job already holds another serial.")
        if row.state is SerialState.sold:
            row.claimed_at, row.claim_attempt = datetime.now(UTC), attempt
            row.claim_checked_at = None
            await session.flush()
        return row.serial
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
    row.job_id, row.claimed_at, row.claim_attempt = job_id, datetime.now(UTC), attempt
    await session.flush()
    return row.serial


async def release_serial(
    session: AsyncSession,
    job_id: uuid.UUID,
    *,
    attempt: uuid.UUID | None = None,
    claimed_at: datetime | None = None,
) -> str | None:
    """Give a failed job's serial back to its owner, unused (idempotent).

    With `attempt`, only a claim that attempt still holds is given back; with `claimed_at`,
    only a claim not renewed since then. Either way a later attempt's claim stays.
    """
    row = await repo.serial_of_job(session, job_id)
    if row is None or row.state is not SerialState.sold:
        return None
    if attempt is not None and row.claim_attempt != attempt:
        return None
    if claimed_at is not None and row.claimed_at != claimed_at:
        return None
    row.job_id = row.claimed_at = row.claim_checked_at = row.claim_attempt = None
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
    assert row.owner is not None  # noqa: S101 - sold serials have owners
    await repo.add_ledger_txn(session, *_affixed(serial, row.owner, job_id))
    await session.flush()
    return True


def _affixed(serial: str, owner: str, job_id: uuid.UUID) -> tuple[str, list[repo.Leg]]:
    """The ledger movement of a stamp affixed: out of its owner's unused stamps."""
    memo = f"serial {serial} affixed by job {job_id}"
    return memo, repo.stamp_move(repo.owned_stamps_account(owner), repo.STAMPS_USED, 1)


async def mark_used_batch(
    session: AsyncSession, jobs: Sequence[tuple[uuid.UUID, str]]
) -> dict[str, int]:
    """`mark_used` for many (job, serial) at once: one statement marks and one INSERT records
    the serials whose claim is in order; the rest (a redelivery, a conflict) go one by one.
    Counts by outcome: `used`, `already_used`, `conflict`."""
    jobs = list(dict.fromkeys(jobs))
    marked = await repo.use_claimed_serials(session, jobs)
    await repo.add_ledger_txns(
        session, [_affixed(serial, owner, job_id) for serial, owner, job_id in marked]
    )
    counts = {"used": len(marked), "already_used": 0, "conflict": 0}
    done = {(job_id, serial) for serial, _, job_id in marked}
    for job_id, serial in jobs:
        if (job_id, serial) in done:
            continue
        try:
            first = await mark_used(session, job_id, serial)
        except MeteraiError as exc:
            # Inconsistent with what inventory knows: keep going, but loudly (reconcile finds it).
            log.error("stamping_result_rejected", serial=serial, error=exc.detail)
            counts["conflict"] += 1
            continue
        counts["used" if first else "already_used"] += 1
    return counts


async def rotate_api_key(session: AsyncSession, name: str, *, overlap: timedelta) -> str:
    """A new key for distributor `name`; its current keys keep working for `overlap` more."""
    distributor = await repo.distributor_by_name(session, name)
    if distributor is None:
        raise NotFound(f"No distributor named {name!r}.")
    until = datetime.now(UTC) + overlap
    for key in await repo.api_keys_of(session, distributor.id):
        if key.revoked_at is None and (key.expires_at is None or key.expires_at > until):
            key.expires_at = until
    return await issue_api_key(session, distributor.id)


async def revoke_api_key(session: AsyncSession, name: str, prefix: str) -> int:
    """Revoke the keys of distributor `name` that start with `prefix`; how many were."""
    distributor = await repo.distributor_by_name(session, name)
    if distributor is None:
        raise NotFound(f"No distributor named {name!r}.")
    revoked = 0
    for key in await repo.api_keys_of(session, distributor.id):
        if key.revoked_at is None and key.prefix.startswith(prefix):
            key.revoked_at = datetime.now(UTC)
            revoked += 1
    await session.flush()
    return revoked


async def list_api_keys(session: AsyncSession, name: str) -> list[ApiKey]:
    distributor = await repo.distributor_by_name(session, name)
    if distributor is None:
        raise NotFound(f"No distributor named {name!r}.")
    return await repo.api_keys_of(session, distributor.id)


@dataclass(frozen=True)
class Reconciliation:
    """Where the ledger, the balances and the serials disagree (empty lists: they agree)."""

    discrepancies: list[str]
    needs_attention: list[str]
    totals: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.discrepancies


async def reconcile(session: AsyncSession) -> Reconciliation:
    """Check that every ledger movement balances and that the books match the rows."""
    problems: list[str] = []
    for txn, unit, total in await repo.unbalanced_transactions(session):
        problems.append(f"ledger transaction {txn} does not balance in {unit} (off by {total})")
    totals = await repo.ledger_totals(session)
    money = {account: total for (account, unit), total in totals.items() if unit == "IDR"}
    stamps = {account: total for (account, unit), total in totals.items() if unit == "STAMP"}

    distributors = await repo.all_distributors(session)
    for distributor in distributors:
        booked = money.get(repo.distributor_account(distributor.id), 0)
        if booked != distributor.balance:
            problems.append(
                f"distributor {distributor.name}: balance Rp {distributor.balance:,} but the "
                f"ledger says Rp {booked:,}"
            )
    revenue = await repo.paid_revenue(session)
    if money.get(repo.REVENUE_ACCOUNT, 0) != revenue:
        problems.append(
            f"revenue: paid purchases total Rp {revenue:,} but the ledger says "
            f"Rp {money.get(repo.REVENUE_ACCOUNT, 0):,}"
        )

    counts = await repo.serial_counts_by_owner(session)
    by_state: dict[str, int] = {}
    owned: dict[str, int] = {}
    for (owner, state), count in counts.items():
        by_state[state] = by_state.get(state, 0) + count
        if state == SerialState.sold.value and owner is not None:
            owned[owner] = owned.get(owner, 0) + count
    for account, state in (
        (repo.STAMPS_POOL, "available"),
        (repo.STAMPS_RESERVED, "reserved"),
        (repo.STAMPS_USED, "used"),
    ):
        if stamps.get(account, 0) != by_state.get(state, 0):
            problems.append(
                f"{by_state.get(state, 0)} serials are {state} but {account} holds "
                f"{stamps.get(account, 0)}"
            )
    prefix = repo.owned_stamps_account("")
    booked_owned = {
        account[len(prefix) :]: total
        for account, total in stamps.items()
        if account.startswith(prefix) and total
    }
    for owner in sorted(set(owned) | set(booked_owned)):
        if owned.get(owner, 0) != booked_owned.get(owner, 0):
            problems.append(
                f"{owner} owns {owned.get(owner, 0)} unused serials but the ledger says "
                f"{booked_owned.get(owner, 0)}"
            )
    minted = -stamps.get(repo.STAMPS_MINTED, 0)
    if minted != sum(by_state.values()):
        problems.append(f"{minted} serials were minted but {sum(by_state.values())} exist")
    problems.extend(await repo.inconsistent_serials(session))

    attention = [
        f"payment {event.event_id} ({event.outcome.value}): Rp {event.amount:,} for "
        f"{event.reference} received {event.received_at:%Y-%m-%d %H:%M} - refund or settle"
        for event in await repo.payment_events_needing_attention(session)
    ]
    summary = {
        "serials": sum(by_state.values()),
        **{f"serials_{state}": count for state, count in sorted(by_state.items())},
        "distributors": len(distributors),
        "distributor_balances": sum(d.balance for d in distributors),
        "revenue": revenue,
    }
    return Reconciliation(discrepancies=problems, needs_attention=attention, totals=summary)
