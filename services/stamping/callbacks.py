"""Callbacks: a finished job's final status, POSTed to its `callback_url`, signed and retried.

Durable and at least once: the database records the callback in the same transaction as the
job's outcome (a trigger on `stamping_jobs`, see the `callbacks` migration), and the
:class:`CallbackSender` (a task of the stamping API process) claims due rows, posts them, and
records the outcome. A sender that dies mid-attempt leaves its claim to expire; the next claim
tries again. Receivers deduplicate on the event id, which is the same on every attempt.

What a receiver gets (documented for distributors in the README):

* the body: the job as `GET /api/v1/stampings/{id}` shows it, plus `event_id` and `event`;
* `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`
  (:mod:`services.platform.signatures`), keyed with the owner's callback secret
  (:func:`owner_secret`, shown to the owner at `GET /api/v1/callbacks/secret`), signed afresh on
  every attempt;
* `X-Meterai-Event-Id`, `X-Meterai-Event: stamping.finished`, `X-Meterai-Delivery-Attempt`.

Any 2xx answer is a delivery. Anything else (another status, no answer within the timeout, a
refused connection) is retried after a doubling delay with jitter, until the attempt limit;
then the callback is `given_up`, with the last error kept for operators.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import random
import socket
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.platform import signatures
from services.platform.db import transaction
from services.stamping import repository as repo
from services.stamping.models import CallbackDelivery, CallbackState, StampingJob
from services.stamping.router import render_job

log = structlog.get_logger(__name__)

EVENT = "stamping.finished"
EVENT_ID_HEADER = "X-Meterai-Event-Id"
EVENT_HEADER = "X-Meterai-Event"
ATTEMPT_HEADER = "X-Meterai-Delivery-Attempt"
USER_AGENT = "Meterai-Callbacks/1"

ATTEMPTS = Counter(
    "meterai_stamping_callback_attempts_total",
    "Callback attempts by outcome (delivered, retry, given_up)",
    ["outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "meterai_stamping_callback_attempt_duration_seconds",
    "Time one callback attempt took, answer or not",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Delivered callbacks are kept this long for operators, then forgotten.
_KEEP_DELIVERED = timedelta(days=7)
# How much of a refusing receiver's answer is kept as the last error.
_ERROR_SNIPPET = 200


def owner_secret(callback_secret: str, owner: str) -> str:
    """The secret that signs `owner`'s callbacks, derived from the service's callback secret:
    each distributor verifies with its own, so none can sign callbacks for another."""
    message = f"stamping-callback:{owner}".encode()
    return hmac.new(callback_secret.encode(), message, hashlib.sha256).hexdigest()


def callback_body(callback: CallbackDelivery, job: StampingJob, public_base_url: str) -> bytes:
    """The JSON a receiver gets: the job's public view plus the event's id and name."""
    payload = {"event_id": str(callback.id), "event": EVENT, **render_job(job, public_base_url)}
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a callback is attempted."""

    max_attempts: int
    initial_seconds: float
    max_seconds: float

    def delay(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed attempts: doubling from `initial_seconds` up
        to `max_seconds`, then drawn from the upper half of that, so that the callbacks of a
        receiver that was down do not all come back in the same instant."""
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0 ** max(attempts - 1, 0))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


@dataclass(frozen=True)
class AttemptResult:
    """What one POST got: a status code, or an error; `final` when retrying cannot help."""

    status_code: int | None
    error: str | None
    final: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class CallbackSender:
    """Delivers due callbacks, at most `concurrency` at a time, each within `timeout` seconds:
    a receiver that hangs holds one slot for at most that long, and the rest go on."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        client: httpx.AsyncClient,
        secret: str,
        public_base_url: str,
        policy: RetryPolicy,
        timeout: float,
        concurrency: int,
        poll_interval: float,
        allow_private_addresses: bool,
        grace_seconds: float = 5.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.client = client
        self.secret = secret
        self.public_base_url = public_base_url
        self.policy = policy
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.allow_private_addresses = allow_private_addresses
        self.grace_seconds = grace_seconds
        # A claimed callback whose sender vanished is due again after this: well past the
        # longest attempt, so a live sender's attempt is never duplicated.
        self.claim_for = timedelta(seconds=2 * timeout + 10)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._next_purge = 0.0

    def stop(self) -> None:
        """Stop claiming; `run` returns after in-flight attempts finish (or the grace ends)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver until stopped; a database outage only delays callbacks."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    started = await self.start_due()
                    if loop.time() >= self._next_purge:
                        self._next_purge = loop.time() + 3600
                        await self.forget_delivered()
                except Exception as exc:  # noqa: BLE001 - keep delivering after outages
                    log.warning("callback_sender_error", error=repr(exc))
                    started = 0
                    await asyncio.sleep(1.0)
                if started and len(self._in_flight) < self.concurrency:
                    continue  # more may be due right away
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
        finally:
            await self._drain()

    async def start_due(self) -> int:
        """Claim due callbacks for the free slots and start their attempts; returns how many."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        async with transaction(self.sessionmaker) as session:
            claimed = await repo.claim_due_callbacks(session, limit=free, claim_for=self.claim_for)
        for callback, job in claimed:
            task = asyncio.create_task(self.attempt(callback, job), name=f"callback-{callback.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free

    async def attempt(self, callback: CallbackDelivery, job: StampingJob) -> None:
        """POST one claimed callback and record the outcome."""
        structlog.contextvars.bind_contextvars(job_id=str(job.id), event_id=str(callback.id))
        try:
            started = time.perf_counter()
            result = await self.post(callback, job)
            ATTEMPT_SECONDS.observe(time.perf_counter() - started)
            await self.record(callback, result)
        except Exception as exc:  # noqa: BLE001 - the claim expires and the attempt is repeated
            log.error("callback_attempt_error", error=repr(exc), attempt=callback.attempts)

    async def post(self, callback: CallbackDelivery, job: StampingJob) -> AttemptResult:
        """One attempt, within the timeout, including resolving the receiver's name."""
        body = callback_body(callback, job, self.public_base_url)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signatures.SIGNATURE_HEADER: signatures.sign(
                owner_secret(self.secret, job.owner), body
            ),
            EVENT_ID_HEADER: str(callback.id),
            EVENT_HEADER: EVENT,
            ATTEMPT_HEADER: str(callback.attempts),
        }
        try:
            async with asyncio.timeout(self.timeout):
                if not self.allow_private_addresses:
                    refusal = await _non_public_address(callback.url)
                    if refusal is not None:
                        return AttemptResult(None, refusal, final=True)
                async with self.client.stream(
                    "POST", callback.url, content=body, headers=headers
                ) as response:
                    if 200 <= response.status_code < 300:
                        return AttemptResult(response.status_code, None)
                    return AttemptResult(
                        response.status_code,
                        f"HTTP {response.status_code}: {await _snippet(response)}".rstrip(": "),
                    )
        except TimeoutError:
            return AttemptResult(None, f"no answer within {self.timeout:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:_ERROR_SNIPPET])

    async def record(self, callback: CallbackDelivery, result: AttemptResult) -> None:
        """Delivered, given up, or due again after the backoff."""
        attempts = callback.attempts
        retry_at = None
        if result.delivered:
            state, outcome = CallbackState.delivered, "delivered"
        elif result.final or attempts >= self.policy.max_attempts:
            state, outcome = CallbackState.given_up, "given_up"
        else:
            state, outcome = CallbackState.pending, "retry"
            retry_at = datetime.now(UTC) + timedelta(seconds=self.policy.delay(attempts))
        async with transaction(self.sessionmaker) as session:
            recorded = await repo.record_callback_attempt(
                session,
                callback.id,
                attempt=attempts,
                state=state,
                status_code=result.status_code,
                error=result.error,
                retry_at=retry_at,
            )
        if not recorded:
            log.warning("callback_claim_lost", attempt=attempts)
            return
        ATTEMPTS.labels(outcome).inc()
        event = {"delivered": "callback_delivered", "retry": "callback_failed"}.get(
            outcome, "callback_given_up"
        )
        (log.warning if outcome == "given_up" else log.info)(
            event,
            attempt=attempts,
            status_code=result.status_code,
            error=result.error,
            retry_at=retry_at.isoformat() if retry_at else None,
        )

    async def forget_delivered(self) -> int:
        """Drop callbacks delivered more than a week ago."""
        async with transaction(self.sessionmaker) as session:
            return await repo.forget_delivered_callbacks(
                session, older_than=datetime.now(UTC) - _KEEP_DELIVERED
            )

    async def _drain(self) -> None:
        """Let attempts in flight finish within the grace period; cancel the rest (their
        claims expire and they are attempted again)."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=self.grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _non_public_address(url: str) -> str | None:
    """Why `url` must not be called (its host is loopback, private, link-local...), or None."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return "the callback URL has no host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not address.is_global:
            return f"{host} is a non-public address ({address}); callbacks go to the internet only"
    return None


async def _snippet(response: httpx.Response) -> str:
    """The start of a refusing receiver's answer, without reading more of it."""
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= _ERROR_SNIPPET:
            break
    return data[:_ERROR_SNIPPET].decode("utf-8", errors="replace").strip()
