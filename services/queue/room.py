"""The waiting room's state in Redis: two monotonic counters per event.

`tail` hands out queue numbers (INCR); `serving` says how far admission has reached. A ticket
with number n is admitted once serving >= n; its position is n - serving. Both are O(1).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RoomConfig:
    admit_per_minute: int
    paused: bool


@dataclass(frozen=True)
class RoomSnapshot:
    tail: int
    serving: int
    config: RoomConfig


class Room:
    def __init__(self, redis: aioredis.Redis, event: str, default_rate: int) -> None:
        self.redis = redis
        self.event = event
        self.default_rate = default_rate
        self._tail = f"room:{event}:tail"
        self._serving = f"room:{event}:serving"
        self._config = f"room:{event}:config"
        self._leader = f"room:{event}:leader"
        self._cached_serving = 0
        self._cached_at = 0.0

    async def join(self) -> int:
        """A new, unique queue number (increasing in join order)."""
        return int(await self.redis.incr(self._tail))

    async def serving(self, max_age: float) -> int:
        """The serving counter, read from Redis at most every `max_age` seconds."""
        now = time.monotonic()
        if now - self._cached_at > max_age:
            value = await self.redis.get(self._serving)
            self._cached_serving = int(value or 0)
            self._cached_at = now
        return self._cached_serving

    async def config(self) -> RoomConfig:
        raw = await self.redis.hgetall(self._config)
        rate = raw.get(b"admit_per_minute")
        return RoomConfig(
            admit_per_minute=int(rate) if rate is not None else self.default_rate,
            paused=raw.get(b"paused") == b"1",
        )

    async def update_config(self, *, admit_per_minute: int | None, paused: bool | None) -> None:
        if admit_per_minute is not None:
            await self.redis.hset(self._config, "admit_per_minute", str(admit_per_minute))
        if paused is not None:
            await self.redis.hset(self._config, "paused", "1" if paused else "0")

    async def snapshot(self) -> RoomSnapshot:
        tail, serving = await self.redis.mget(self._tail, self._serving)
        return RoomSnapshot(
            tail=int(tail or 0), serving=int(serving or 0), config=await self.config()
        )

    async def admit(self, count: int) -> int:
        """Advance `serving` by up to `count`, never past `tail`; the new serving value."""
        script = """
        local tail = tonumber(redis.call('GET', KEYS[1]) or '0')
        local serving = tonumber(redis.call('GET', KEYS[2]) or '0')
        local target = math.min(tail, serving + tonumber(ARGV[1]))
        if target > serving then redis.call('SET', KEYS[2], target) end
        return math.max(target, serving)
        """
        result = await self.redis.eval(script, 2, self._tail, self._serving, count)
        return int(result)

    async def run_admission(self, tick: float, identity: str) -> None:
        """Admit `admit_per_minute` people per minute while this replica holds the lead."""
        carry = 0.0
        while True:
            try:
                lead = (
                    await self.redis.set(self._leader, identity, nx=True, px=int(tick * 3000))
                    or (await self.redis.get(self._leader)) == identity.encode()
                )
                if lead:
                    await self.redis.pexpire(self._leader, int(tick * 3000))
                    config = await self.config()
                    if not config.paused:
                        carry += config.admit_per_minute * tick / 60.0
                        whole = int(carry)
                        if whole:
                            carry -= whole
                            await self.admit(whole)
            except aioredis.RedisError as exc:
                log.warning("admission_tick_failed", error=repr(exc))
            await asyncio.sleep(tick)
