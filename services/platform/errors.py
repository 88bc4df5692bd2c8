"""One domain error base class and the handlers that render every error as RFC 9457 problem+json.

Every error a client can see carries a stable machine `code`; the `type` URI is derived from it
so that documentation can live at one place per code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.platform.observability import REQUEST_ID_HEADER

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://meterai.dev/problems/"

log = structlog.get_logger(__name__)


class MeteraiError(Exception):
    """A failure the caller should see, with an HTTP status and a stable `code`.

    Subclasses set `status`, `code` and `title`; instances carry a human `detail` and optional
    extension members (e.g. `balance`) and headers (e.g. `Retry-After`).
    """

    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        super().__init__(self.detail)


class NotFound(MeteraiError):
    status = 404
    code = "not_found"
    title = "Not found"


class Unauthorized(MeteraiError):
    status = 401
    code = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="meterai"', **kwargs.pop("headers", {})}
        super().__init__(detail, headers=headers, **kwargs)


class Forbidden(MeteraiError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class Conflict(MeteraiError):
    status = 409
    code = "conflict"
    title = "Conflict"


class MalformedJson(MeteraiError):
    status = 400
    code = "malformed_json"
    title = "Malformed JSON"


class ServiceUnavailable(MeteraiError):
    status = 503
    code = "unavailable"
    title = "Temporarily unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 5, **kwargs: Any) -> None:
        headers = {"Retry-After": str(retry_after), **kwargs.pop("headers", {})}
        super().__init__(detail, headers=headers, **kwargs)


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The JSON members of a problem document."""
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response."""
    return JSONResponse(
        problem_body(status, code, title, detail, **extra),
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=dict(headers or {}),
    )


def _validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()
    ]
    if any(error["type"] == "json_invalid" for error in errors):
        return problem_response(
            400, "malformed_json", "Malformed JSON", "The request body is not valid JSON."
        )
    detail = "; ".join(
        f"{'.'.join(e['loc'][1:] if len(e['loc']) > 1 else e['loc'])}: {e['msg']}" for e in errors
    )
    return problem_response(
        422, "invalid_request", "Invalid request", detail or "Invalid request.", errors=errors
    )


# SQLSTATE classes of a server that is not there for now: 08 connection exception, 57
# operator intervention (shutting down, starting up, terminated by the administrator).
_UNAVAILABLE_SQLSTATES = ("08", "57")


def database_gone(exc: BaseException) -> bool:
    """Whether a database error means the server is unreachable, stopping or starting (come
    back shortly), not that the statement was wrong."""
    if isinstance(
        exc,
        (
            sqlalchemy.exc.TimeoutError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            ConnectionError,
        ),
    ):
        return True
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # The driver's error, and what it wraps: asyncpg's own exception carries the SQLSTATE, even
    # "connection was closed in the middle of operation" (08003).
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return False


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors, validation errors, routing errors and crashes as problem+json."""

    async def domain_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MeteraiError)  # noqa: S101 - registered for this type only
        return problem_response(
            exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.extra
        )

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        return _validation_problem(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        status = exc.status_code
        if status == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's answer to a JSON body that is not even UTF-8.
            return problem_response(
                400, "malformed_json", "Malformed JSON", "The request body is not valid JSON."
            )
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(status, f"http_{status}")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return problem_response(status, code, phrase, detail, headers=exc.headers)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path, error=repr(exc))
        # This handler runs outside the request-id middleware, so add the id here: it is how
        # the caller finds the logged error.
        request_id = getattr(request.state, "request_id", None)
        return problem_response(
            500,
            "internal_error",
            "Internal error",
            "An unexpected error occurred; it was logged.",
            headers={REQUEST_ID_HEADER: request_id} if isinstance(request_id, str) else None,
        )

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # No connection within the pool timeout, or the server is gone: the caller should
        # come back shortly, which is what a 503 with Retry-After says (never a 500).
        if not database_gone(exc):
            return await crash(request, exc)  # a wrong statement is a bug
        log.warning("database_unavailable", error=repr(exc))
        return problem_response(
            503,
            "database_unavailable",
            "Temporarily unavailable",
            "The service is busy or its database is unreachable; try again shortly.",
            headers={"Retry-After": "2"},
        )

    app.add_exception_handler(MeteraiError, domain_error)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, database_unavailable)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, database_unavailable)
    # A refused or reset connect (asyncpg raises the OS error itself while connecting).
    app.add_exception_handler(ConnectionError, database_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)
