"""Waiting-room routes: the page, join, status, and the operators' controls."""

from __future__ import annotations

import random
from enum import StrEnum
from importlib.resources import files
from typing import Annotated

import jwt
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from services.platform.admission import ADMISSION_COOKIE, AdmissionCodec
from services.platform.errors import MeteraiError
from services.platform.identity import CurrentPrincipal, PrincipalKind
from services.queue.config import QueueSettings
from services.queue.room import Room

router = APIRouter(tags=["waiting room"])
ops = APIRouter(tags=["operations"])

TICKET_HEADER = "X-Queue-Ticket"
_PAGE = files("services.queue").joinpath("page.html").read_text(encoding="utf-8")


class TicketState(StrEnum):
    waiting = "waiting"
    admitted = "admitted"
    paused = "paused"


class TicketStatus(BaseModel):
    state: TicketState
    position: int = Field(description="People ahead of you (0 once admitted).")
    eta_seconds: int | None
    poll_after_seconds: float
    ticket: str = Field(description=f"Send back as the `{TICKET_HEADER}` header (or cookie).")
    admission_token: str | None = Field(
        None,
        description="Once admitted: send as the `X-Admission-Token` header (browsers get a "
        "cookie) to buy and upload.",
    )


class NoTicket(MeteraiError):
    status = 404
    code = "no_ticket"
    title = "No queue ticket"


class OpsForbidden(MeteraiError):
    status = 403
    code = "forbidden"
    title = "Operators only"


class QueueView(BaseModel):
    event: str
    length: int = Field(description="Tickets not yet admitted.")
    admitted: int
    issued: int
    admit_per_minute: int
    paused: bool


class QueuePatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    admit_per_minute: int | None = Field(None, ge=0, le=1_000_000)
    paused: bool | None = None


def _settings(request: Request) -> QueueSettings:
    settings: QueueSettings = request.app.state.settings
    return settings


def _room(request: Request) -> Room:
    room: Room = request.app.state.room
    return room


def _issue(request: Request, number: int) -> str:
    settings = _settings(request)
    return jwt.encode(
        {"ev": settings.event, "n": number},
        settings.internal_secret.get_secret_value(),
        algorithm="HS256",
    )


def _read_ticket(request: Request, header: str | None) -> int | None:
    settings = _settings(request)
    token = header or request.cookies.get(settings.cookie_name)
    if not token:
        return None
    try:
        claims = jwt.decode(
            token, settings.internal_secret.get_secret_value(), algorithms=["HS256"]
        )
    except jwt.PyJWTError:
        return None
    if claims.get("ev") != settings.event or not isinstance(claims.get("n"), int):
        return None
    number: int = claims["n"]
    return number


async def _status(request: Request, response: Response, number: int) -> TicketStatus:
    settings = _settings(request)
    room = _room(request)
    serving = await room.serving(settings.serving_refresh_seconds)
    config = await room.config()
    position = max(0, number - serving)
    rate = max(config.admit_per_minute, 1)
    if position == 0:
        state = TicketState.admitted
    elif config.paused:
        state = TicketState.paused
    else:
        state = TicketState.waiting
    # Poll less often the further back you are, with jitter so clients do not synchronise.
    poll = min(30.0, 2.0 + position / rate * 6) * random.uniform(0.8, 1.2)  # noqa: S311
    token = _issue(request, number)
    response.set_cookie(
        settings.cookie_name,
        token,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        max_age=24 * 3600,
    )
    admission = None
    if state is TicketState.admitted:
        codec: AdmissionCodec = request.app.state.admission_codec
        admission = codec.issue(settings.event, number)
        response.set_cookie(
            ADMISSION_COOKIE,
            admission,
            httponly=True,
            samesite="lax",
            secure=settings.cookie_secure,
            max_age=codec.ttl_seconds,
        )
    return TicketStatus(
        state=state,
        position=position,
        eta_seconds=None if config.paused else round(position / rate * 60),
        poll_after_seconds=round(poll, 1),
        ticket=token,
        admission_token=admission,
    )


@router.get("/", response_class=HTMLResponse, summary="The waiting-room page")
async def page() -> HTMLResponse:
    """The applicant's page (Bahasa Indonesia, English toggle); polls `/queue/status`."""
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})


@router.post("/queue/join", response_model=TicketStatus, summary="Take a place in the queue")
async def join(
    request: Request,
    response: Response,
    ticket: Annotated[str | None, Header(alias=TICKET_HEADER)] = None,
) -> TicketStatus:
    """A queue number; a client that already holds a valid ticket keeps its place."""
    number = _read_ticket(request, ticket)
    if number is None:
        number = await _room(request).join()
    return await _status(request, response, number)


@router.get("/queue/status", response_model=TicketStatus, summary="Where you stand")
async def status(
    request: Request,
    response: Response,
    ticket: Annotated[str | None, Header(alias=TICKET_HEADER)] = None,
) -> TicketStatus:
    """Position, estimated wait and when to poll again."""
    number = _read_ticket(request, ticket)
    if number is None:
        raise NoTicket("Join the queue first (POST /queue/join).")
    return await _status(request, response, number)


def _require_operator(kind: PrincipalKind) -> None:
    if kind is not PrincipalKind.operator:
        raise OpsForbidden("Operators only.")


async def _view(request: Request) -> QueueView:
    snapshot = await _room(request).snapshot()
    return QueueView(
        event=_settings(request).event,
        length=max(0, snapshot.tail - snapshot.serving),
        admitted=min(snapshot.serving, snapshot.tail),
        issued=snapshot.tail,
        admit_per_minute=snapshot.config.admit_per_minute,
        paused=snapshot.config.paused,
    )


@ops.get("/ops/queue", response_model=QueueView, summary="Queue state")
async def get_queue(request: Request, principal: CurrentPrincipal) -> QueueView:
    """Length, admitted so far, admission rate, paused."""
    _require_operator(principal.kind)
    return await _view(request)


@ops.patch("/ops/queue", response_model=QueueView, summary="Change admission")
async def patch_queue(body: QueuePatch, request: Request, principal: CurrentPrincipal) -> QueueView:
    """Pause or resume admission, or change its rate."""
    _require_operator(principal.kind)
    await _room(request).update_config(admit_per_minute=body.admit_per_minute, paused=body.paused)
    return await _view(request)
