"""The waiting room's state in Redis, and what each replica caches of it.

Per event, Redis holds two monotonic counters and a few sets:

* ``tail`` hands out queue numbers (INCR) and ``serving`` says how far admission has reached;
  a ticket's position is its number minus ``serving`` (O(1)).
* ``seen`` (number → last poll, ms) lets admission skip tickets nobody polls any more, so an
  abandoned place holds nobody up; ``active`` (number → session expiry, ms) holds the admitted
  sessions that count against ``max_active``.
* ``prequeue`` collects arrivals before ``opens_at``; at opening they get numbers in random
  order (SPOP), before anyone who arrives later, so hammering at the last second gains nothing.
* ``leader`` and ``epoch`` elect the one replica that admits: a lease plus a fencing token that
  the admission script checks, so a paused or partitioned old leader cannot admit twice.

Each replica refreshes a :class:`RoomView` (counters, configuration, measured admission rate)
in the background every ``refresh_seconds``; status requests read only that view, so waiting
people cost no network I/O. Polls are remembered in memory and written to ``seen`` in batches.

Redis keeps all this in an append-only file (a killed server loses nothing). Should it come back
empty anyway (a failover to a replica that had not caught up), the room is rebuilt, not restarted:
``alive`` marks a room that exists, and without it joins and admission refuse to act until a
replica that knew the room has put its counters back, no lower than it last saw them (the queue
numbers with a margin for what other replicas gave meanwhile), so no number is given twice and
nobody's position moves back. Then, for a while (``hold``), admission waits for the waiting
tickets to poll again (their ``seen`` entries were lost, and admission skips unseen tickets),
and for a session's length (``rebuilt``) an admitted ticket that polls gets its session back,
and admission counts at least the sessions that were active before.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge
from redis.typing import EncodableT, FieldT

from services.platform.batching import Coalescer

log = structlog.get_logger(__name__)

ADMITTED = Counter("meterai_queue_admitted_total", "Applicants admitted (this replica led)")
SKIPPED = Counter("meterai_queue_expired_total", "Tickets skipped: not polled for too long")
JOINS = Counter("meterai_queue_joins_total", "Joins", ["outcome"])
LENGTH = Gauge("meterai_queue_length", "Tickets not yet admitted")
ACTIVE = Gauge("meterai_queue_active", "Admitted sessions still active")
RATE = Gauge("meterai_queue_admission_rate_per_minute", "Measured admission rate")
FACTOR = Gauge("meterai_queue_pressure_factor", "Share of the configured rate the backend allows")
LEADER = Gauge("meterai_queue_leader", "1 while this replica runs admission")
REBUILT = Counter("meterai_queue_rebuilt_total", "Times this replica rebuilt a room Redis lost")


@dataclass(frozen=True)
class RoomConfig:
    """What operators set at run time (PATCH /ops/queue); defaults come from settings."""

    admit_per_minute: int
    max_active: int
    paused: bool = False
    opens_at: float | None = None  # unix seconds; before it, arrivals wait in the pre-queue
    pow_difficulty: int = 0  # leading zero bits a join must prove; 0 = off


@dataclass(frozen=True)
class RoomView:
    """One replica's cached picture of the room."""

    tail: int = 0
    serving: int = 0
    active: int = 0
    admitted_total: int = 0
    prequeue: int = 0
    drawn: bool = False
    factor: float = 1.0
    config: RoomConfig = field(default_factory=lambda: RoomConfig(600, 1000))
    rate_per_minute: float = 0.0  # measured over the last minute
    refreshed_at: float = 0.0

    @property
    def length(self) -> int:
        return max(0, self.tail - self.serving)

    def expected_rate_per_second(self) -> float:
        """Admissions per second to plan with: measured when there is a measurement."""
        if self.rate_per_minute > 0:
            return self.rate_per_minute / 60
        return max(self.config.admit_per_minute * self.factor, 1.0) / 60


@dataclass(frozen=True)
class Arrival:
    """One join: where from (for per-IP limits) and whether it is before the opening."""

    client_ip: str


@dataclass(frozen=True)
class Joined:
    number: int | None  # None: a pre-queue place (see `prequeue_id`) or refused
    prequeue_id: str | None = None
    limited: bool = False


