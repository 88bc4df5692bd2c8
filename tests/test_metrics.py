"""Every service's /metrics has what operators watch, and the Grafana dashboard in deploy/
queries nothing that no service exports (so the two cannot drift apart).

The services of a test stack share this process and so one Prometheus registry: each /metrics
shows everything. The per-service checks below still name what each service must export; the
dashboard check reads the union.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, ServiceStack, wait_for
from tests.pdfs import make_pdf

DASHBOARD = ROOT / "deploy" / "grafana" / "meterai.json"
_METRIC_NAME = re.compile(r"\bmeterai_[a-z0-9_]+\b")
# A route of each service that the traffic below answered with a 404.
ERRORS = {
    "gateway": "/api/v1/purchases/{purchase_id}",
    "inventory": "/api/v1/purchases/{purchase_id}",
    "stamping": "/api/v1/stampings/{job_id}",
    "queue": "/queue/status",
}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


@pytest.fixture
def stack(shared_stack: ServiceStack) -> ServiceStack:
    return shared_stack


@pytest.fixture(scope="module")
async def expositions(shared_stack: ServiceStack) -> dict[str, str]:
    """Each server's /metrics after some traffic: a purchase, a stamp signed, a 404."""
    stack = shared_stack
    await stack.mint(2)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        assert (await client.post("/api/v1/purchases", json={"quantity": 1})).status_code == 201
        job = await client.post(
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
        assert job.status_code == 202, job.text

        async def done() -> bool:
            response = await client.get(f"/api/v1/stampings/{job.json()['id']}")
            return bool(response.json()["status"] == "done")

        await wait_for(done, within=60)
        for path in (
            f"/api/v1/purchases/{uuid.UUID(int=0)}",
            f"/api/v1/stampings/{uuid.UUID(int=0)}",
        ):
            assert (await client.get(path)).status_code == 404
    async with stack.client() as anonymous:
        assert (await anonymous.get("/queue/status")).status_code == 404  # no ticket
    servers = {name: served.url for name, served in stack.servers.items()}
    servers |= {f"worker-{index}": worker.url for index, worker in enumerate(stack.workers)}
    async with stack.client() as client:

        async def all_set() -> dict[str, str] | None:
            texts = {
                name: (await client.get(f"{url}/metrics")).text for name, url in servers.items()
            }
            # The waiting room's tick, its look at stamping's backlog and the consumers' lag
            # are periodic: wait until each has happened once.
            needed = {
                "queue": "meterai_queue_length ",
                "stamping": "meterai_stamping_backlog_jobs ",
                "worker-0": f'group="signers-{stack.suffix}"',
                "inventory": f'group="inventory-{stack.suffix}"',
            }
            return texts if all(text in texts[name] for name, text in needed.items()) else None

        result: dict[str, str] = await wait_for(all_set, within=30)
    return result


def samples(text: str) -> dict[str, list[str]]:
    """Sample name -> the label sets it has, from the text exposition format."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ")[0]
        found.setdefault(name, []).append(rest.rpartition("}")[0] if rest else "")
    return found


def declared(text: str) -> dict[str, str]:
    """Metric family -> type, from the `# TYPE` lines (present before any sample is)."""
    return {
        parts[2]: parts[3]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and len(parts := line.split()) == 4
    }


def has_route_sample(text: str, name: str, route: str, status: str | None = None) -> bool:
    labels = samples(text).get(name, [])
    wanted = [f'route="{route}"'] + ([f'status="{status}"'] if status else [])
    return any(all(part in label for part in wanted) for label in labels)


@pytest.mark.parametrize(
    ("server", "route"),
    [
        ("gateway", "/api/v1/purchases"),
        ("inventory", "/api/v1/purchases"),
        ("stamping", "/api/v1/stampings"),
        ("queue", "/queue/status"),
    ],
)
async def test_rate_errors_and_duration_per_route(
    expositions: dict[str, str], server: str, route: str
) -> None:
    text = expositions[server]
    assert has_route_sample(text, f"meterai_{server}_http_requests_total", route)
    assert has_route_sample(text, f"meterai_{server}_http_request_duration_seconds_bucket", route)
    assert f"meterai_{server}_http_requests_in_flight" in samples(text)
    # Errors are the same counter, by status.
    assert has_route_sample(
        text, f"meterai_{server}_http_requests_total", ERRORS[server], status="404"
    )


async def test_the_waiting_room_the_backlog_the_lag_and_signing(
    stack: ServiceStack, expositions: dict[str, str]
) -> None:
    queue = samples(expositions["queue"])
    for name in (
        "meterai_queue_length",
        "meterai_queue_active",
        "meterai_queue_admission_rate_per_minute",
        "meterai_queue_admitted_total",
        "meterai_queue_backend_pressure",
    ):
        assert name in queue, name
    assert "meterai_stamping_backlog_jobs" in samples(expositions["stamping"])
    # Lag of both consumer groups of the stack, per topic and partition.
    for server, group, topic in (
        ("worker-0", f"signers-{stack.suffix}", f"stamping.requests.{stack.suffix}"),
        ("inventory", f"inventory-{stack.suffix}", f"stamping.results.{stack.suffix}"),
    ):
        lag = samples(expositions[server])["meterai_kafka_consumer_lag_messages"]
        assert any(
            f'group="{group}"' in labels and f'topic="{topic}"' in labels and "partition=" in labels
            for labels in lag
        ), (group, lag)
    worker = samples(expositions["worker-0"])
    assert "meterai_signer_signing_duration_seconds_bucket" in worker
    count = re.search(
        r"^meterai_signer_signing_duration_seconds_count (\S+)$", expositions["worker-0"], re.M
    )
    assert count is not None and float(count.group(1)) >= 1


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(Path(DASHBOARD).read_text())
    return document


def queries(document: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in document["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    document = dashboard()
    assert document["uid"] == "meterai" and document["title"]
    assert isinstance(document["schemaVersion"], int)
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in document["panels"]:
        assert panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
    # What operators asked to see, each in some query.
    text = "\n".join(queries(document))
    for service in ("gateway", "queue", "inventory", "stamping"):
        assert f"meterai_{service}_http_requests_total" in text
        assert f"meterai_{service}_http_request_duration_seconds_bucket" in text
    for name in (
        "meterai_queue_length",
        "meterai_queue_active",
        "meterai_queue_admitted_total",
        "meterai_queue_admission_rate_per_minute",
        "meterai_queue_backend_pressure",
        "meterai_stamping_backlog_jobs",
        "meterai_kafka_consumer_lag_messages",
        "meterai_signer_signing_duration_seconds_bucket",
        'route="/api/v1/purchases"',
    ):
        assert name in text, name


async def test_every_metric_the_dashboard_queries_is_exported(
    expositions: dict[str, str],
) -> None:
    exported: set[str] = set()
    for text in expositions.values():
        exported |= samples(text).keys()
        for family, kind in declared(text).items():
            # Families with labels but no samples yet still declare their type.
            exported |= {family + suffix for suffix in _SUFFIXES.get(kind, ("",))}
            exported.add(family)
    used = {name for query in queries(dashboard()) for name in _METRIC_NAME.findall(query)}
    assert used
    missing = used - exported
    assert not missing, f"the dashboard queries metrics no service exports: {sorted(missing)}"
