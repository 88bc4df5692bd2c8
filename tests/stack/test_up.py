"""`meterai up` as a newcomer runs it: a subprocess, driven over HTTP only."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from services.platform.embedded import free_port_range
from tests.harness import Infrastructure, wait_for
from tests.pdfs import make_pdf
from tests.pdftools import pdfsig, qpdf_check
from tests.stack.running import meterai, meterai_up, spawn_up

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

PORT_SPAN = 40


def _free_base_port() -> int:
    """A base port whose whole span (services, workers, infrastructure) is free."""
    return free_port_range(PORT_SPAN)


@pytest.fixture
def base_port() -> Iterator[int]:
    yield _free_base_port()


async def test_meterai_up_runs_the_whole_stack_and_keeps_its_data(
    tmp_path: Path, base_port: int
) -> None:
    data_dir = tmp_path / "data"
    document = make_pdf(2)
    async with meterai_up(data_dir, base_port) as stack:
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=30) as client:
            health = (await client.get("/healthz")).json()
            assert health["status"] == "ok"
            assert set(health["services"]) == {"gateway", "inventory", "queue", "stamping"}
            for name in ("inventory", "queue", "stamping"):
                checks = health["services"][name]["checks"]
                assert checks and all(c["status"] == "ok" for c in checks.values()), health
            assert health["services"]["stamping"]["checks"]["signing_workers"]["detail"] == {
                "live": 2
            }
            spec = (await client.get("/openapi.json")).json()
            assert "/api/v1/stampings" in spec["paths"] and "/api/v1/purchases" in spec["paths"]

        created = meterai(data_dir, "distributor", "create", "acme", "--balance", "100000")
        assert created.returncode == 0, created.stderr
        match = re.search(r"api key:\s+(\S+)", created.stdout)
        assert match, created.stdout
        api_key = match.group(1)
        minted = meterai(data_dir, "serials", "mint", "5")
        assert minted.returncode == 0 and "minted 5" in minted.stdout, minted.stderr

        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=stack.gateway, headers=headers, timeout=30) as api:
            purchase = await api.post("/api/v1/purchases", json={"quantity": 3})
            assert purchase.status_code == 201, purchase.text
            upload = await api.post(
                "/api/v1/stampings", files={"file": ("cv.pdf", document, "application/pdf")}
            )
            assert upload.status_code == 202, upload.text
            job_id = upload.json()["id"]

            async def done() -> bool:
                status = (await api.get(f"/api/v1/stampings/{job_id}")).json()
                assert status["status"] != "failed", status
                return bool(status["status"] == "done")

            await wait_for(done, within=60)
            stamped = (await api.get(f"/api/v1/stampings/{job_id}/document")).content

            # The inventory learns of the finished job over Kafka, moments after the job shows
            # done: the stamp counts as used once that result is applied.
            async def stamp_used() -> bool:
                stamps = (await api.get("/api/v1/balance")).json()["stamps"]
                assert stamps["used"] + stamps["sold"] == 3, stamps
                return bool(stamps == {"reserved": 0, "sold": 2, "used": 1})

            await wait_for(stamp_used, within=30)

        path = tmp_path / "stamped.pdf"
        path.write_bytes(stamped)
        report = pdfsig(path)
        assert report.all_valid and report.total_document_signed, report.output
        assert qpdf_check(path).returncode == 0

        processes = stack.descendants()
        names = " ".join(" ".join(p.cmdline()) for p in processes)
        for expected in ("postgres", "redis-server", "tansu", "services.gateway"):
            assert expected in names
        assert names.count("services.stamping.worker") == 2
        stack.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(stack.process.wait, 90) == 0
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"
        assert not (data_dir / "stack.json").exists()

    # A second `up` continues where the first stopped.
    async with meterai_up(data_dir, base_port) as stack:
        async with httpx.AsyncClient(base_url=stack.gateway, headers=headers, timeout=30) as api:
            balance = (await api.get("/api/v1/balance")).json()
            assert balance["balance"] == 70_000
            assert balance["stamps"] == {"reserved": 0, "sold": 2, "used": 1}
            again = await api.get(f"/api/v1/stampings/{job_id}/document")
            assert again.status_code == 200 and again.content == stamped


async def test_sigterm_stops_a_starting_stack_cleanly(tmp_path: Path, base_port: int) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    process = spawn_up(data_dir, log, "--base-port", str(base_port))

    async def postgres_started() -> bool:
        return "postgres ready" in log.read_text()

    await wait_for(postgres_started, within=60)
    processes = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 90) == 0, log.read_text()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"


async def test_a_second_up_on_the_same_data_is_refused(tmp_path: Path, base_port: int) -> None:
    data_dir = tmp_path / "data"
    async with meterai_up(data_dir, base_port, workers=1):
        second = await asyncio.to_thread(
            meterai, data_dir, "up", "--base-port", str(_free_base_port())
        )
        assert second.returncode != 0
        assert "already running" in second.stdout + second.stderr


async def test_configured_urls_replace_the_embedded_servers(
    tmp_path: Path, base_port: int, infra: Infrastructure
) -> None:
    env = {
        "METERAI_POSTGRES_URL": infra.postgres.url(),
        "METERAI_REDIS_URL": infra.redis.url(3),
        "METERAI_KAFKA_BOOTSTRAP_SERVERS": infra.kafka.bootstrap_servers,
    }
    async with meterai_up(tmp_path / "data", base_port, workers=1, env=env) as stack:
        names = [p.name() for p in stack.descendants()]
        assert "postgres" not in names, names
        assert "redis-server" not in names and "tansu" not in names, names
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=30) as client:
            health = (await client.get("/healthz")).json()
            assert health["status"] == "ok", health
            joined = await client.post("/queue/join")
            assert joined.status_code == 200
        created = meterai(tmp_path / "data", "distributor", "create", "external", "--balance", "0")
        assert created.returncode == 0, created.stderr
    # The stack's databases live on the configured server.
    connection = await asyncpg.connect(infra.postgres.url())
    try:
        names_on_server = {
            row["datname"] for row in await connection.fetch("SELECT datname FROM pg_database")
        }
        count = await connection.fetchval("SELECT 1")
    finally:
        await connection.close()
    assert {"meterai_inventory", "meterai_stamping"} <= names_on_server and count == 1
