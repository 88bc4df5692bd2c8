"""A circuit breaker per upstream: consecutive connection failures or timeouts open it, and
while it is open requests fail at once instead of waiting on a service that is down.

Hand-written rather than aiobreaker or purgatory: the gateway counts only transport failures
(an upstream's own 5xx answers pass through untouched), needs no storage, and checks the state
on every proxied request, which here is two attribute reads.
"""

from __future__ import annotations

import math
import time
from enum import IntEnum

import structlog
from prometheus_client import Counter, Gauge

from services.platform.errors import ServiceUnavailable

log = structlog.get_logger(__name__)

BREAKER_STATE = Gauge(
    "meterai_gateway_breaker_state",
    "Circuit breaker state per upstream (0 closed, 1 half-open, 2 open)",
    ["upstream"],
)
BREAKER_REJECTED = Counter(
    "meterai_gateway_breaker_rejected_total",
    "Requests failed fast because the upstream's breaker was open",
    ["upstream"],
)


class BreakerState(IntEnum):
    closed = 0
    half_open = 1
    open = 2


class UpstreamUnavailable(ServiceUnavailable):
    code = "upstream_unavailable"
    title = "Upstream unavailable"


class CircuitBreaker:
    """Closed: everything passes. Open: everything fails fast until `open_seconds` passed.
    Half-open: one probe at a time; its success closes the breaker, its failure reopens it."""

    def __init__(self, upstream: str, *, failure_threshold: int, open_seconds: float) -> None:
        self.upstream = upstream
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.state = BreakerState.closed
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False
        self._rejected = BREAKER_REJECTED.labels(upstream)
        BREAKER_STATE.labels(upstream).set_function(lambda: self.state.value)

    def before_request(self) -> None:
        """Let the request through, or raise `UpstreamUnavailable` at once."""
        if self.state is BreakerState.closed:
            return
        wait = self.opened_at + self.open_seconds - time.monotonic()
        if self.state is BreakerState.open and wait <= 0:
            self.state = BreakerState.half_open
        if self.state is BreakerState.half_open and not self._probing:
            self._probing = True
            return
        self._rejected.inc()
        raise UpstreamUnavailable(
            f"The {self.upstream} service is unavailable; try again shortly.",
            retry_after=max(1, math.ceil(wait)),
        )

    def succeeded(self) -> None:
        """The upstream answered (any status)."""
        self.failures = 0
        if self.state is not BreakerState.closed:
            log.info("breaker_closed", upstream=self.upstream)
            self.state = BreakerState.closed
            self._probing = False

    def failed(self) -> None:
        """The upstream could not be reached, or did not answer in time."""
        self.failures += 1
        if self.state is BreakerState.half_open or self.failures >= self.failure_threshold:
            if self.state is not BreakerState.open:
                log.warning("breaker_opened", upstream=self.upstream, failures=self.failures)
            self.state = BreakerState.open
            self.opened_at = time.monotonic()
            self._probing = False

    def abandoned(self) -> None:
        """The request ended before the upstream was tried to the end (the caller left)."""
        if self.state is BreakerState.half_open:
            self._probing = False
