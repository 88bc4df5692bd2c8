"""Waiting-room routes: join, status, and the operators' controls (pages: `pages.py`).

Join and status carry the surge, so they are served on the lean lane (`join_hot`,
`status_hot`, registered in `services.queue.app`); the FastAPI routes of the same paths do the
same through FastAPI (and document them). Status answers from the replica's cached view of the
room: waiting people cost no network I/O at all.
"""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.requests import cookie_parser
from starlette.types import Receive, Scope, Send

from services.platform.admission import ADMISSION_COOKIE, AdmissionCodec
from services.platform.errors import MeteraiError
from services.platform.identity import CurrentPrincipal, PrincipalKind
from services.queue.config import QueueSettings
from services.queue.room import Arrival, Room, RoomView
from services.queue.tickets import ProofOfWork, Ticket, TicketCodec

router = APIRouter(tags=["waiting room"])
ops = APIRouter(tags=["operations"])

TICKET_HEADER = "X-Queue-Ticket"
PROOF_HEADER = "X-Queue-Proof"
# Nobody should wait longer than this between two polls (tickets expire after a few misses).
MAX_POLL_SECONDS = 30.0


class TicketState(StrEnum):
    prequeue = "prequeue"
    waiting = "waiting"
    admitted = "admitted"
    paused = "paused"


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


class NoTicket(MeteraiError):
    status = 404
    code = "no_ticket"
    title = "No queue ticket"


class TicketExpired(MeteraiError):
    status = 410
    code = "ticket_expired"
    title = "Queue ticket expired"


class JoinLimited(MeteraiError):
    status = 429
    code = "join_limited"
    title = "Too many joins from your address"


class ProofRequired(MeteraiError):
    status = 428
    code = "pow_required"
    title = "Proof of work required"


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


def _settings(app: Any) -> QueueSettings:
    settings: QueueSettings = app.state.settings
    return settings


def _room(app: Any) -> Room:
    room: Room = app.state.room
    return room


# The lean lane.


async def status_hot(scope: Scope, receive: Receive, send: Send) -> None:
    """`GET /queue/status` on the lean lane (see `status`)."""
    await _send_json(send, *await _status_of(scope["app"], scope))


