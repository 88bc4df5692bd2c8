"""Property-based testing of the public API against its own OpenAPI document (Schemathesis).

The gateway's merged document is fetched from the running stack and Schemathesis generates
valid and invalid requests for every operation, authenticated as a distributor so the protected
routes get past the edge. No answer may be a 5xx, and every answer must match the document:
its status is documented, its content type and body fit the schema.

The CLI runs in a subprocess: the services share this test's event loop, which must keep
serving while the requests arrive.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

from prometheus_client import REGISTRY

from tests.harness import ServiceStack

ST = Path(sys.executable).parent / "st"
MAX_EXAMPLES = 80  # per operation and phase: about 1,700 requests in all, in ~20 s
MIN_REQUESTS = 1_000
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


async def test_the_public_api_matches_its_document(stack: ServiceStack, tmp_path: Path) -> None:
    await stack.mint(3_000)
    api_key = await stack.create_distributor(balance=10**12)
    before = gateway_requests()
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{stack.gateway_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {api_key}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261129",
        # One worker: two threads of it can trip CPython 3.11's AST recursion check inside
        # Hypothesis ("AST constructor recursion depth mismatch"), an error of the tool.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--warnings",
        "off",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    output, _ = await process.communicate()
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    # What reached the gateway (its own counter: the services share this process).
    requests = gateway_requests() - before
    generated = re.search(r"(\d+) generated", text)
    print(  # noqa: T201 - the budget, in the test's output
        f"schemathesis: {generated and generated.group(1)} test cases, {requests:.0f} requests "
        f"to the gateway in {elapsed:.1f} s"
    )
    assert process.returncode == 0, text
    assert requests >= MIN_REQUESTS, text


def gateway_requests() -> float:
    """Requests the gateway has answered so far, all routes and statuses."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "meterai_gateway_http_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
