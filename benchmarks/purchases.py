"""Purchases per second end to end through the gateway, at 64 concurrent connections, next to
a FastAPI hello-world endpoint measured in the same run.

    python -m benchmarks.purchases [--seconds 10] [--connections 64] [--serials 200000]

Starts `meterai up` (no signing workers) on scratch data, creates a distributor with a large
balance, mints the serials, then runs wrk against `POST /api/v1/purchases` (quantity 1).
"""

from __future__ import annotations

import argparse
import re
import time

from benchmarks.common import hello_world, meterai_up, wrk

PURCHASE_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"quantity": 1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serials", type=int, default=200_000)
    args = parser.parse_args()

    with hello_world() as hello_url:
        wrk(hello_url, connections=args.connections, seconds=2)  # warm-up
        floor = wrk(hello_url, connections=args.connections, seconds=args.seconds)

    # One distributor buys as fast as it can (its purchases all need its one balance row): its
    # rate limit is still checked (in Redis, one round trip per lease of 20 tokens, the most a
    # lease holds) but set far above what the machine can reach.
    unlimited = {
        "METERAI_GATEWAY_DISTRIBUTOR_RATE_PER_SECOND": "1000000",
        "METERAI_GATEWAY_DISTRIBUTOR_BURST": "1000000",
    }
    with meterai_up(workers=0, settings=unlimited) as stack:
        created = stack.meterai(
            "distributor", "create", "bench", "--balance", str(args.serials * 10_000)
        )
        api_key = re.search(r"api key:\s+(\S+)", created).group(1)  # type: ignore[union-attr]
        started = time.monotonic()
        stack.meterai("serials", "mint", str(args.serials))
        mint_seconds = time.monotonic() - started
        script = PURCHASE_SCRIPT % api_key
        url = f"{stack.gateway}/api/v1/purchases"
        wrk(url, connections=args.connections, seconds=2, script=script)  # warm-up
        purchases = wrk(url, connections=args.connections, seconds=args.seconds, script=script)
        books = stack.meterai("reconcile")

    print()
    print(f"Purchases through the gateway, {args.connections} connections, {args.seconds} s each")
    print(floor.line("FastAPI hello world (floor)"))
    print(purchases.line("POST /api/v1/purchases (qty 1)"))
    ratio = purchases.requests_per_second / floor.requests_per_second
    print(f"{'purchases / floor':34} {ratio:9.1%}   (goal: at least 20%)")
    print(f"minting {args.serials:,} serials took {mint_seconds:.1f} s")
    print("books after the run:", "agree" if "agree" in books else "DISAGREE\n" + books)


if __name__ == "__main__":
    main()