async def join_hot(scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /queue/join` on the lean lane (see `join`)."""
    await _send_json(send, *await _join(scope["app"], scope))


async def _status_of(app: Any, scope: Scope) -> tuple[dict[str, Any], list[str]]:
    ticket = _ticket_of(app, scope)
    if ticket is None:
        raise NoTicket("Join the queue first (POST /queue/join).")
    return await _status(app, ticket)


async def _join(app: Any, scope: Scope) -> tuple[dict[str, Any], list[str]]:
    ticket = _ticket_of(app, scope)
    cookies: list[str] = []
    if ticket is not None:
        try:
            return await _status(app, ticket)
        except TicketExpired:
            ticket = None  # the place lapsed: joining again starts at the back
    if ticket is None:
        room = _room(app)
        difficulty = room.view.config.pow_difficulty
        if difficulty:
            _require_proof(app, scope, difficulty)
        joined = await room.join(Arrival(client_ip=_client_ip(scope)))
        if joined.limited:
            window = room.join_limit_window_seconds
            raise JoinLimited(
                "Too many joins from your network; wait a little.",
                headers={"Retry-After": str(window)},
            )
        codec: TicketCodec = app.state.ticket_codec
        if joined.number is not None:
            ticket = Ticket(number=joined.number)
            token = codec.issue(joined.number)
        else:
            ticket = Ticket(prequeue_id=joined.prequeue_id)
            token = codec.issue_prequeue(str(joined.prequeue_id))
        cookies.append(_ticket_cookie(app, token))
    status, more = await _status(app, ticket)
    return status, cookies + more


async def _status(app: Any, ticket: Ticket) -> tuple[dict[str, Any], list[str]]:
    room = _room(app)
    codec: TicketCodec = app.state.ticket_codec
    view = room.view
    cookies: list[str] = []
    number = ticket.number
    if number is None:
        opens_at = view.config.opens_at
        opens_in = None if opens_at is None else opens_at - time.time()
        if opens_in is not None and opens_in > 0:
            return _body(
                TicketState.prequeue,
                0,
                None,
                _jitter(min(MAX_POLL_SECONDS, max(1.0, opens_in / 2))),
                codec.issue_prequeue(str(ticket.prequeue_id)),
                opens_in=opens_in,
            ), cookies
        number = await room.drawn_number(str(ticket.prequeue_id))
        if number is None:  # the draw happens within a second of the opening
            token = codec.issue_prequeue(str(ticket.prequeue_id))
            return _body(TicketState.prequeue, 0, None, 1.0, token, opens_in=0), cookies
        cookies.append(_ticket_cookie(app, codec.issue(number)))
    token = codec.issue(number)
    if number > view.serving:
        room.note_seen(number)
        position = number - view.serving
        if view.config.paused:
            # Paused: a resume should reach everyone within seconds, not a whole poll cycle.
            return _body(TicketState.paused, position, None, _jitter(5.0), token), cookies
        eta = position / view.expected_rate_per_second()
        poll = _jitter(min(MAX_POLL_SECONDS, max(2.0, eta / 10)))
        return _body(TicketState.waiting, position, round(eta), poll, token), cookies
    if not await room.is_active(number):
        raise TicketExpired(
            "Your place lapsed because the page stopped asking for a while; join again."
        )
    room.note_seen(number)  # keeps the session active
    admission_codec: AdmissionCodec = app.state.admission_codec
    credential = admission_codec.issue(_settings(app).event, number)
    cookies.append(_cookie(app, ADMISSION_COOKIE, credential, admission_codec.ttl_seconds))
    poll = _jitter(min(MAX_POLL_SECONDS, admission_codec.ttl_seconds / 3))
    return _body(TicketState.admitted, 0, 0, poll, token, admission=credential), cookies


def _body(
    state: TicketState,
    position: int,
    eta: int | None,
    poll: float,
    ticket: str,
    *,
    admission: str | None = None,
    opens_in: float | None = None,
) -> dict[str, Any]:
    return {
        "state": state.value,
        "position": position,
        "eta_seconds": eta,
        "poll_after_seconds": round(poll, 1),
        "ticket": ticket,
        "admission_token": admission,
        "opens_in_seconds": None if opens_in is None else max(0, round(opens_in)),
    }


def _jitter(seconds: float) -> float:
    # Jitter so that clients do not synchronise their polls.
    return seconds * random.uniform(0.8, 1.2)  # noqa: S311 - not for security


def _ticket_of(app: Any, scope: Scope) -> Ticket | None:
    codec: TicketCodec = app.state.ticket_codec
    cookie_name = _settings(app).cookie_name
    token = None
    for name, value in scope["headers"]:
        if name == b"x-queue-ticket":
            token = value.decode("latin-1")
            break
        if name == b"cookie" and token is None:
            token = cookie_parser(value.decode("latin-1")).get(cookie_name)
    return codec.read(token) if token else None


def _client_ip(scope: Scope) -> str:
    # Behind the gateway, the last X-Forwarded-For entry is the address the gateway saw.
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            forwarded: str = value.decode("latin-1")
            return forwarded.rsplit(",", 1)[-1].strip()[:64]
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _require_proof(app: Any, scope: Scope, difficulty: int) -> None:
    pow_: ProofOfWork = app.state.proof_of_work
    for name, value in scope["headers"]:
        if name == PROOF_HEADER.lower().encode() and pow_.check(
            value.decode("latin-1"), difficulty
        ):
            return
    raise ProofRequired(
        f"Solve the challenge: find a nonce such that SHA-256 of '<challenge>:<nonce>' starts "
        f"with {difficulty} zero bits, and send '<challenge>:<nonce>' as {PROOF_HEADER}.",
        extra={"challenge": pow_.challenge(difficulty), "difficulty": difficulty},
    )


def _ticket_cookie(app: Any, token: str) -> str:
    return _cookie(app, _settings(app).cookie_name, token, 24 * 3600)


def _cookie(app: Any, name: str, value: str, max_age: int) -> str:
    secure = "; Secure" if _settings(app).cookie_secure else ""
    return f"{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}"


async def _send_json(send: Send, body: dict[str, Any], cookies: list[str]) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers += [(b"set-cookie", cookie.encode("latin-1")) for cookie in cookies]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


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
    return _json_response(*await _status_of(request.app, request.scope))


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
        event=_settings(request.app).event,
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
    return _view(request, await _room(request.app).refresh())


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
    room = _room(request.app)
    await room.update_config(**changes)
    return _view(request, room.view)
