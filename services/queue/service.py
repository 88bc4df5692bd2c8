"""What the waiting room answers a ticket holder: join and status.

The JSON routes (both lanes, `router.py`) and the pages without JavaScript (`pages.py`) ask
the same `WaitingRoom`. An answer is a TicketStatus body plus the cookies to set; refusals are
raised as `MeteraiError`s. Status answers from the replica's cached view of the room, so
waiting people cost no network I/O at all.
"""

from __future__ import annotations

import random
import time
from enum import StrEnum
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import cookie_parser
from starlette.types import Scope

from services.platform.admission import ADMISSION_COOKIE, AdmissionCodec
from services.platform.errors import MeteraiError, ServiceUnavailable
from services.platform.http import forwarded_client
from services.queue.config import QueueSettings
from services.queue.room import Arrival, Room
from services.queue.tickets import ProofOfWork, Ticket, TicketCodec

TICKET_HEADER = "X-Queue-Ticket"
PROOF_HEADER = "X-Queue-Proof"
# Nobody should wait longer than this between two polls (tickets expire after a few misses).
MAX_POLL_SECONDS = 30.0

_TICKET_HEADER = TICKET_HEADER.lower().encode()
_PROOF_HEADER = PROOF_HEADER.lower().encode()

# A TicketStatus body and the Set-Cookie values that go with it.
Reply = tuple[dict[str, Any], list[str]]


class TicketState(StrEnum):
    prequeue = "prequeue"
    waiting = "waiting"
    admitted = "admitted"
    paused = "paused"


class RoomUnavailable(ServiceUnavailable):
    code = "room_unavailable"
    title = "The waiting room is briefly unavailable"


class _RoomReachable:
    """`with room_reachable:` the room's store (Redis) failing is a 503 with Retry-After:
    places are kept there, and the page tries again by itself. (A class, not a generator:
    it wraps every status poll.)"""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, aioredis.RedisError | OSError):
            raise RoomUnavailable(
                "The waiting room cannot be reached for a moment; your place is kept. "
                "Try again shortly.",
                retry_after=2,
            ) from exc


room_reachable = _RoomReachable()


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


