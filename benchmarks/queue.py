"""Waiting-room status and join: throughput and p99 at 64 concurrent connections, next to a
FastAPI hello-world endpoint measured in the same run.

    python -m benchmarks.queue [--seconds 10] [--connections 64] [--repeat 3]

Starts the floor and `meterai up` (no signing workers, no per-address join limit: every
request of wrk comes from one address), takes one ticket for the status runs, then runs wrk
in rounds of floor, status and join against the queue service itself (the goal: status at
least 2x the floor, join at least the floor; the median of the rounds' ratios) and, for
reference, through the gateway (one more HTTP hop, as applicants reach it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import httpx
from fastapi import FastAPI

from benchmarks.common import HELLO_APP, WrkResult, hello_world, meterai_up, wrk

JOIN_SCRIPT = 'wrk.method = "POST"\n'
STATUS_SCRIPT = 'wrk.headers["X-Queue-Ticket"] = "%s"\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of floor, status and join, back to back: the machine's speed drifts "
        "between runs, so each round's ratios compare figures taken within a minute",
    )
    args = parser.parse_args()

    def run(url: str, script: str | None = None) -> WrkResult:
        wrk(url, connections=args.connections, seconds=2, script=script)  # warm-up
        return wrk(url, connections=args.connections, seconds=args.seconds, script=script)

    # Every request of wrk comes from one address: no per-address limits, in the room or at
    # the gateway (whose public bucket would otherwise answer most of them with 429).
    settings = {
        "METERAI_QUEUE_JOIN_LIMIT_PER_IP": "0",
        "METERAI_QUEUE_PAUSED": "true",
        "METERAI_GATEWAY_PUBLIC_RATE_PER_SECOND": "1000000",
        "METERAI_GATEWAY_PUBLIC_BURST": "1000000",
    }
    rounds: list[dict[str, WrkResult]] = []
    with hello_world() as hello_url, meterai_up(workers=0, settings=settings) as stack:
        ticket = httpx.post(f"{stack.queue}/queue/join").json()["ticket"]
        status_script = STATUS_SCRIPT % ticket
        for _ in range(args.repeat):
            rounds.append(
                {
                    "floor": run(hello_url),
                    "status": run(f"{stack.queue}/queue/status", status_script),
                    "join": run(f"{stack.queue}/queue/join", JOIN_SCRIPT),
                }
            )
        through_gateway = {
            "status (through gateway)": run(f"{stack.gateway}/queue/status", status_script),
            "join (through gateway)": run(f"{stack.gateway}/queue/join", JOIN_SCRIPT),
        }
        service_env = json.loads((stack.data_dir / "stack.json").read_text())["env"]
        # Configured as the services were (log level, join limit...).
        costs = asyncio.run(app_costs({**service_env, **stack.env}, ticket))

    print()
    print(f"Waiting room, {args.connections} connections, {args.seconds} s each")
    ratios: dict[str, list[float]] = {"status": [], "join": []}
    for number, results in enumerate(rounds, start=1):
        floor = results["floor"]
        print(f"round {number}")
        print(floor.line("  FastAPI hello world (floor)"))
        for name in ratios:
            ratio = results[name].requests_per_second / floor.requests_per_second
            ratios[name].append(ratio)
            print(results[name].line(f"  {name} (queue service)") + f"   {ratio:5.2f}x floor")
    floor = rounds[-1]["floor"]
    print("For reference, through the gateway (as applicants reach the room), to the last floor:")
    for label, result in through_gateway.items():
        ratio = result.requests_per_second / floor.requests_per_second
        print(result.line(f"  {label}") + f"   {ratio:5.2f}x floor")
    status = statistics.median(ratios["status"])
    join = statistics.median(ratios["join"])
    print(
        f"goal: status >= 2x floor (median {status:.2f}x: "
        + ", ".join(f"{r:.2f}" for r in ratios["status"])
        + f"), join >= 1x floor (median {join:.2f}x: "
        + ", ".join(f"{r:.2f}" for r in ratios["join"])
        + ")"
    )
    print()
    print("The same requests without an HTTP server (the app's own cost, in this process):")
    hello_us = costs["hello"]
    for label, micros in costs.items():
        print(f"  {label:<26} {micros:6.1f} us per request   {hello_us / micros:5.2f}x cheaper")


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8001),
    }


async def _per_request_us(app: Any, scope: dict[str, Any], state: Any, count: int) -> float:
    """Microseconds of CPU per request through the ASGI app alone (no server, no socket)."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(200):  # warm-up
        await app({**scope, "state": dict(state or {})}, receive, send)
    assert set(statuses) == {200}, statuses  # noqa: S101 - a benchmark of failures is useless
    started = time.process_time()
    for _ in range(count):
        await app({**scope, "state": dict(state or {})}, receive, send)
    return 1e6 * (time.process_time() - started) / count


def _direct_us(app: Any, scope: dict[str, Any], state: Any, count: int) -> float:
    """Microseconds of CPU per request answered by the app's direct route, as the server
    asks for it (no server, no socket)."""
    for _ in range(200):  # warm-up
        answer = app.answer_directly({**scope, "state": dict(state or {})})
        assert answer is not None and answer.status == 200, answer  # noqa: S101
    started = time.process_time()
    for _ in range(count):
        app.answer_directly({**scope, "state": dict(state or {})})
    return 1e6 * (time.process_time() - started) / count


async def app_costs(
    service_env: dict[str, str], ticket: str, count: int = 20_000
) -> dict[str, float]:
    """The hello world, status and join apps called directly, in this process."""
    namespace: dict[str, Any] = {}
    exec(HELLO_APP, namespace)  # noqa: S102 - our own constant
    hello: FastAPI = namespace["app"]
    os.environ.update(service_env)
    from services.queue.app import create_app  # noqa: PLC0415 - after the environment is set

    queue = create_app()
    async with hello.router.lifespan_context(hello) as hello_state:
        hello_scope = _scope("GET", "/hello", [])
        costs = {"hello": await _per_request_us(hello, hello_scope, hello_state, count)}
    async with queue.router.lifespan_context(queue) as queue_state:
        ticket_header = [(b"x-queue-ticket", ticket.encode())]
        costs["status"] = await _per_request_us(
            queue, _scope("GET", "/queue/status", ticket_header), queue_state, count
        )
        costs["status, answered directly"] = _direct_us(
            queue, _scope("GET", "/queue/status", ticket_header), queue_state, count
        )
        costs["join"] = await _per_request_us(
            queue, _scope("POST", "/queue/join", []), queue_state, count // 4
        )
    return costs


if __name__ == "__main__":
    main()
