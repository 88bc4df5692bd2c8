"""Waiting-room status and join: throughput and p99 at 64 concurrent connections, next to a
FastAPI hello-world endpoint measured in the same run.

    python -m benchmarks.queue [--seconds 10] [--connections 64]

Starts `meterai up` (no signing workers, no per-address join limit: every request of wrk
comes from one address), takes one ticket for the status runs, then runs wrk against the
queue service itself (the goal: status at least 2x the floor, join at least the floor) and,
for reference, through the gateway (one more HTTP hop, as applicants reach it).
"""

from __future__ import annotations

import argparse

import httpx

from benchmarks.common import WrkResult, hello_world, meterai_up, wrk

JOIN_SCRIPT = 'wrk.method = "POST"\n'
STATUS_SCRIPT = 'wrk.headers["X-Queue-Ticket"] = "%s"\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()

    def run(url: str, script: str) -> WrkResult:
        wrk(url, connections=args.connections, seconds=2, script=script)  # warm-up
        return wrk(url, connections=args.connections, seconds=args.seconds, script=script)

    with hello_world() as hello_url:
        wrk(hello_url, connections=args.connections, seconds=2)  # warm-up
        floor = wrk(hello_url, connections=args.connections, seconds=args.seconds)

    settings = {"METERAI_QUEUE_JOIN_LIMIT_PER_IP": "0", "METERAI_QUEUE_PAUSED": "true"}
    with meterai_up(workers=0, settings=settings) as stack:
        ticket = httpx.post(f"{stack.queue}/queue/join").json()["ticket"]
        status_script = STATUS_SCRIPT % ticket
        results = {
            "status (queue service)": run(f"{stack.queue}/queue/status", status_script),
            "join (queue service)": run(f"{stack.queue}/queue/join", JOIN_SCRIPT),
            "status (through gateway)": run(f"{stack.gateway}/queue/status", status_script),
            "join (through gateway)": run(f"{stack.gateway}/queue/join", JOIN_SCRIPT),
        }

    print()
    print(f"Waiting room, {args.connections} connections, {args.seconds} s each")
    print(floor.line("FastAPI hello world (floor)"))
    for label, result in results.items():
        ratio = result.requests_per_second / floor.requests_per_second
        print(result.line(label) + f"   {ratio:5.2f}x floor")
    status = results["status (queue service)"].requests_per_second / floor.requests_per_second
    join = results["join (queue service)"].requests_per_second / floor.requests_per_second
    print(f"goal: status >= 2x floor ({status:.2f}x), join >= 1x floor ({join:.2f}x)")


if __name__ == "__main__":
    main()
