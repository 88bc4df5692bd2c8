"""Waiting-room routes: join, status, and the operators' controls (pages: `pages.py`).

Join and status carry the surge, so they are served on the lean lane (`join_hot`,
`status_hot`, registered in `services.queue.app`); the FastAPI routes of the same paths do the
same through FastAPI (and document them). Both call `services.queue.service`, which the pages
without JavaScript call too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from services.platform.direct import Answer, json_answer
from services.platform.errors import MeteraiError
from services.platform.identity import CurrentPrincipal, PrincipalKind
from services.queue import service
from services.queue.room import RoomView
from services.queue.service import PROOF_HEADER, TICKET_HEADER, Reply, TicketState

router = APIRouter(tags=["waiting room"])
ops = APIRouter(tags=["operations"])


class TicketStatus(BaseModel):
    state: TicketState
    position: int = Field(
        description="Your place in the line, 1 = next (0 once admitted or before opening)."
    )
    eta_seconds: int | None = Field(description="Estimated wait; null when unknown or paused.")
    poll_after_seconds: float = Field(description="Ask again after this long, not sooner.")
    ticket: str = Field(description=f"Send back as the `{TICKET_HEADER}` header (or cookie).")
    admission_token: str | None = Field(
        None,
        description="Once admitted: send as the `X-Admission-Token` header (browsers get a "
        "cookie) to buy and upload.",
    )
    opens_in_seconds: int | None = Field(
        None, description="Before the sale opens: seconds until it does (pre-queue)."
    )


class OpsForbidden(MeteraiError):
    status = 403
    code = "forbidden"
    title = "Operators only"


class QueueView(BaseModel):
    event: str
    length: int = Field(description="Tickets not yet admitted.")
    admitted: int = Field(description="Admitted so far.")
    active: int = Field(description="Admitted sessions still active.")
    issued: int = Field(description="Queue numbers handed out.")
    prequeue: int = Field(description="Waiting for the opening.")
    admit_per_minute: int
    effective_per_minute: float = Field(description="The rate the backend's pressure allows.")
    measured_per_minute: float = Field(description="Admissions over the last minute.")
    max_active: int
    paused: bool
    opens_at: AwareDatetime | None
    pow_difficulty: int


class QueuePatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    admit_per_minute: int | None = Field(None, ge=0, le=1_000_000)
    max_active: int | None = Field(None, ge=0, le=100_000_000)
    paused: bool | None = None
    opens_at: AwareDatetime | None = Field(
        None,
        strict=False,  # an ISO 8601 string in JSON
        description="When the sale opens (ISO 8601 with offset); null removes it.",
    )
    pow_difficulty: int | None = Field(None, ge=0, le=28)


# The lean lane.


async def status_hot(scope: Scope, receive: Receive, send: Send) -> None:
    """`GET /queue/status` on the lean lane (see `status`)."""
    room = service.waiting_room_of(scope["app"])
    await _send_json(send, *await room.status(room.ticket_of(scope)))


async def join_hot(scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /queue/join` on the lean lane (see `join`)."""
    await _send_json(send, *await _join(scope["app"], scope))


async def _join(app: Any, scope: Scope) -> Reply:
    room = service.waiting_room_of(app)
    return await room.join(
        room.ticket_of(scope),
        client_ip=service.client_ip(scope, room.settings.trusted_proxy_hops),
        proof=service.proof_of(scope),
    )


def status_direct(scope: Scope) -> Answer | None:
    """`GET /queue/status` answered by the server itself when the room's memory suffices
    (see `ServiceApp.add_direct_route`); otherwise (no ticket, admitted, the draw) None, and
    `status_hot` answers."""
    room = service.waiting_room_of(scope["app"])
    ticket = room.ticket_of(scope)
    reply = None if ticket is None else room.status_now(ticket)
    return None if reply is None else _json_answer(*reply)


async def join_direct(scope: Scope) -> Answer:
    """`POST /queue/join` answered by the server itself (see `ServiceApp.add_direct_route`):
    the same join as `join_hot`, its errors the same problem documents."""
    return _json_answer(*await _join(scope["app"], scope))


