"""The admission credential: what the waiting room gives an applicant whose turn has come.

Short-lived, HMAC-signed (HS256 JWT), bound to one event and one ticket, and verified at the
gateway without a network call. The waiting room issues and extends it; purchases and uploads
by applicants require it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from services.platform.errors import Unauthorized

ADMISSION_COOKIE = "meterai_admission"
ADMISSION_HEADER = "x-admission-token"
_AUDIENCE = "meterai-admission"
_ALGORITHM = "HS256"


class InvalidAdmission(Unauthorized):
    code = "invalid_admission"
    title = "Invalid admission credential"


@dataclass(frozen=True)
class Admission:
    """An admitted applicant: the event and the ticket number they were admitted with."""

    event: str
    ticket: int
    expires_at: int

    @property
    def applicant_id(self) -> str:
        """Stable id of the applicant within the event (their ticket)."""
        return f"{self.event}:{self.ticket}"


class AdmissionCodec:
    def __init__(self, secret: str, *, ttl_seconds: int = 900) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def issue(self, event: str, ticket: int, *, now: float | None = None) -> str:
        """A credential for `ticket` of `event`, valid for `ttl_seconds`."""
        issued = int(now if now is not None else time.time())
        claims = {
            "aud": _AUDIENCE,
            "ev": event,
            "tk": ticket,
            "iat": issued,
            "exp": issued + self.ttl_seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str, *, event: str) -> Admission:
        """The admission in `token` for `event`; `InvalidAdmission` for anything else
        (forged, tampered, expired, or for another event)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "iat", "aud", "ev", "tk"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidAdmission("Your admission has expired; rejoin the queue.") from exc
        except jwt.PyJWTError as exc:
            raise InvalidAdmission("The admission credential is not valid.") from exc
        ticket = claims["tk"]
        if claims["ev"] != event or not isinstance(ticket, int) or isinstance(ticket, bool):
            raise InvalidAdmission("The admission credential is for another queue.")
        return Admission(event=event, ticket=ticket, expires_at=int(claims["exp"]))
