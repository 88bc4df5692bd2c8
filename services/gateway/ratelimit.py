"""Rate limits shared by every gateway replica: one token bucket per distributor (and one per
client address on public routes) kept in Redis; the requests under way take from their buckets
together, in one round trip.

The bucket is GCRA (the "generic cell rate algorithm"): Redis keeps a single timestamp per key,
the theoretical arrival time, so a bucket costs one small string that expires once it is full
again. The `limits` library offers fixed and sliding windows but no token bucket, hence this
short script; redis-py runs it with EVALSHA (one round trip, atomic across replicas).

If Redis is unreachable or slow, requests pass unlimited (availability over strictness during a
deadline surge), counted by `meterai_gateway_rate_limit_fail_open_total`, and Redis is left
alone for a short pause so that a dead Redis adds no latency per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter

from services.platform.batching import Coalescer
from services.platform.errors import MeteraiError

log = structlog.get_logger(__name__)

RATE_LIMITED = Counter(
    "meterai_gateway_rate_limited_total", "Requests refused by a rate limit (429)", ["policy"]
)
FAIL_OPEN = Counter(
    "meterai_gateway_rate_limit_fail_open_total",
    "Requests let through unlimited because Redis could not be asked",
)

# KEYS: the buckets; ARGV: for each bucket in turn, milliseconds per token, bucket size, tokens
# this request takes. A key may come more than once (its requests are taken in order).
# Returns for each: {allowed, remaining tokens, ms until the bucket is full, ms until it fits}.
_GCRA = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + clock[2] / 1000
local decisions = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tolerance = interval * burst
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local wait = new_tat - tolerance - now
  if wait > 0 then
    decisions[i] = {0, math.floor((tolerance - (tat - now)) / interval), math.ceil(tat - now),
                    math.ceil(wait)}
  else
    redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
    decisions[i] = {1, math.floor((tolerance - (new_tat - now)) / interval),
                    math.ceil(new_tat - now), 0}
  end
end
return decisions
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


@dataclass(frozen=True)
class _Take:
    key: str
    args: tuple[float, int, int]


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


class RateLimiter:
    """Token buckets in Redis. The takes of concurrent requests go together in one EVALSHA
    (`Coalescer`): one round trip for many requests under a surge, at once when it is quiet."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, pause_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.pause_seconds = pause_seconds
        self._script = redis.register_script(_GCRA)
        self._paused_until = 0.0
        self._takes: Coalescer[_Take, list[int]] = Coalescer(self._take_all, max_batch=128)

    async def _take_all(self, takes: Sequence[_Take]) -> list[list[int]]:
        args: list[float | int] = []
        for take in takes:
            args += take.args
        decisions: list[list[int]] = await self._script(
            keys=[take.key for take in takes], args=args
        )
        return decisions

    async def take(self, policy: Policy, subject: str, cost: int) -> Decision | None:
        """Take `cost` tokens from `subject`'s bucket; None when Redis could not be asked."""
        if self._paused_until and time.monotonic() < self._paused_until:
            FAIL_OPEN.inc()
            return None
        cost = min(cost, policy.burst)  # a request larger than the bucket could never pass
        try:
            allowed, remaining, reset_ms, wait_ms = await self._takes.submit(
                _Take(
                    key=f"{self.prefix}:{policy.name}:{subject}",
                    args=(1000.0 / policy.rate, policy.burst, cost),
                )
            )
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._paused_until = time.monotonic() + self.pause_seconds
            FAIL_OPEN.inc()
            log.warning("rate_limit_fail_open", error=repr(exc), pause=self.pause_seconds)
            return None
        self._paused_until = 0.0
        decision = Decision(
            policy=policy,
            allowed=bool(allowed),
            remaining=max(0, int(remaining)),
            reset_seconds=math.ceil(int(reset_ms) / 1000),
            retry_after_seconds=max(1, math.ceil(int(wait_ms) / 1000)),
        )
        if not decision.allowed:
            RATE_LIMITED.labels(policy.name).inc()
        return decision


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
