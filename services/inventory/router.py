"""Inventory HTTP routes: the public purchase API and internal calls from other services."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive, Scope, Send

from services.inventory import repository as repo
from services.inventory import service
from services.inventory.config import InventorySettings
from services.inventory.models import Purchase, SerialState
from services.inventory.repository import idempotency
from services.inventory.schemas import (
    AuthenticatedDistributor,
    AuthenticateIn,
    BalanceOut,
    ClaimIn,
    ClaimOut,
    PaymentAck,
    PaymentNotification,
    PurchaseCreate,
    PurchaseOut,
    ReleaseIn,
    SerialOut,
    SerialPage,
    StampCounts,
)
from services.platform import signatures
from services.platform.app import read_json_body
from services.platform.db import SessionDep, transaction
from services.platform.errors import Forbidden, MalformedJson, NotFound
from services.platform.idempotency import (
    IDEMPOTENCY_HEADER,
    IdempotencyKey,
    canonical_json,
    request_fingerprint,
)
from services.platform.identity import (
    CallingService,
    CurrentPrincipal,
    Principal,
    PrincipalKind,
    current_principal,
)

router = APIRouter(tags=["purchases"])
internal = APIRouter(prefix="/internal/v1", include_in_schema=False)


def _settings(request: Request) -> InventorySettings:
    settings: InventorySettings = request.app.state.settings
    return settings


def _distributor_id(principal: Principal) -> uuid.UUID:
    if principal.kind is not PrincipalKind.distributor:
        raise Forbidden("This endpoint is for distributors.")
    return uuid.UUID(principal.subject)


def _purchase_out(purchase: Purchase | service.PaidPurchase, serials: list[str]) -> PurchaseOut:
    return PurchaseOut(
        id=purchase.id,
        status=purchase.status,
        quantity=purchase.quantity,
        unit_price=purchase.unit_price,
        amount=purchase.amount,
        serials=serials,
        created_at=purchase.created_at,
        paid_at=purchase.paid_at,
        payment_reference=purchase.payment_reference,
        expires_at=purchase.expires_at,
    )


@router.post(
    "/api/v1/purchases",
    status_code=201,
    response_model=PurchaseOut,
    summary="Buy stamps",
    responses={409: {"description": "`insufficient_balance` or `sold_out`"}},
)
async def create_purchase(
    body: PurchaseCreate,
    principal: CurrentPrincipal,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Distributors: debit the prepaid balance and allocate `quantity` serials, all in one
    transaction. Applicants: reserve serials until the payment (quoting `payment_reference`)
    arrives or `expires_at` passes."""
    settings = _settings(request)
    if principal.kind not in (PrincipalKind.distributor, PrincipalKind.applicant):
        raise Forbidden("Only distributors and admitted applicants buy stamps.")
    if body.quantity > settings.max_quantity_per_purchase:
        raise service.QuantityTooLarge(
            f"At most {settings.max_quantity_per_purchase} stamps per purchase.",
            extra={"max_quantity": settings.max_quantity_per_purchase},
        )
    if principal.kind is PrincipalKind.distributor and idempotency_key is None:
        purchases: service.DistributorPurchases = request.app.state.distributor_purchases
        bought = await purchases.buy(uuid.UUID(principal.subject), body.quantity)
        return _created(_purchase_out(bought.purchase, bought.serials).model_dump_json())
    async with transaction(request.app.state.sessionmaker) as session:
        return await _purchase_in_transaction(session, body, principal, settings, idempotency_key)