# Joins of one batch, in arrival order: per-IP fixed-window limit, then a pre-queue place before
# the opening, else the next number (marked seen). Also draws the pre-queue if it is time.
_JOIN = """
if redis.call('EXISTS', KEYS[8]) == 0 then return {-2} end  -- the room must be rebuilt first
local now_ms = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local n_arrivals = tonumber(ARGV[4])
local opens = redis.call('HGET', KEYS[5], 'opens_at')
local before_opening = opens and opens ~= '' and tonumber(opens) * 1000 > now_ms
if not before_opening and redis.call('EXISTS', KEYS[7]) == 0 then
    -- The sale is open: everyone from the pre-queue gets a number first, in random order.
    while true do
        local ids = redis.call('SPOP', KEYS[4], 1000)
        if #ids == 0 then break end
        for _, id in ipairs(ids) do
            local n = redis.call('INCR', KEYS[1])
            redis.call('HSET', KEYS[6], id, n)
            redis.call('ZADD', KEYS[2], now_ms, n)
        end
    end
    redis.call('SET', KEYS[7], '1')
end
local out = {}
for i = 1, n_arrivals do
    local ip = ARGV[4 + i * 2 - 1]
    local pre_id = ARGV[4 + i * 2]
    local limited = false
    if limit > 0 then
        local bucket = KEYS[3] .. ip .. ':' .. math.floor(now_ms / 1000 / window)
        local count = redis.call('INCR', bucket)
        if count == 1 then redis.call('EXPIRE', bucket, window * 2) end
        limited = count > limit
    end
    if limited then
        table.insert(out, -1)
    elseif before_opening then
        redis.call('SADD', KEYS[4], pre_id)
        table.insert(out, 0)
    else
        local n = redis.call('INCR', KEYS[1])
        redis.call('ZADD', KEYS[2], now_ms, n)
        table.insert(out, n)
    end
end
return out
"""

# One admission step, only for the current leader (fencing token = epoch): walk from `serving`
# admitting tickets polled within the ticket TTL, skipping the abandoned, up to `quota` and to
# the free active slots. Returns {admitted, skipped, serving}.
_ADMIT = """
local now_ms = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local max_active = tonumber(ARGV[3])
local seen_after = now_ms - tonumber(ARGV[4])
local session_ms = tonumber(ARGV[5])
local token = ARGV[6]
local max_steps = tonumber(ARGV[7])
if redis.call('GET', KEYS[5]) ~= token then return {-1, 0, 0} end
if redis.call('EXISTS', KEYS[7]) == 0 then return {-2, 0, 0} end
if redis.call('EXISTS', KEYS[8]) == 1 then return {0, 0, 0} end  -- rebuilt: hold
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms)
local active = redis.call('ZCARD', KEYS[4])
local active_before = tonumber(redis.call('GET', KEYS[9]) or '0')
if active_before > active then active = active_before end
local free = max_active - active
if free < quota then quota = free end
local tail = tonumber(redis.call('GET', KEYS[1]) or '0')
local serving = tonumber(redis.call('GET', KEYS[2]) or '0')
local admitted, skipped, steps = 0, 0, 0
while admitted < quota and serving < tail and steps < max_steps do
    serving = serving + 1
    steps = steps + 1
    local last = redis.call('ZSCORE', KEYS[3], serving)
    if last and tonumber(last) >= seen_after then
        redis.call('ZADD', KEYS[4], now_ms + session_ms, serving)
        admitted = admitted + 1
    else
        skipped = skipped + 1
    end
    redis.call('ZREM', KEYS[3], serving)
end
redis.call('SET', KEYS[2], serving)
redis.call('INCRBY', KEYS[6], admitted)
return {admitted, skipped, serving}
"""

# Take or keep the lead: a new leader gets a new epoch (its fencing token).
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return redis.call('GET', KEYS[2])
end
if holder then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""

# Remember polls: waiting tickets in `seen`, admitted ones extend their session in `active`.
_SEEN = """
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end  -- lost: polled again after the rebuild
local now_ms = tonumber(ARGV[1])
local session_ms = tonumber(ARGV[2])
local serving = tonumber(redis.call('GET', KEYS[3]) or '0')
for i = 3, #ARGV do
    local n = tonumber(ARGV[i])
    if n > serving then
        redis.call('ZADD', KEYS[1], now_ms, n)
    else
        redis.call('ZADD', KEYS[2], 'XX', 'GT', now_ms + session_ms, n)
    end
end
return 1
"""


# Put back a room Redis lost (see the module's docstring), unless another replica already did.
_REBUILD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local function raise(key, floor)
    if tonumber(redis.call('GET', key) or '0') < floor then redis.call('SET', key, floor) end