async def _send_json(send: Send, body: dict[str, Any], cookies: list[str]) -> None:
    answer = _json_answer(body, cookies)
    await send({"type": "http.response.start", "status": 200, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})


def _json_answer(body: dict[str, Any], cookies: list[str]) -> Answer:
    return json_answer(body, [(b"set-cookie", cookie.encode("latin-1")) for cookie in cookies])


# FastAPI routes: the same join and status (documented), and operations.


@router.post(
    "/queue/join",
    response_model=TicketStatus,
    summary="Take a place in the queue",
    responses={
        428: {"description": "`pow_required`: solve the challenge it carries, then join"},
        429: {"description": "`join_limited`: too many joins from this address"},
    },
)
async def join(
    request: Request,
    ticket: Annotated[str | None, Header(alias=TICKET_HEADER)] = None,
    proof: Annotated[str | None, Header(alias=PROOF_HEADER)] = None,
) -> JSONResponse:
    """A queue number (or, before the opening, a pre-queue place drawn in random order at
    the opening); a client that already holds a valid ticket keeps its place. Limited per
    address (429 `join_limited`); when operators ask for it, a proof of work first (428
    `pow_required` carries the challenge)."""
    return _json_response(*await _join(request.app, request.scope))


@router.get(
    "/queue/status",
    response_model=TicketStatus,
    summary="Where you stand",
    responses={
        404: {"description": "`no_ticket`: join the queue first"},
        410: {"description": "`ticket_expired`: the ticket was not polled for too long"},
    },
)
async def status(
    request: Request,
    ticket: Annotated[str | None, Header(alias=TICKET_HEADER)] = None,
) -> JSONResponse:
    """Position, estimated wait and when to poll again (410 `ticket_expired` if the ticket
    was not polled for too long)."""
    room = service.waiting_room_of(request.app)
    return _json_response(*await room.status(room.ticket_of(request.scope)))


def _json_response(body: dict[str, Any], cookies: list[str]) -> JSONResponse:
    response = JSONResponse(body, headers={"Cache-Control": "no-store"})
    for cookie in cookies:
        response.raw_headers.append((b"set-cookie", cookie.encode("latin-1")))
    return response


def _require_operator(kind: PrincipalKind) -> None:
    if kind is not PrincipalKind.operator:
        raise OpsForbidden("Operators only.")


def _view(request: Request, view: RoomView) -> QueueView:
    config = view.config
    return QueueView(
        event=service.waiting_room_of(request.app).settings.event,
        length=view.length,
        admitted=view.admitted_total,
        active=view.active,
        issued=view.tail,
        prequeue=view.prequeue,
        admit_per_minute=config.admit_per_minute,
        effective_per_minute=round(config.admit_per_minute * view.factor, 1),
        measured_per_minute=round(view.rate_per_minute, 1),
        max_active=config.max_active,
        paused=config.paused,
        opens_at=None if config.opens_at is None else datetime.fromtimestamp(config.opens_at, UTC),
        pow_difficulty=config.pow_difficulty,
    )


@ops.get("/ops/queue", response_model=QueueView, summary="Queue state")
async def get_queue(request: Request, principal: CurrentPrincipal) -> QueueView:
    """Length, admitted, active sessions, rates, and the run-time settings."""
    _require_operator(principal.kind)
    with service.room_reachable:
        return _view(request, await service.waiting_room_of(request.app).room.refresh())


@ops.patch("/ops/queue", response_model=QueueView, summary="Change admission")
async def patch_queue(body: QueuePatch, request: Request, principal: CurrentPrincipal) -> QueueView:
    """Pause or resume, change the rate, the active limit, the opening time or the proof of
    work asked of joiners."""
    _require_operator(principal.kind)
    changes = {
        name: value
        for name, value in body.model_dump(exclude_unset=True).items()
        if value is not None or name == "opens_at"  # null removes the opening time only
    }
    if changes.get("opens_at") is not None:
        changes["opens_at"] = changes["opens_at"].timestamp()
    room = service.waiting_room_of(request.app).room
    with service.room_reachable:
        await room.update_config(**changes)
    return _view(request, room.view)
