"""Queue tickets and proof-of-work challenges: small HMAC-signed strings, checked without I/O.

A ticket binds a queue number (or, before the opening, a pre-queue place) to one event. It is
not a JWT on purpose: status is the hottest route of a surge and a compact HMAC costs a few
microseconds. Only the waiting room reads tickets; the admission credential the gateway checks
is a separate, short-lived token (`services.platform.admission`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from cachetools import TTLCache

_SIGNATURE_BYTES = 16


@dataclass(frozen=True)
class Ticket:
    number: int | None = None  # a place in the queue
    prequeue_id: str | None = None  # or a place in the pre-queue (number drawn at opening)
    # The signed string it was read from, answered back as is (signing is deterministic: no
    # second HMAC per poll); not part of what the ticket is.
    token: str | None = field(default=None, compare=False)


class TicketCodec:
    """Issues and reads the tickets of one event."""

    def __init__(self, secret: str, event: str) -> None:
        key = hmac.new(secret.encode(), b"meterai-queue-ticket", hashlib.sha256).digest()
        # Keyed once; each signature copies it (a third cheaper than keying per message).
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._event = event

    def issue(self, number: int) -> str:
        return self._sign("n", str(number))

    def issue_prequeue(self, prequeue_id: str) -> str:
        return self._sign("p", prequeue_id)

    def read(self, token: str) -> Ticket | None:
        """The ticket in `token`, or None if it is malformed, forged or for another event."""
        kind, _, rest = token.partition(".")
        value, _, signature = rest.rpartition(".")
        if kind not in ("n", "p") or not value or len(token) > 200:
            return None
        if not hmac.compare_digest(signature, self._signature(kind, value)):
            return None
        if kind == "p":
            return Ticket(prequeue_id=value, token=token)
        return Ticket(number=int(value), token=token) if value.isdigit() else None

    def _sign(self, kind: str, value: str) -> str:
        return f"{kind}.{value}.{self._signature(kind, value)}"

    def _signature(self, kind: str, value: str) -> str:
        mac = self._mac.copy()
        mac.update(f"{self._event}|{kind}|{value}".encode())
        digest = mac.digest()[:_SIGNATURE_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class ProofOfWork:
    """Hashcash-style challenges: find a nonce such that SHA-256 of ``"<challenge>:<nonce>"``
    starts with `difficulty` zero bits. Challenges are signed and expire, and each solves one
    join per replica (a used-challenge cache), so solving once does not buy a thousand places.
    """

    def __init__(self, secret: str, *, ttl_seconds: int = 300) -> None:
        self._key = hmac.new(secret.encode(), b"meterai-queue-pow", hashlib.sha256).digest()
        self._ttl = ttl_seconds
        self._used: TTLCache[str, bool] = TTLCache(maxsize=1_000_000, ttl=ttl_seconds)

    def challenge(self, difficulty: int) -> str:
        body = f"{int(time.time())}.{difficulty}.{secrets.token_urlsafe(9)}"
        return f"{body}.{self._mac(body)}"

    def check(self, proof: str, difficulty: int) -> bool:
        """True for a fresh, unused solution of one of our challenges at `difficulty`."""
        challenge, _, nonce = proof.rpartition(":")
        body, _, mac = challenge.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or not nonce or len(proof) > 300:
            return False
        if not hmac.compare_digest(mac, self._mac(body)):
            return False
        issued, asked = parts[0], parts[1]
        if not (issued.isdigit() and asked.isdigit()) or int(asked) < difficulty:
            return False
        if time.time() - int(issued) > self._ttl or challenge in self._used:
            return False
        digest = hashlib.sha256(proof.encode()).digest()
        if int.from_bytes(digest, "big") >> (256 - int(asked)) != 0:
            return False
        self._used[challenge] = True
        return True

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def solve(challenge: str, difficulty: int) -> str:
    """A solution of `challenge` (for clients written in Python, and for tests)."""
    nonce = 0
    while True:
        proof = f"{challenge}:{nonce}"
        digest = hashlib.sha256(proof.encode()).digest()
        if int.from_bytes(digest, "big") >> (256 - difficulty) == 0:
            return proof
        nonce += 1
