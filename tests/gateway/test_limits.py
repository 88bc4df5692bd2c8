"""Rate limits shared by gateway replicas, fail-open without Redis, the circuit breaker, and
which route classes are shed first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.gateway.app import create_app as create_gateway
from services.gateway.ratelimit import LocalRateLimiter, Policy, RateLimiter, create_redis
from services.gateway.routes import RouteClass, Upstream
from services.gateway.shedding import Budgets, Overloaded
from services.platform.embedded import free_port
from tests.harness import Infrastructure, Served, ServiceStack

RATE, BURST = 2.0, 10


@pytest.mark.settings(
    gateway={
        "distributor_rate_per_second": RATE,
        "distributor_burst": BURST,
        # Not about failing open: a slow Redis on a busy machine must not let requests pass.
        "rate_limit_redis_timeout_seconds": 5,
    }
)
async def test_rate_limits_hold_across_two_gateways(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    second = Served(create_gateway(stack.gateway_settings()))
    await second.start()
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with (
            httpx.AsyncClient(base_url=stack.gateway_url, headers=headers) as one,
            httpx.AsyncClient(base_url=second.url, headers=headers) as two,
        ):
            started = time.monotonic()
            responses = await asyncio.gather(
                *(client.get("/api/v1/balance") for _ in range(20) for client in (one, two))
            )
            elapsed = time.monotonic() - started
    finally:
        await second.stop()
    passed = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(passed) + len(refused) == len(responses)
    # Both replicas drew from one bucket: the burst, plus what refilled meanwhile.
    assert BURST <= len(passed) <= BURST + RATE * elapsed + 1, (len(passed), elapsed)
    ok = passed[0]
    assert ok.headers["ratelimit-policy"] == f'"distributor";q={BURST};w=5'
    assert ok.headers["ratelimit"].startswith('"distributor";r=')
    for response in refused:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "rate_limited"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["ratelimit"].startswith('"distributor";r=0;t=')
        assert "ratelimit-policy" in response.headers


async def test_concurrent_takes_never_exceed_the_bucket(stack: ServiceStack) -> None:
    redis = create_redis(stack.infra.redis.url(), timeout=5)
    limiter = RateLimiter(redis, prefix=f"test-{time.monotonic_ns()}", pause_seconds=1)
    small = Policy("small", rate=0.001, burst=7)  # refills one token in 1,000 s: none here
    large = Policy("large", rate=0.001, burst=30)
    try:
        decisions = await asyncio.gather(
            *(limiter.take(small, "a", 1) for _ in range(20)),
            *(limiter.take(small, "b", 2) for _ in range(5)),
            *(limiter.take(large, "a", 1) for _ in range(20)),
        )
    finally:
        await redis.aclose()
    assert all(decision is not None for decision in decisions)
    small_a, small_b, large_a = decisions[:20], decisions[20:25], decisions[25:]
    # Each bucket gave exactly what it held; the others were told when to come back.
    assert sorted(d.allowed for d in small_a if d) == [False] * 13 + [True] * 7
    assert sorted(d.allowed for d in small_b if d) == [False] * 2 + [True] * 3  # 2 tokens each
    assert all(d and d.allowed for d in large_a)
    assert sorted(d.remaining for d in small_a if d and d.allowed) == [0, 1, 2, 3, 4, 5, 6]
    assert all(d and d.retry_after_seconds >= 1 for d in small_a if d and not d.allowed)


# A bucket that does not refill during a test (one token in 1,000 s), whose leases are 5 tokens
# (a tenth of the burst) and last as long as the test needs.
LEASED = Policy("leased", rate=0.001, burst=50)


def leasing(redis: Redis, prefix: str, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
    return RateLimiter(
        redis, prefix=prefix, pause_seconds=1, lease_seconds=5_000, lease_max_tokens=20, clock=clock
    )


async def spent(redis: Redis, prefix: str) -> int:
    """Tokens gone from the `LEASED` bucket of "d1", as a replica without leases sees it."""
    observer = RateLimiter(redis, prefix=prefix, pause_seconds=1)
    decision = await observer.take(LEASED, "d1", 1)
    assert decision is not None and decision.allowed
    return LEASED.burst - decision.remaining - 1


async def test_a_replica_takes_a_busy_distributors_tokens_in_leases(stack: ServiceStack) -> None:
    redis = create_redis(stack.infra.redis.url(), timeout=5)
    prefix = f"test-{time.monotonic_ns()}"
    limiter = leasing(redis, prefix)
    try:
        assert limiter.lease_size(LEASED) == 5
        one_by_one = [await limiter.take(LEASED, "d1", 1) for _ in range(12)]
        # Three leases of 5 served 12 requests; the headers count the lease's tokens as left.
        assert await spent(redis, prefix) == 15
        assert [d.remaining for d in one_by_one if d and d.allowed] == list(range(49, 37, -1))
        # Requests arriving together wait for the lease being taken instead of each asking
        # for one: 20 more requests take the 3 tokens left, then 4 leases (not 17).
        together = await asyncio.gather(*(limiter.take(LEASED, "d1", 1) for _ in range(20)))
        assert all(d is not None and d.allowed for d in together)
        assert await spent(redis, prefix) == 15 + 1 + 20  # + the observer's first token
    finally:
        await redis.aclose()


async def test_leased_tokens_never_let_replicas_exceed_the_bucket(stack: ServiceStack) -> None:
    redis = create_redis(stack.infra.redis.url(), timeout=5)
    prefix = f"test-{time.monotonic_ns()}"
    one, two = leasing(redis, prefix), leasing(redis, prefix)
    try:
        decisions = await asyncio.gather(
            *(replica.take(LEASED, "d1", 1) for _ in range(40) for replica in (one, two))
        )
    finally:
        await redis.aclose()
    assert all(d is not None for d in decisions)
    assert sum(1 for d in decisions if d and d.allowed) == LEASED.burst
    refused = [d for d in decisions if d and not d.allowed]
    assert refused and all(d.remaining == 0 and d.retry_after_seconds >= 1 for d in refused)


async def test_a_lease_unused_in_time_is_dropped(stack: ServiceStack) -> None:
    redis = create_redis(stack.infra.redis.url(), timeout=5)
    prefix = f"test-{time.monotonic_ns()}"
    now = [1_000.0]
    limiter = leasing(redis, prefix, clock=lambda: now[0])
    try:
        await limiter.take(LEASED, "d1", 1)
        await limiter.take(LEASED, "d1", 1)
        assert await spent(redis, prefix) == 5  # one lease, 3 tokens of it left
        now[0] += 5_001  # past the lease: its tokens are gone, the next request asks Redis
        await limiter.take(LEASED, "d1", 1)
        assert await spent(redis, prefix) == 5 + 1 + 5
        # A small contract is never leased: every request is one token asked of Redis.
        assert limiter.lease_size(Policy("small", rate=2, burst=10)) == 1
    finally:
        await redis.aclose()


async def test_a_refusal_is_remembered_until_the_cost_can_fit(infra: Infrastructure) -> None:
    """A distributor flooding past its limit is refused by the replica itself until its bucket
    can hold the request again, not by one Redis round trip after another."""
    redis = create_redis(infra.redis.url(), timeout=5)
    prefix = f"test-{time.monotonic_ns()}"
    now = [1_000.0]
    limiter = leasing(redis, prefix, clock=lambda: now[0])
    small = Policy("small", rate=1, burst=3)  # one token a second; never leased

    async def evalsha_calls() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        taken = [await limiter.take(small, "d1", 1) for _ in range(4)]
        assert [d.allowed for d in taken if d] == [True, True, True, False]
        refused = taken[3]
        assert refused is not None and refused.retry_after_seconds == 1
        before = await evalsha_calls()  # nothing else uses this Redis now
        flood = await asyncio.gather(*(limiter.take(small, "d1", 1) for _ in range(50)))
        assert not any(d and d.allowed for d in flood)
        assert all(d and d.retry_after_seconds == 1 and d.remaining == 0 for d in flood)
        assert await evalsha_calls() == before
        # A request larger than the one refused is refused too; once it can fit, Redis decides.
        larger = await limiter.take(small, "d1", 2)
        assert larger is not None and not larger.allowed
        assert await evalsha_calls() == before
        now[0] += 2
        await asyncio.sleep(1.1)  # Redis's own clock refills the bucket
        again = await limiter.take(small, "d1", 1)
        assert again is not None and again.allowed
        assert await evalsha_calls() == before + 1
    finally:
        await redis.aclose()


def test_a_local_bucket_holds_its_burst_refills_at_its_rate_and_forgets_the_oldest() -> None:
    now = [1000.0]
    limiter = LocalRateLimiter(max_subjects=2, clock=lambda: now[0])
    policy = Policy("public", rate=2.0, burst=4)
    taken = [limiter.take(policy, "10.0.0.1", 1) for _ in range(6)]
    assert [d.allowed for d in taken] == [True] * 4 + [False] * 2
    assert [d.remaining for d in taken[:4]] == [3, 2, 1, 0]
    assert taken[4].retry_after_seconds == 1 and taken[4].remaining == 0
    assert limiter.take(policy, "10.0.0.2", 1).allowed  # another address, its own bucket
    now[0] += 1.0  # two tokens back at 2 per second
    assert [limiter.take(policy, "10.0.0.1", 1).allowed for _ in range(3)] == [True, True, False]
    assert not limiter.take(policy, "10.0.0.1", 1).allowed
    # A third address pushes out the least recently seen (10.0.0.2, whose bucket was not empty
    # anyway); 10.0.0.1 is still remembered as empty.
    limiter.take(policy, "10.0.0.3", 1)
    assert not limiter.take(policy, "10.0.0.1", 1).allowed
    # A request costing more than the bucket holds is counted as the whole bucket.
    assert limiter.take(policy, "10.0.0.4", 10).allowed


@pytest.mark.settings(
    gateway={"public_rate_per_second": 0.1, "public_burst": 3, "trusted_proxy_hops": 1}
)
async def test_public_routes_are_limited_per_client_address(stack: ServiceStack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:

        async def verify(address: str) -> httpx.Response:
            return await client.get(
                "/verify/AAAAAAAAAAAAAAAAAAAAAA", headers={"X-Forwarded-For": address}
            )

        first = [await verify("10.1.1.1") for _ in range(5)]
        other = await verify("10.2.2.2")
    assert [r.status_code for r in first] == [404, 404, 404, 429, 429]
    assert first[0].headers["ratelimit-policy"] == '"public";q=3;w=30'
    assert first[2].headers["ratelimit"].startswith('"public";r=0;')
    refused = first[3]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 404  # the next address has its own bucket


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_without_redis_requests_pass(stack: ServiceStack) -> None:
    api_key = await stack.create_distributor()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    gateway = Served(create_gateway(stack.gateway_settings(redis_url=dead_redis)))
    await gateway.start()
    before = _sample("meterai_gateway_rate_limit_fail_open_total")
    try:
        async with httpx.AsyncClient(
            base_url=gateway.url, headers={"Authorization": f"Bearer {api_key}"}
        ) as client:
            responses = [await client.get("/api/v1/balance") for _ in range(5)]
    finally:
        await gateway.stop()
    assert [r.status_code for r in responses] == [200] * 5
    assert "ratelimit" not in responses[0].headers
    assert _sample("meterai_gateway_rate_limit_fail_open_total") - before == 5


async def test_breaker_opens_on_a_dead_upstream_and_probes_again(stack: ServiceStack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = stack.gateway_settings(
        stamping_url=dead, breaker_failure_threshold=3, breaker_open_seconds=0.5
    )
    gateway = Served(create_gateway(settings))
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            codes = []
            for _ in range(5):
                response = await client.get("/verify/AAAAAAAAAAAAAAAAAAAAAA")
                assert response.status_code == 503
                assert int(response.headers["retry-after"]) >= 1
                codes.append(response.json()["code"])
            assert codes == ["unavailable"] * 3 + ["upstream_unavailable"] * 2
            await asyncio.sleep(0.6)
            # Half-open: one probe reaches for the upstream (still dead), which reopens it.
            probe = await client.get("/verify/AAAAAAAAAAAAAAAAAAAAAA")
            assert probe.json()["code"] == "unavailable"
            after = await client.get("/verify/AAAAAAAAAAAAAAAAAAAAAA")
            assert after.json()["code"] == "upstream_unavailable"
    finally:
        await gateway.stop()


async def test_callers_hanging_up_mid_body_do_not_open_the_breaker(stack: ServiceStack) -> None:
    settings = stack.gateway_settings(breaker_failure_threshold=3, breaker_open_seconds=30)
    gateway = Served(create_gateway(settings))
    await gateway.start()
    try:
        for _ in range(6):
            # An upload whose chunked body stops halfway: the gateway is streaming it to the
            # stamping service, which is still reading, when the caller goes away.
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(
                b"POST /api/v1/verify HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"20\r\n--b\r\nContent-Disposition: form-d\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            after = await client.get("/verify/AAAAAAAAAAAAAAAAAAAAAA")
            # No body and no Content-Length: passed on as no body at all.
            joined = await client.post("/queue/join")
    finally:
        await gateway.stop()
    assert after.status_code == 404, after.text  # the stamping service answered
    assert joined.status_code == 200, joined.text


def test_uploads_are_shed_before_reads() -> None:
    budgets = Budgets(
        per_upstream=10,
        shares={"read": 1.0, "write": 0.8, "upload": 0.5},
        per_class={"read": 10, "write": 10, "upload": 3},
        retry_after=1,
    )
    upload = budgets.get(Upstream.stamping, RouteClass.upload)
    read = budgets.get(Upstream.stamping, RouteClass.read)
    for _ in range(3):
        upload.acquire()
    with pytest.raises(Overloaded):
        upload.acquire()  # its own budget
    for _ in range(3):
        read.acquire()
    upload.release()
    with pytest.raises(Overloaded):
        upload.acquire()  # half of the upstream's budget is in use: uploads wait
    for _ in range(5):
        read.acquire()  # reads may fill the upstream's whole budget
    with pytest.raises(Overloaded) as refused:
        read.acquire()
    assert refused.value.code == "overloaded"
    assert refused.value.headers["Retry-After"] == "1"
    assert (
        _sample("meterai_gateway_upstream_in_flight", upstream="stamping", route_class="read") == 8
    )
