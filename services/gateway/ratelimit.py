"""Rate limits: one token bucket per distributor shared by every gateway replica, kept in Redis
and taken from in one round trip; and one per client address on public routes, kept in each
replica (`LocalRateLimiter`).

The bucket is GCRA (the "generic cell rate algorithm"): Redis keeps a single timestamp per key,
the theoretical arrival time, so a bucket costs one small string that expires once it is full
again. The `limits` library offers fixed and sliding windows but no token bucket, hence this
short script; redis-py runs it with EVALSHA (one round trip, atomic across replicas).

A replica takes a distributor's tokens from Redis a few at a time (a lease, spent in memory for
at most `lease_seconds`): a busy distributor costs one Redis round trip per lease instead of
one per request, while the bucket stays shared, since leased tokens are already spent in it.
A lease is at most a tenth of the burst and what the rate refills in `lease_seconds`, so small
contracts stay exact (one token per trip) and tokens a replica leased but did not use are few.
A refusal is remembered until the refused cost can fit, so a distributor over its limit costs
no round trip per request either.

If Redis is unreachable or slow, requests pass unlimited (availability over strictness during a
deadline surge), counted by `meterai_gateway_rate_limit_fail_open_total`, and Redis is left
alone for a short pause so that a dead Redis adds no latency per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from cachetools import LRUCache
from prometheus_client import Counter

from services.platform.errors import MeteraiError

log = structlog.get_logger(__name__)

RATE_LIMITED = Counter(
    "meterai_gateway_rate_limited_total", "Requests refused by a rate limit (429)", ["policy"]
)
FAIL_OPEN = Counter(
    "meterai_gateway_rate_limit_fail_open_total",
    "Requests let through unlimited because Redis could not be asked",
)

# KEYS[1]: the bucket; ARGV: milliseconds per token, bucket size, tokens this request needs,
# tokens it would take if the bucket has them (a lease; at least the first).
# Returns {allowed, remaining tokens, ms until the bucket is full, ms until this cost fits,
# tokens taken}.
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + clock[2] / 1000
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat + interval * cost - tolerance - now
if wait > 0 then
  return {0, math.floor((tolerance - (tat - now)) / interval), math.ceil(tat - now),
          math.ceil(wait), 0}
end
local taken = math.max(cost, math.min(want, math.floor((tolerance - (tat - now)) / interval)))
local new_tat = tat + interval * taken
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {1, math.floor((tolerance - (new_tat - now)) / interval), math.ceil(new_tat - now), 0,
        taken}
"""


@dataclass(frozen=True)
class Policy:
    """A bucket shape: `rate` tokens per second, at most `burst` tokens saved up."""

    name: str
    rate: float
    burst: int

    @property
    def header(self) -> str:
        """`RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): quota and its window."""
        window = max(1, math.ceil(self.burst / self.rate))
        return f'"{self.name}";q={self.burst};w={window}'


@dataclass(frozen=True)
class Decision:
    policy: Policy
    allowed: bool
    remaining: int
    reset_seconds: int
    retry_after_seconds: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """`RateLimit-Policy` and `RateLimit` for the response."""
        return [
            (b"ratelimit-policy", self.policy.header.encode()),
            (
                b"ratelimit",
                f'"{self.policy.name}";r={self.remaining};t={self.reset_seconds}'.encode(),
            ),
        ]


class RateLimited(MeteraiError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, decision: Decision) -> None:
        headers = {name.decode(): value.decode() for name, value in decision.headers()}
        headers["Retry-After"] = str(decision.retry_after_seconds)
        super().__init__(
            f"Over the {decision.policy.name} rate limit of {decision.policy.rate:g} requests "
            f"per second (bursts of {decision.policy.burst}); retry after "
            f"{decision.retry_after_seconds} s.",
            headers=headers,
        )


@dataclass
class _Lease:
    """What a replica knows of a shared bucket until `expires`: tokens it took and has not
    spent yet; or, after a refusal, that `refused` tokens cannot fit before then (buckets only
    refill with time, and other replicas only take from them)."""

    tokens: int
    remaining: int  # what the bucket held besides, when Redis answered
    reset_ms: int
    expires: float
    refused: int = 0