end
raise(KEYS[2], tonumber(ARGV[1]))
raise(KEYS[3], tonumber(ARGV[2]))
raise(KEYS[4], tonumber(ARGV[3]))
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[6], '1', 'PX', ARGV[6])
for i = 7, #ARGV, 2 do redis.call('HSETNX', KEYS[7], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[1], '1')
return 1
"""

# Queue numbers other replicas may have given since this one last read the counter (gaps cost
# admission nothing: it skips numbers nobody polls).
REBUILD_MARGIN = 1000


class Room:
    """One event's waiting room as seen from one replica."""

    def __init__(
        self,
        redis: aioredis.Redis,
        event: str,
        defaults: RoomConfig,
        *,
        join_limit_per_ip: int = 0,
        join_limit_window_seconds: int = 60,
        ticket_ttl_seconds: float = 120.0,
        session_seconds: float = 900.0,
        rebuild_hold_seconds: float = 40.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.event = event
        self.defaults = defaults
        self.join_limit_per_ip = join_limit_per_ip
        self.join_limit_window_seconds = join_limit_window_seconds
        self.ticket_ttl_seconds = ticket_ttl_seconds
        self.session_seconds = session_seconds
        # After a rebuild, admission waits this long: longer than the longest poll interval.
        self.rebuild_hold_seconds = rebuild_hold_seconds
        self.clock = clock
        self.highest_number = 0  # the highest queue number this replica gave or was shown
        prefix = f"room:{{{event}}}:"  # one hash slot per event (Redis Cluster)
        self.keys = _Keys(prefix)
        self.view = RoomView(config=defaults)
        self._samples: deque[tuple[float, int]] = deque()
        self._seen: set[int] = set()
        self._joins: Coalescer[Arrival, Joined] = Coalescer(
            self._join_batch, max_batch=512, max_in_flight=2
        )
        self._join_script = redis.register_script(_JOIN)
        self._admit_script = redis.register_script(_ADMIT)
        self._lead_script = redis.register_script(_LEAD)
        self._seen_script = redis.register_script(_SEEN)
        self._rebuild_script = redis.register_script(_REBUILD)

    # Joining.

    async def join(self, arrival: Arrival) -> Joined:
        """A new, unique queue number, increasing in join order (concurrent joins share one
        round trip); a pre-queue place before the opening; or `limited`."""
        joined = await self._joins.submit(arrival)
        JOINS.labels(
            "limited" if joined.limited else "prequeue" if joined.number is None else "number"
        ).inc()
        return joined

    async def drain(self) -> None:
        """Wait for the joins in flight (at shutdown, before the Redis client is closed: a
        batch still connecting would otherwise open a connection nothing closes)."""
        await self._joins.drain()

    async def _join_batch(self, arrivals: Sequence[Arrival]) -> list[Joined]:
        args: list[Any] = [
            int(self.clock() * 1000),
            self.join_limit_per_ip,
            self.join_limit_window_seconds,
            len(arrivals),
        ]
        prequeue_ids = [secrets.token_urlsafe(12) for _ in arrivals]
        for arrival, prequeue_id in zip(arrivals, prequeue_ids, strict=True):
            args += [arrival.client_ip, prequeue_id]
        k = self.keys
        keys = [k.tail, k.seen, k.joins, k.prequeue, k.config, k.drawn_numbers, k.drawn, k.alive]
        results = await self._join_script(keys=keys, args=args)
        if len(results) == 1 and int(results[0]) == -2:
            await self.refresh()  # marks a new room alive, or rebuilds a lost one
            results = await self._join_script(keys=keys, args=args)
            if len(results) == 1 and int(results[0]) == -2:
                raise aioredis.RedisError("the room was lost and is not rebuilt yet")
        joined = []
        for result, prequeue_id in zip(results, prequeue_ids, strict=True):
            value = int(result)
            if value < 0:
                joined.append(Joined(None, limited=True))
            elif value == 0:
                joined.append(Joined(None, prequeue_id=prequeue_id))
            else:
                joined.append(Joined(value))
                self.highest_number = max(self.highest_number, value)
        return joined

    async def drawn_number(self, prequeue_id: str) -> int | None:
        """The number a pre-queue place got at the opening (None until the draw)."""
        value = await self.redis.hget(self.keys.drawn_numbers, prequeue_id)
        return int(value) if value is not None else None

    # Status.

    def note_seen(self, number: int) -> None:
        """Remember a poll; written to Redis by the next `flush_seen` (no I/O here)."""
        self._seen.add(number)
        if number > self.highest_number:
            self.highest_number = number

    async def flush_seen(self) -> None:
        if not self._seen:
            return
        numbers, self._seen = list(self._seen), set()
        k = self.keys
        await self._seen_script(
            keys=[k.seen, k.active, k.serving, k.alive],
            args=[int(self.clock() * 1000), int(self.session_seconds * 1000), *numbers],
        )

    async def is_active(self, number: int) -> bool:
        """True while `number` holds an admitted session (one round trip; only asked by the
        people at the front, never by the waiting)."""
        expiry = await self.redis.zscore(self.keys.active, number)
        if expiry is not None:
            return bool(expiry > self.clock() * 1000)
        if number <= self.view.serving and await self.redis.exists(self.keys.rebuilt):
            # Admitted before Redis lost the room: the session comes back with this poll.
            session_ms = int((self.clock() + self.session_seconds) * 1000)
            await self.redis.zadd(self.keys.active, {str(number): session_ms})
            return True
        return False

    # The cached view.

    async def refresh(self, *, revived: bool = False) -> RoomView:
        """Read the counters and the configuration (one round trip) into `view`."""
        k = self.keys
        now = self.clock()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget(k.tail, k.serving, k.admitted, k.drawn, k.factor, k.alive)
            pipe.hgetall(k.config)
            pipe.zcount(k.active, int(now * 1000), "+inf")
            pipe.scard(k.prequeue)
            (
                (tail, serving, admitted, drawn, factor, alive),
                raw,
                active,
                prequeue,
            ) = await pipe.execute()
        if alive is None and not revived:
            await self._revive()
            return await self.refresh(revived=True)
        admitted_total = int(admitted or 0)
        self._samples.append((now, admitted_total))
        while self._samples and now - self._samples[0][0] > 60:
            self._samples.popleft()
        first_at, first_total = self._samples[0]
        rate = (admitted_total - first_total) / (now - first_at) * 60 if now > first_at else 0.0
        self.view = RoomView(
            tail=int(tail or 0),
            serving=int(serving or 0),
            active=int(active),
            admitted_total=admitted_total,
            prequeue=int(prequeue),
            drawn=drawn is not None,
            factor=float(factor) if factor is not None else 1.0,
            config=self._config_from(raw),
            rate_per_minute=rate,
            refreshed_at=now,
        )
        LENGTH.set(self.view.length)
        ACTIVE.set(self.view.active)
        RATE.set(rate)
        return self.view

    async def _revive(self) -> None:
        """Mark a new room alive, or rebuild one that Redis lost (this replica knew it)."""
        view = self.view
        if view.tail == 0 and view.serving == 0 and self.highest_number == 0:
            await self.redis.set(self.keys.alive, "1", nx=True)
            return
        k = self.keys
        fields = _config_fields(asdict(view.config))
        tail = max(view.tail, self.highest_number) + REBUILD_MARGIN
        rebuilt = await self._rebuild_script(
            keys=[k.alive, k.tail, k.serving, k.admitted, k.rebuilt, k.hold, k.config],
            args=[
                tail,
                view.serving,
                view.admitted_total,
                view.active,
                int(self.session_seconds * 1000),
                int(self.rebuild_hold_seconds * 1000),
                *[item for pair in fields.items() for item in pair],
            ],
        )
        if rebuilt:
            REBUILT.inc()
            log.error(
                "room_rebuilt",
                detail="Redis had lost the room; counters put back from this replica's view",
                tail=tail,
                serving=view.serving,
                active_before=view.active,
                hold_seconds=self.rebuild_hold_seconds,
            )

    def _config_from(self, raw: dict[bytes, bytes]) -> RoomConfig:
        d = self.defaults
        opens_at = d.opens_at
        if b"opens_at" in raw:  # set by operators; empty means "no opening time"
            opens_at = float(raw[b"opens_at"]) if raw[b"opens_at"] else None
        return RoomConfig(
            admit_per_minute=int(raw.get(b"admit_per_minute", d.admit_per_minute)),
            max_active=int(raw.get(b"max_active", d.max_active)),
            paused=raw[b"paused"] == b"1" if b"paused" in raw else d.paused,
            opens_at=opens_at,
            pow_difficulty=int(raw.get(b"pow_difficulty", d.pow_difficulty)),
        )

    async def update_config(self, **changes: Any) -> RoomConfig:
        """Change the run-time configuration; `opens_at=None` removes the opening time."""
        fields = _config_fields(changes)
        if fields:
            await self.redis.hset(self.keys.config, mapping=fields)
        if "opens_at" in changes:
            # A new opening time starts a new pre-queue, drawn at that opening.
            await self.redis.delete(self.keys.drawn)
        view = await self.refresh()
        return view.config

    # Admission (the leader only).

    async def run_admission(
        self,
        *,
        tick: float,
        identity: str,
        pressure: Callable[[], Awaitable[float]] | None = None,
    ) -> None:
        """Admit at the configured rate while this replica holds the lead, slowed by the
        backend's `pressure` (1.0 = at capacity; see `PressureController`)."""
        controller = PressureController()
        carry = 0.0
        lease_ms = int(max(tick * 3, 1.0) * 1000)
        last = time.monotonic()
        while True:
            started = time.monotonic()
            elapsed, last = started - last, started
            try:
                token = await self._lead_script(
                    keys=[self.keys.leader, self.keys.epoch], args=[identity, lease_ms]
                )
                LEADER.set(1 if token else 0)
                if token:
                    if pressure is not None:
                        controller.observe(await pressure())
                        await self.redis.set(self.keys.factor, repr(controller.factor))
                    FACTOR.set(controller.factor)
                    carry = await self._admit_tick(elapsed, token, controller.factor, carry)
                else:
                    carry = 0.0
            except (aioredis.RedisError, OSError) as exc:
                log.warning("admission_tick_failed", error=repr(exc))
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))

    async def _admit_tick(self, elapsed: float, token: bytes, factor: float, carry: float) -> float:
        """Admit what `elapsed` seconds at the rate allow (plus what was left over)."""
        await self._join_batch([])  # draws the pre-queue once the sale opens
        config = (await self.refresh()).config
        opening = config.opens_at is not None and self.clock() < config.opens_at
        if config.paused or opening:
            return 0.0
        carry += config.admit_per_minute * factor * elapsed / 60.0
        quota = int(carry)
        if quota <= 0:
            return carry
        k = self.keys
        admitted, skipped, _ = await self._admit_script(
            keys=[
                k.tail,
                k.serving,
                k.seen,
                k.active,
                k.epoch,
                k.admitted,
                k.alive,
                k.hold,
                k.rebuilt,
            ],
            args=[
                int(self.clock() * 1000),
                quota,
                config.max_active,
                int(self.ticket_ttl_seconds * 1000),
                int(self.session_seconds * 1000),
                token,
                max(quota * 20, 1000),
            ],
        )
        if admitted == -2:
            await self.refresh()  # lost: rebuild first
            return 0.0
        if admitted < 0:
            log.warning("admission_fenced", detail="another replica took the lead")
            return 0.0
        ADMITTED.inc(admitted)
        SKIPPED.inc(skipped)
        # Unused quota (nobody waiting, or max_active reached) is not saved up for a burst.
        return carry - quota if admitted == quota else 0.0

    async def reset(self) -> None:
        """Forget the event entirely (tests and rehearsals)."""
        await self.redis.delete(*self.keys.all())
        self.view = replace(RoomView(config=self.defaults))
        self.highest_number = 0


