"""The admission credential: what the waiting room gives an applicant whose turn has come.

Short-lived, HMAC-signed (HS256 JWT), bound to one event and one ticket, and verified at the
gateway without a network call. The waiting room issues and extends it; purchases and uploads
by applicants require it.

It has two horizons. Buying needs a live admission (`exp`, renewed while the applicant's page
keeps asking the room). Using what was bought (paying, uploading with the stamps, downloading
the stamped document) needs only that the credential is still within its keep horizon
(`keep`, days): an applicant who paid is never sent back to the queue to use the stamp, however
long an upload took or however late they come back for the document.
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
    expires_at: int  # until when it buys
    kept_until: int  # until when it uses what was bought

    @property
    def applicant_id(self) -> str:
        """Stable id of the applicant within the event (their ticket)."""
        return f"{self.event}:{self.ticket}"


class AdmissionCodec:
    def __init__(
        self, secret: str, *, ttl_seconds: int = 900, keep_seconds: int = 7 * 24 * 3600
    ) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self.keep_seconds = max(keep_seconds, ttl_seconds)

    def issue(self, event: str, ticket: int, *, now: float | None = None) -> str:
        """A credential for `ticket` of `event` that buys for `ttl_seconds` and uses what was
        bought for `keep_seconds`."""
        issued = int(now if now is not None else time.time())
        claims = {
            "aud": _AUDIENCE,
            "ev": event,
            "tk": ticket,
            "iat": issued,
            "exp": issued + self.ttl_seconds,
            "keep": issued + self.keep_seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(
        self, token: str, *, event: str, to_buy: bool = True, now: float | None = None
    ) -> Admission:
        """The admission in `token` for `event`; `InvalidAdmission` for anything else
        (forged, tampered, for another event, or past the horizon asked for: `exp` to buy,
        `keep` to use what was bought)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "iat", "aud", "ev", "tk"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidAdmission("The admission credential is not valid.") from exc
        ticket, expires_at, kept_until = claims["tk"], claims["exp"], claims.get("keep")
        if kept_until is None:
            kept_until = expires_at
        if not all(_is_int(value) for value in (ticket, expires_at, kept_until)):
            raise InvalidAdmission("The admission credential is not valid.")
        if claims["ev"] != event:
            raise InvalidAdmission("The admission credential is for another queue.")
        at = now if now is not None else time.time()
        if at >= (expires_at if to_buy else kept_until):
            raise InvalidAdmission(
                "Your admission has expired; rejoin the queue."
                if to_buy
                else "Your admission has expired for good; rejoin the queue."
            )
        return Admission(event=event, ticket=ticket, expires_at=expires_at, kept_until=kept_until)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