class WaitingRoom:
    """Join and status for one event, as every caller sees them: both lanes of the JSON
    routes and the pages without JavaScript. Built in the app's lifespan
    (`app.state.waiting_room`), with what it needs at hand: status is the hottest call of a
    surge, and each lookup it saves is a share of its cost."""

    def __init__(
        self,
        room: Room,
        settings: QueueSettings,
        *,
        tickets: TicketCodec,
        admissions: AdmissionCodec,
        proof_of_work: ProofOfWork,
    ) -> None:
        self.room = room
        self.settings = settings
        self.tickets = tickets
        self.admissions = admissions
        self.proof_of_work = proof_of_work
        self._secure = "; Secure" if settings.cookie_secure else ""

    def read_ticket(self, token: str | None) -> Ticket | None:
        """The ticket in `token` (a header or cookie value), or None for none or a bad one."""
        return self.tickets.read(token) if token else None

    def ticket_of(self, scope: Scope) -> Ticket | None:
        """The caller's ticket: the `X-Queue-Ticket` header, else the ticket cookie."""
        token = None
        for name, value in scope["headers"]:
            if name == _TICKET_HEADER:
                token = value.decode("latin-1")
                break
            if name == b"cookie" and token is None:
                token = cookie_parser(value.decode("latin-1")).get(self.settings.cookie_name)
        return self.read_ticket(token)

    async def status(self, ticket: Ticket | None) -> Reply:
        """Where `ticket` stands: position, estimated wait, when to poll again, and once
        admitted the admission credential (renewed on every poll while the session is
        active)."""
        if ticket is None:
            raise NoTicket("Join the queue first (POST /queue/join).")
        with room_reachable:
            return await self._status(ticket)

    async def join(self, ticket: Ticket | None, *, client_ip: str, proof: str | None) -> Reply:
        """A place in the queue, or the status of `ticket` if it still holds one (a refresh or
        a second tab keeps the place; an expired ticket joins again, at the back)."""
        with room_reachable:
            return await self._join(ticket, client_ip=client_ip, proof=proof)

    async def _join(self, ticket: Ticket | None, *, client_ip: str, proof: str | None) -> Reply:
        cookies: list[str] = []
        if ticket is not None:
            try:
                return await self._status(ticket)
            except TicketExpired:
                ticket = None  # the place lapsed: joining again starts at the back
        if ticket is None:
            room = self.room
            difficulty = room.view.config.pow_difficulty
            if difficulty:
                self._require_proof(proof, difficulty)
            joined = await room.join(Arrival(client_ip=client_ip))
            if joined.limited:
                window = room.join_limit_window_seconds
                raise JoinLimited(
                    "Too many joins from your network; wait a little.",
                    headers={"Retry-After": str(window)},
                )
            if joined.number is not None:
                token = self.tickets.issue(joined.number)
                ticket = Ticket(number=joined.number, token=token)
            else:
                token = self.tickets.issue_prequeue(str(joined.prequeue_id))
                ticket = Ticket(prequeue_id=joined.prequeue_id, token=token)
            cookies.append(self._ticket_cookie(token))
        body, more = await self._status(ticket)
        return body, cookies + more

    def status_now(self, ticket: Ticket) -> Reply | None:
        """Where `ticket` stands, when that needs nothing from the store (waiting, paused, the
        countdown before the opening: almost every poll), else None."""
        view = self.room.view
        number = ticket.number
        if number is None:
            opens_at = view.config.opens_at
            opens_in = None if opens_at is None else opens_at - time.time()
            if opens_in is None or opens_in <= 0:
                return None  # the draw: its number is in the store
            token = ticket.token or self.tickets.issue_prequeue(str(ticket.prequeue_id))
            poll = _jitter(min(MAX_POLL_SECONDS, max(1.0, opens_in / 2)))
            return _body(TicketState.prequeue, 0, None, poll, token, opens_in=opens_in), []
        if number > view.serving:
            return self._waiting(number, ticket.token or self.tickets.issue(number)), []
        return None  # admitted: whether its session is still active is in the store

    def _waiting(self, number: int, token: str) -> dict[str, Any]:
        room = self.room
        view = room.view
        room.note_seen(number)
        position = number - view.serving
        if view.config.paused:
            # Paused: a resume should reach everyone within seconds, not a whole poll cycle.
            return _body(TicketState.paused, position, None, _jitter(5.0), token)
        eta = position / view.expected_rate_per_second()
        poll = _jitter(min(MAX_POLL_SECONDS, max(2.0, eta / 10)))
        return _body(TicketState.waiting, position, round(eta), poll, token)

    async def _status(self, ticket: Ticket) -> Reply:
        now = self.status_now(ticket)
        if now is not None:
            return now
        room = self.room
        cookies: list[str] = []
        number = ticket.number
        if number is None:
            number = await room.drawn_number(str(ticket.prequeue_id))
            if number is None:  # the draw happens within a second of the opening
                token = ticket.token or self.tickets.issue_prequeue(str(ticket.prequeue_id))
                body = _body(TicketState.prequeue, 0, None, 1.0, token, opens_in=0)
                return body, cookies
            token = self.tickets.issue(number)
            cookies.append(self._ticket_cookie(token))
            if number > room.view.serving:
                return self._waiting(number, token), cookies
        else:
            token = ticket.token or self.tickets.issue(number)
        if not await room.is_active(number):
            raise TicketExpired(
                "Your place lapsed because the page stopped asking for a while; join again."
            )
        room.note_seen(number)  # keeps the session active
        admissions = self.admissions
        credential = admissions.issue(self.settings.event, number)
        cookies.append(self._cookie(ADMISSION_COOKIE, credential, admissions.keep_seconds))
        poll = _jitter(min(MAX_POLL_SECONDS, admissions.ttl_seconds / 3))
        return _body(TicketState.admitted, 0, 0, poll, token, admission=credential), cookies

    def _require_proof(self, proof: str | None, difficulty: int) -> None:
        pow_ = self.proof_of_work
        if proof is not None and pow_.check(proof, difficulty):
            return
        raise ProofRequired(
            f"Solve the challenge: find a nonce such that SHA-256 of '<challenge>:<nonce>' "
            f"starts with {difficulty} zero bits, and send '<challenge>:<nonce>' as "
            f"{PROOF_HEADER}.",
            extra={"challenge": pow_.challenge(difficulty), "difficulty": difficulty},
        )

    def _ticket_cookie(self, token: str) -> str:
        return self._cookie(self.settings.cookie_name, token, 24 * 3600)

    def _cookie(self, name: str, value: str, max_age: int) -> str:
        return f"{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{self._secure}"


def waiting_room_of(app: Any) -> WaitingRoom:
    waiting_room: WaitingRoom = app.state.waiting_room
    return waiting_room


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
        "state": state,  # a str; its value in JSON
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


def proof_of(scope: Scope) -> str | None:
    """The proof of work the caller sent (`X-Queue-Proof`), if any."""
    for name, value in scope["headers"]:
        if name == _PROOF_HEADER:
            return str(value.decode("latin-1"))
    return None


def client_ip(scope: Scope, trusted_hops: int = 1) -> str:
    """The caller's address: the X-Forwarded-For entry `trusted_hops` from the end (1: the
    address the gateway saw; 2: the one a load balancer in front of the gateway saw), else
    the peer."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    forwarded = next(
        (value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"),
        None,
    )
    return forwarded_client(peer, forwarded, trusted_hops)
