"""HMAC-SHA256 signatures on webhook bodies, with a timestamp against replays.

Header format: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`. Used for the
payment provider's callbacks to us and for our callbacks to distributors.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from services.platform.errors import Unauthorized

SIGNATURE_HEADER = "X-Signature"


class InvalidSignature(Unauthorized):
    code = "invalid_signature"
    title = "Invalid signature"


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The signature header value for `body`."""
    stamp = int(timestamp if timestamp is not None else time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify(
    secret: str, body: bytes, header: str | None, *, tolerance: int, now: float | None = None
) -> int:
    """The signed timestamp, if `header` signs `body` within `tolerance` seconds of now."""
    if not header:
        raise InvalidSignature(f"The {SIGNATURE_HEADER} header is missing.")
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    stamp, given = parts.get("t", ""), parts.get("v1", "")
    if not stamp.isdigit() or not given:
        raise InvalidSignature(f"The {SIGNATURE_HEADER} header is malformed.")
    expected = sign(secret, body, timestamp=int(stamp)).split("v1=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise InvalidSignature("The signature does not match the body.")
    current = now if now is not None else time.time()
    if abs(current - int(stamp)) > tolerance:
        raise InvalidSignature("The signature is too old (or from the future); refusing a replay.")
    return int(stamp)