async def create_purchase_hot(scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /api/v1/purchases` on the lean lane (see `ServiceApp.add_hot_route`): the route
    above with its parameters resolved by hand, skipping FastAPI's dependency machinery on the
    busiest route of a surge. Same checks, same errors."""
    request = Request(scope, receive)
    principal = await current_principal(request)
    body = await read_json_body(request, PurchaseCreate)
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    response = await create_purchase(body, principal, request, idempotency_key)
    await response(scope, receive, send)


def _created(body: bytes | str, headers: dict[str, str] | None = None) -> Response:
    # Serialised once here: FastAPI would otherwise validate the model again on the way out.
    return Response(body, status_code=201, media_type="application/json", headers=headers)


async def _purchase_in_transaction(
    session: AsyncSession,
    body: PurchaseCreate,
    principal: Principal,
    settings: InventorySettings,
    idempotency_key: str | None,
) -> Response:
    if idempotency_key is not None:
        replay = await idempotency.claim(
            session,
            owner=principal.owner_key,
            key=idempotency_key,
            request_hash=request_fingerprint(
                "POST /api/v1/purchases", canonical_json(body.model_dump())
            ),
        )
        if replay is not None:
            return JSONResponse(
                replay.body, status_code=replay.status_code, headers={"Idempotent-Replayed": "true"}
            )
    if principal.kind is PrincipalKind.distributor:
        result = await service.purchase_for_distributor(
            session,
            distributor_id=uuid.UUID(principal.subject),
            quantity=body.quantity,
            unit_price=settings.stamp_price_rupiah,
        )
    else:
        result = await service.reserve_for_applicant(
            session,
            applicant=principal.owner_key,
            quantity=body.quantity,
            unit_price=settings.stamp_price_rupiah,
            max_stamps=settings.applicant_max_stamps,
            ttl=timedelta(seconds=settings.reservation_ttl_seconds),
        )
    if isinstance(result.purchase, Purchase) and result.purchase.created_at is None:
        # A reservation is an ORM object, its server-set time not loaded yet.
        await session.refresh(result.purchase, ["created_at"])
    out = _purchase_out(result.purchase, result.serials)
    if idempotency_key is not None:
        await idempotency.record(
            session,
            owner=principal.owner_key,
            key=idempotency_key,
            status_code=201,
            body=out.model_dump(mode="json"),
        )
    return _created(out.model_dump_json())


@router.post(
    "/api/v1/payments/notify",
    response_model=PaymentAck,
    summary="Payment provider callback",
    tags=["payments"],
    responses={401: {"description": "`invalid_signature`"}},
)
async def payment_notification(request: Request, session: SessionDep) -> PaymentAck:
    """The provider reports a payment, signed with HMAC-SHA256 in `X-Signature`
    (`t=<unix>,v1=<hex of HMAC(secret, "<t>.<body>")>`). Marks the purchase paid exactly once;
    repeats are harmless and late or unexpected payments are kept for operators."""
    settings = _settings(request)
    body = await request.body()
    signatures.verify(
        settings.payment_secret.get_secret_value(),
        body,
        request.headers.get(signatures.SIGNATURE_HEADER),
        tolerance=settings.payment_tolerance_seconds,
    )
    try:
        payload = json.loads(body)
        notification = PaymentNotification.model_validate(payload)
    except json.JSONDecodeError as exc:
        raise MalformedJson("The body is not valid JSON.") from exc
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    outcome = await service.apply_payment(
        session,
        service.PaymentNotice(
            event_id=notification.event_id,
            reference=notification.reference,
            amount=notification.amount,
            status=notification.status,
            payload=payload,
        ),
        provider=settings.payment_provider,
    )
    return PaymentAck(outcome=outcome)


@router.get("/api/v1/purchases/{purchase_id}", response_model=PurchaseOut, summary="A purchase")
async def get_purchase(
    purchase_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> PurchaseOut:
    """The purchase and its serials (404 for purchases of other callers)."""
    purchase = await repo.get_purchase(session, purchase_id)
    if purchase is None or purchase.owner != principal.owner_key:
        raise NotFound("No such purchase.")
    return _purchase_out(purchase, await repo.serials_of_purchase(session, purchase_id))


@router.get("/api/v1/balance", response_model=BalanceOut, summary="Balance and stamp counts")
async def get_balance(
    principal: CurrentPrincipal, session: SessionDep, request: Request
) -> BalanceOut:
    """The prepaid balance and how many stamps are reserved, unused and used."""
    distributor = await repo.get_distributor(session, _distributor_id(principal))
    if distributor is None:
        raise NotFound("No such distributor.")
    counts = await repo.serial_counts(session, owner=principal.owner_key)
    return BalanceOut(
        distributor_id=distributor.id,
        name=distributor.name,
        balance=distributor.balance,
        stamp_price=_settings(request).stamp_price_rupiah,
        stamps=StampCounts(reserved=counts["reserved"], sold=counts["sold"], used=counts["used"]),
    )


@router.get("/api/v1/serials", response_model=SerialPage, summary="Your serials")
async def list_serials(
    principal: CurrentPrincipal,
    session: SessionDep,
    state: SerialState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(pattern=r"^[0-9A-Z]{22}$")] = None,
) -> SerialPage:
    """Serials owned by the caller, optionally in one state, in pages ordered by serial."""
    rows = await repo.list_serials(
        session, owner=principal.owner_key, state=state, limit=limit, after=after
    )
    items = [
        SerialOut(
            serial=row.serial,
            state=row.state,
            purchase_id=row.purchase_id,
            job_id=row.job_id,
            sold_at=row.sold_at,
            used_at=row.used_at,
        )
        for row in rows
    ]
    return SerialPage(items=items, next_cursor=items[-1].serial if len(items) == limit else None)


@internal.post("/authenticate", response_model=AuthenticatedDistributor)
async def authenticate(
    body: AuthenticateIn, _: CallingService, request: Request
) -> AuthenticatedDistributor:
    """The gateway asks who holds an API key (by its hash). On its own small pool: under a
    surge the main pool has a queue of purchases, and no purchase can start before its
    buyer's key is known."""
    async with transaction(request.app.state.auth_sessionmaker) as session:
        distributor = await repo.distributor_by_key_hash(session, body.key_hash)
    if distributor is None:
        raise service.InvalidApiKey("Unknown or revoked API key.")
    return AuthenticatedDistributor(distributor_id=distributor.id, name=distributor.name)


@internal.post("/serials/claim", response_model=ClaimOut)
async def claim_serial(body: ClaimIn, _: CallingService, session: SessionDep) -> ClaimOut:
    """Stamping reserves an owned, unused serial for a job (idempotent per job)."""
    serial = await service.claim_serial(
        session, owner=body.owner, job_id=body.job_id, serial=body.serial, attempt=body.attempt
    )
    return ClaimOut(serial=serial)


@internal.post("/serials/release", status_code=204)
async def release_serial(body: ReleaseIn, _: CallingService, session: SessionDep) -> None:
    """Stamping gives back the serial of a job that will not run."""
    await service.release_serial(session, body.job_id, attempt=body.attempt)