def _config_fields(config: dict[str, Any]) -> dict[FieldT, EncodableT]:
    """Run-time settings as the room's config hash keeps them (`opens_at` empty: none)."""
    fields: dict[FieldT, EncodableT] = {}
    for name, value in config.items():
        if name == "paused":
            fields[name] = "1" if value else "0"
        elif name == "opens_at":
            fields[name] = "" if value is None else repr(float(value))
        else:
            fields[name] = str(int(value))
    return fields


@dataclass
class PressureController:
    """Additive increase, multiplicative decrease of the share of the configured rate that is
    admitted: above capacity (pressure > 1) it shrinks by a third each tick, well below (< 0.5)
    it grows back by a tenth, never under `floor` so the queue always moves a little."""

    factor: float = 1.0
    floor: float = 0.05

    def observe(self, pressure: float) -> None:
        if pressure > 1.0:
            self.factor = max(self.floor, self.factor * 0.67)
        elif pressure < 0.5:
            self.factor = min(1.0, self.factor + 0.1)


@dataclass(frozen=True)
class _Keys:
    prefix: str

    def __getattr__(self, name: str) -> str:
        return self.prefix + name.replace("_", ":")

    def all(self) -> list[str]:
        names = (
            "tail serving seen active joins prequeue config drawn_numbers drawn leader epoch "
            "admitted factor alive hold rebuilt"
        ).split()
        return [getattr(self, name) for name in names]