class RateLimiter:
    """Token buckets in Redis, taken from in leases (one EVALSHA each); concurrent requests of
    one subject wait for the one lease being taken rather than each asking Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        pause_seconds: float,
        lease_seconds: float = 0.0,
        lease_max_tokens: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.pause_seconds = pause_seconds
        self.lease_seconds = lease_seconds
        self.lease_max_tokens = lease_max_tokens
        self._clock = clock
        self._script = redis.register_script(_GCRA)
        self._paused_until = 0.0
        self._leases: LRUCache[tuple[str, str], _Lease] = LRUCache(maxsize=10_000)
        self._asking: dict[tuple[str, str], asyncio.Future[None]] = {}

    def lease_size(self, policy: Policy) -> int:
        """Tokens taken from Redis at once for `policy` (1: every request asks)."""
        refilled = math.floor(policy.rate * self.lease_seconds)
        return max(1, min(self.lease_max_tokens, policy.burst // 10, refilled))

    async def take(self, policy: Policy, subject: str, cost: int) -> Decision | None:
        """Take `cost` tokens from `subject`'s bucket; None when Redis could not be asked."""
        cost = min(cost, policy.burst)  # a request larger than the bucket could never pass
        key = (policy.name, subject)
        while True:
            lease = self._leases.get(key)
            now = self._clock()
            if lease is not None and now < lease.expires:
                if lease.tokens >= cost:
                    lease.tokens -= cost
                    remaining = lease.remaining + lease.tokens
                    return _decided(policy, True, remaining, lease.reset_ms, 0)
                if lease.refused and cost >= lease.refused:
                    # Refused here until then, without asking Redis again (a flood of one
                    # distributor's requests would otherwise ask one after the other).
                    wait_ms = math.ceil((lease.expires - now) * 1000)
                    return _decided(policy, False, lease.remaining, lease.reset_ms, wait_ms)
            asking = self._asking.get(key)
            if asking is None:
                break
            await asyncio.shield(asking)  # then look at the lease it brought
        asking = self._asking[key] = asyncio.get_running_loop().create_future()
        try:
            return await self._ask(policy, subject, cost, key)
        finally:
            del self._asking[key]
            asking.set_result(None)

    async def _ask(
        self, policy: Policy, subject: str, cost: int, key: tuple[str, str]
    ) -> Decision | None:
        if self._paused_until and self._clock() < self._paused_until:
            FAIL_OPEN.inc()
            return None
        want = max(cost, self.lease_size(policy))
        try:
            allowed, remaining, reset_ms, wait_ms, taken = await self._script(
                keys=[f"{self.prefix}:{policy.name}:{subject}"],
                args=[1000.0 / policy.rate, policy.burst, cost, want],
            )
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._paused_until = self._clock() + self.pause_seconds
            FAIL_OPEN.inc()
            log.warning("rate_limit_fail_open", error=repr(exc), pause=self.pause_seconds)
            return None
        self._paused_until = 0.0
        left = int(taken) - cost if allowed else 0
        if left > 0:
            expires = self._clock() + self.lease_seconds
            self._leases[key] = _Lease(left, int(remaining), int(reset_ms), expires)
        elif not allowed:
            expires = self._clock() + int(wait_ms) / 1000
            self._leases[key] = _Lease(0, int(remaining), int(reset_ms), expires, refused=cost)
        else:
            self._leases.pop(key, None)
        return _decided(policy, bool(allowed), int(remaining) + left, int(reset_ms), int(wait_ms))


class LocalRateLimiter:
    """Token buckets kept in this process, with the same GCRA arithmetic as the script: for the
    public routes, whose bucket per client address only has to keep one address from flooding
    a replica. Waiting-room polls are most of a surge's requests; a Redis round trip each cost
    the gateway about as much as forwarding them. Behind K replicas an address may reach K
    times the rate (each replica holds its own bucket). The least recently seen addresses are
    forgotten first (their buckets start full again)."""

    def __init__(
        self, *, max_subjects: int = 200_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tats: LRUCache[tuple[str, str], float] = LRUCache(maxsize=max_subjects)
        self._clock = clock

    def take(self, policy: Policy, subject: str, cost: int) -> Decision:
        """Take `cost` tokens from `subject`'s bucket (the script's steps, in Python)."""
        now = self._clock() * 1000
        interval = 1000.0 / policy.rate
        tolerance = interval * policy.burst
        key = (policy.name, subject)
        tat = max(self._tats.get(key, now), now)
        new_tat = tat + interval * min(cost, policy.burst)
        wait = new_tat - tolerance - now
        if wait > 0:
            remaining = math.floor((tolerance - (tat - now)) / interval)
            return _decided(policy, False, remaining, math.ceil(tat - now), math.ceil(wait))
        self._tats[key] = new_tat
        remaining = math.floor((tolerance - (new_tat - now)) / interval)
        return _decided(policy, True, remaining, math.ceil(new_tat - now), 0)


def _decided(
    policy: Policy, allowed: bool, remaining: int, reset_ms: int, wait_ms: int
) -> Decision:
    """The decision from a bucket's answer (as the script returns it), counted if refused."""
    if not allowed:
        RATE_LIMITED.labels(policy.name).inc()
    return Decision(
        policy=policy,
        allowed=allowed,
        remaining=max(0, remaining),
        reset_seconds=math.ceil(reset_ms / 1000),
        retry_after_seconds=max(1, math.ceil(wait_ms / 1000)),
    )


def create_redis(url: str, *, timeout: float) -> aioredis.Redis:
    """A Redis client for the limits: short timeouts (a slow Redis must not slow requests) and a
    bounded pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections
