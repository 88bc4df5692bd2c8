"""Who is calling: the principal the gateway authenticated, passed to services as a signed token.

Services never see API keys or admission cookies; the gateway verifies those and forwards a
short-lived HS256 token in `X-Meterai-Principal`. Services verify it with the shared internal
secret, without a network call, and services use the same token to call each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import jwt
from fastapi import Depends, Request

from services.platform.errors import Forbidden, Unauthorized

PRINCIPAL_HEADER = "x-meterai-principal"
_AUDIENCE = "meterai-internal"
_ALGORITHM = "HS256"


class PrincipalKind(StrEnum):
    distributor = "distributor"
    applicant = "applicant"
    operator = "operator"
    service = "service"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `kind` plus the id of the distributor, applicant or service."""

    kind: PrincipalKind
    subject: str

    @property
    def owner_key(self) -> str:
        """A stable string naming this caller as an owner of serials, purchases and jobs."""
        return f"{self.kind.value}:{self.subject}"


class PrincipalCodec:
    """Signs and verifies principal tokens with the stack's internal secret."""

    def __init__(self, secret: str, *, ttl_seconds: int = 120) -> None:
        self._secret = secret
        self._ttl = ttl_seconds

    def encode(self, principal: Principal) -> str:
        """A token valid for `ttl_seconds` (long enough for a slow upload to reach a service)."""
        now = int(time.time())
        claims = {
            "kind": principal.kind.value,
            "sub": principal.subject,
            "aud": _AUDIENCE,
            "iat": now,
            "exp": now + self._ttl,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def decode(self, token: str) -> Principal:
        """The principal in a valid token; `Unauthorized` for anything else."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "sub", "aud"]},
            )
            return Principal(kind=PrincipalKind(claims["kind"]), subject=str(claims["sub"]))
        except (jwt.PyJWTError, KeyError, ValueError) as exc:
            raise Unauthorized("The internal principal token is invalid.") from exc


def _current_principal(request: Request) -> Principal:
    token = request.headers.get(PRINCIPAL_HEADER)
    if not token:
        raise Unauthorized("Authentication required.")
    codec: PrincipalCodec = request.app.state.principal_codec
    return codec.decode(token)


CurrentPrincipal = Annotated[Principal, Depends(_current_principal)]


def _current_service(request: Request) -> Principal:
    principal = _current_principal(request)
    if principal.kind is not PrincipalKind.service:
        raise Forbidden("Only Meterai services may call this endpoint.")
    return principal


CallingService = Annotated[Principal, Depends(_current_service)]
