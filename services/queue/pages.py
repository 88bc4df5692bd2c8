"""The applicant's pages: the waiting room (`/`), its twin for browsers without JavaScript
(`/queue/page`), the purchase page (`/beli`) and their static files (`/static/...`).

The waiting-room page is the same for everyone (rendered once per language); its script polls
the JSON routes. The page without JavaScript is rendered from the very same answers: it calls
the functions behind those routes (`services.queue.service`) and shows their TicketStatus, or
the problem document of their refusal, as the JSON routes would send it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlencode

import jinja2
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.platform.admission import ADMISSION_COOKIE, InvalidAdmission
from services.platform.errors import MeteraiError, NotFound, problem_body
from services.queue import service
from services.queue.config import QueueSettings
from services.queue.texts import TEXTS, language
from services.queue.tickets import Ticket

log = structlog.get_logger(__name__)

pages = APIRouter(tags=["pages"])

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
_HTML_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# The room page is the same for everyone: a shared cache (CDN) may keep it briefly.
_ROOM_CACHE = "public, max-age=30"
# Pages that depend on the caller's cookies are never stored.
_PRIVATE_CACHE = "no-store"
_STATIC_CACHE = "public, max-age=31536000, immutable"  # URLs carry the content's hash
_MEDIA_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Seconds before a page without JavaScript moves on from "it's your turn" to the purchase page.
_ADMITTED_PAUSE_SECONDS = 3
_PROBLEM_REFRESH_SECONDS = 10


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str


@cache
def _assets() -> dict[str, Asset]:
    """The static files, read once (they ship inside the package)."""
    assets = {}
    for entry in files("services.queue").joinpath("static").iterdir():
        media_type = _MEDIA_TYPES.get(PurePosixPath(entry.name).suffix)
        if media_type is not None and entry.is_file():
            body = entry.read_bytes()
            version = hashlib.sha256(body).hexdigest()[:12]
            assets[entry.name] = Asset(body, media_type, version)
    return assets


def asset_url(name: str) -> str:
    """A static file's URL, versioned by its content so that it can be cached for good."""
    return f"/static/{name}?v={_assets()[name].version}"


@cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("services.queue", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals.update(asset=asset_url, texts=TEXTS)
    environment.filters["fill"] = lambda text, **values: fill(text, values)
    return environment


def fill(text: str, values: Mapping[str, Any]) -> str:
    """`text` with its `{name}` placeholders filled in (unknown ones are left as they are)."""
    return _PLACEHOLDER.sub(
        lambda match: str(values[match[1]]) if match[1] in values else match[0], text
    )


def _number(value: int, lang: str) -> str:
    grouped = f"{value:,}"
    return grouped.replace(",", ".") if lang == "id" else grouped


def duration_text(seconds: float | None, lang: str) -> str:
    """A wait in human terms ("sekitar 12 menit"), as the page's script words it too."""
    t = TEXTS[lang]
    if seconds is None:
        return t["eta_unknown"]
    if seconds < 60:
        return t["eta_under_minute"]
    minutes = round(seconds / 60)
    if minutes < 60:
        return fill(t["eta_minutes"], {"m": minutes})
    return fill(t["eta_hours"], {"h": minutes // 60, "m": minutes % 60})


def problem_text(problem: Mapping[str, Any], lang: str) -> str:
    """A problem document in plain language: our wording for its `code`, else its `detail`."""
    t = TEXTS[lang]
    wording = t.get(f"err_{problem.get('code')}")
    if wording is not None:
        return fill(wording, problem)
    return fill(t["err_generic"], {"detail": problem.get("detail") or problem.get("title", "")})


def _render(
    template: str,
    lang: str,
    *,
    status_code: int = 200,
    cache_control: str = _PRIVATE_CACHE,
    **context: Any,
) -> HTMLResponse:
    other = "en" if lang == "id" else "id"
    body = (
        _templates().get_template(template).render(lang=lang, other=other, t=TEXTS[lang], **context)
    )
    return HTMLResponse(
        body,
        status_code=status_code,
        headers={**_HTML_HEADERS, "Cache-Control": cache_control},
    )


@cache
def _room_page(lang: str) -> bytes:
    return bytes(_render("room.html", lang).body)


@pages.get("/", response_class=HTMLResponse, summary="The waiting-room page")
async def room_page(lang: str | None = None) -> HTMLResponse:
    """The applicant's page (Bahasa Indonesia; `?lang=en` for English). Its script joins,
    polls `/queue/status` as told by `poll_after_seconds`, and leads to `/beli` when admitted;
    without JavaScript it sends the browser to `/queue/page`."""
    return HTMLResponse(
        _room_page(language(lang)), headers={**_HTML_HEADERS, "Cache-Control": _ROOM_CACHE}
    )


@dataclass(frozen=True)
class RoomAnswer:
    """One answer of the room's JSON routes: a TicketStatus or a problem document."""

    status_code: int
    body: dict[str, Any]
    set_cookies: list[str]
    retry_after: int | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def code(self) -> str | None:
        code = self.body.get("code")
        return None if self.ok or not isinstance(code, str) else code


async def _ask_room(ask: Awaitable[service.Reply]) -> RoomAnswer:
    """The room's answer as its JSON routes would send it: a TicketStatus, or the problem
    document of a refusal or of a failure."""
    try:
        body, cookies = await ask
    except MeteraiError as exc:
        retry_after = exc.headers.get("Retry-After", "")
        return RoomAnswer(
            status_code=exc.status,
            body=problem_body(exc.status, exc.code, exc.title, exc.detail, **exc.extra),
            set_cookies=[],
            retry_after=int(retry_after) if retry_after.isdigit() else None,
        )
    except Exception as exc:
        # The page still answers with HTML (and refreshes itself) rather than a bare error.
        log.exception("room_failed", error=repr(exc))
        return RoomAnswer(
            status_code=500,
            body=problem_body(
                500,
                "internal_error",
                "Internal error",
                "An unexpected error occurred; it was logged.",
            ),
            set_cookies=[],
            retry_after=None,
        )
    return RoomAnswer(status_code=200, body=body, set_cookies=cookies, retry_after=None)


def _ticket(request: Request) -> Ticket | None:
    """The browser's ticket (the pages read the cookie only: browsers send no headers)."""
    room = service.waiting_room_of(request.app)
    return room.read_ticket(request.cookies.get(room.settings.cookie_name))


def _settings(request: Request) -> QueueSettings:
    settings: QueueSettings = request.app.state.settings
    return settings


def _url(path: str, lang: str, **params: int) -> str:
    query = {**({"lang": lang} if lang != "id" else {}), **params}
    return f"{path}?{urlencode(query)}" if query else path


def _first_position(value: str | None, position: int) -> int:
    """The first position this browser saw (carried in the refresh URL), for the progress."""
    first = int(value) if value is not None and value.isdigit() else 0
    return max(first, position)


def status_page(answer: RoomAnswer, lang: str, first: str | None) -> HTMLResponse:
    """The page without JavaScript for one answer of the room (`first`: the first position
    this browser saw, from the refresh URL)."""
    context: dict[str, Any] = {"refresh": None, "problem": None}
    if answer.ok and answer.body.get("state") == "expired":  # a status may say so too
        context["view"] = "expired"
        response = _render("fallback.html", lang, **context)
    elif answer.ok:
        status = answer.body
        state = str(status.get("state"))
        position = int(status.get("position") or 0)
        first_seen = _first_position(first, position)
        context.update(
            view=state,
            people_ahead=fill(
                TEXTS[lang]["people_ahead_one" if position == 1 else "people_ahead"],
                {"n": _number(position, lang)},
            ),
            eta=duration_text(status.get("eta_seconds"), lang),
            progress=round(100 * (first_seen - position) / first_seen) if first_seen else 0,
            opens_in=duration_text(status.get("opens_in_seconds"), lang),
        )
        if state == "admitted":
            seconds, url = _ADMITTED_PAUSE_SECONDS, _url("/beli", lang)
        else:
            poll = status.get("poll_after_seconds")
            if not isinstance(poll, int | float) or poll <= 0:
                poll = _PROBLEM_REFRESH_SECONDS
            seconds, url = max(1, math.ceil(poll)), _url("/queue/page", lang, first=first_seen)
        context["refresh"] = {"seconds": seconds, "url": url}
        response = _render("fallback.html", lang, **context)
    else:
        code = answer.code
        if code == "no_ticket":
            view = "join"
        elif code == "ticket_expired" or answer.status_code == 410:
            view = "expired"
        else:
            view = "problem"
            context["problem"] = problem_text(answer.body, lang)
            if code != "pow_required" and (answer.status_code == 429 or answer.status_code >= 500):
                seconds = answer.retry_after or _PROBLEM_REFRESH_SECONDS
                context["refresh"] = {"seconds": seconds, "url": _url("/queue/page", lang)}
        context["view"] = view
        response = _render(
            "fallback.html",
            lang,
            status_code=200 if view == "join" else answer.status_code,
            **context,
        )
    for cookie in answer.set_cookies:
        response.headers.append("set-cookie", cookie)
    return response


@pages.get(
    "/queue/page", response_class=HTMLResponse, summary="The waiting room without JavaScript"
)
async def fallback_page(
    request: Request, lang: str | None = None, first: str | None = None
) -> HTMLResponse:
    """Where you stand, rendered on the server from the ticket cookie; the page reloads itself
    after `poll_after_seconds` (`<meta http-equiv="refresh">`)."""
    lang = language(lang)
    answer = await _ask_room(service.waiting_room_of(request.app).status(_ticket(request)))
    return status_page(answer, lang, first)


@pages.post("/queue/page", response_class=HTMLResponse, summary="Join without JavaScript")
async def fallback_join(request: Request, lang: str | None = None) -> Response:
    """Take a place (or keep yours) and go to the status page; a ticket that expired is
    replaced by a new one, at the back of the queue."""
    lang = language(lang)
    # A form sends no proof of work: when operators ask for one, the page says so.
    room = service.waiting_room_of(request.app)
    hops = room.settings.trusted_proxy_hops
    joining = room.join(
        _ticket(request), client_ip=service.client_ip(request.scope, hops), proof=None
    )
    answer = await _ask_room(joining)
    if not answer.ok:
        return status_page(answer, lang, None)
    position = int(answer.body.get("position") or 0)
    redirect = RedirectResponse(_url("/queue/page", lang, first=position), status_code=303)
    for cookie in answer.set_cookies:
        redirect.headers.append("set-cookie", cookie)
    return redirect


def _admitted(request: Request) -> bool:
    token = request.cookies.get(ADMISSION_COOKIE)
    if not token:
        return False
    codec = service.waiting_room_of(request.app).admissions
    try:
        # Lapsed for buying, it still shows what was bought (buying then asks the room).
        codec.verify(token, event=_settings(request).event, to_buy=False)
    except InvalidAdmission:
        return False
    return True


@pages.get("/beli", response_class=HTMLResponse, summary="Buy stamps and stamp a PDF")
async def purchase_page(request: Request, lang: str | None = None) -> HTMLResponse:
    """For admitted applicants: order stamps (`POST /api/v1/purchases`), see how to pay, upload
    a PDF (`POST /api/v1/stampings`) and download it stamped. Others are sent back to the room."""
    lang = language(lang)
    return _render("beli.html", lang, admitted=_admitted(request), room_url=_url("/", lang))


@pages.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    """The pages' stylesheet and scripts (no external assets)."""
    asset = _assets().get(name)
    if asset is None:
        raise NotFound("No such file.")
    return Response(
        asset.body,
        media_type=asset.media_type,
        headers={"Cache-Control": _STATIC_CACHE, "X-Content-Type-Options": "nosniff"},
    )
