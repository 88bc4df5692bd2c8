"""The container image (deploy/Dockerfile, deploy/entrypoint.sh, .dockerignore), checked
without Docker: by reading the files and by running the entrypoint's commands here."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncpg
import httpx
import pytest

from meterai.stack import DATABASES, database_url
from services.platform.embedded import ensure_databases, free_port
from tests.deploy.dockerfile import ignored, stages
from tests.deploy.processes import ENTRYPOINT, ROOT, image_processes
from tests.harness import Infrastructure, wait_for

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
# The venv's python and `meterai`, as the image's PATH has them.
VENV_BIN = str(Path(sys.executable).parent)


def entrypoint(*args: str) -> list[str]:
    return ["sh", str(ENTRYPOINT), *args]


def run_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("METERAI_")}
    return {**base, "PATH": f"{VENV_BIN}{os.pathsep}{base['PATH']}", **extra}


# --------------------------------------------------------------------------------- the processes


def test_the_readme_lists_every_process_of_the_image() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    rows = dict(re.findall(r"^\|[^|\n]*\|\s*`([a-z-]+)`\s*\|\s*`([^`]+)`\s*\|$", readme, re.M))
    processes = {name: p.command for name, p in image_processes().items() if name != "meterai"}
    assert rows == processes


async def test_every_server_process_builds_an_app_with_health_and_metrics() -> None:
    servers = [p for p in image_processes().values() if p.factory is not None]
    assert {p.name for p in servers} == {
        "gateway",
        "queue",
        "inventory",
        "stamping",
        "signing-worker",
    }
    for process in servers:
        assert process.factory is not None
        module, _, name = process.factory.partition(":")
        app = getattr(importlib.import_module(module), name)()
        # Without its lifespan: no dependency is checked yet, but every route answers.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for path in ("/livez", "/readyz", "/metrics"):
                response = await client.get(path)
                assert response.status_code == 200, (process.name, path, response.text)


def test_an_unknown_process_is_refused_with_the_list_of_processes() -> None:
    result = subprocess.run(
        entrypoint("webserver"), env=run_env(), capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 64
    assert "gateway|queue|inventory|stamping|signing-worker|migrate" in result.stderr


async def test_the_gateway_process_serves_probes_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    # Extra arguments reach the server: here, loopback and a free port instead of 0.0.0.0:8000.
    process = await asyncio.create_subprocess_exec(
        *entrypoint("gateway", "--host", "127.0.0.1", "--port", str(port)),
        env=run_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{url}/livez")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(up, within=30)
        probe = await asyncio.create_subprocess_exec(
            *entrypoint("probe", f"{url}/readyz"), env=run_env()
        )
        assert await probe.wait() == 0
        process.send_signal(signal.SIGTERM)
        # `exec` made the server the process itself: it got SIGTERM, not a shell.
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    closed = await asyncio.create_subprocess_exec(
        *entrypoint("probe", f"http://127.0.0.1:{port}/readyz"),
        env=run_env(),
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await closed.wait() != 0


async def test_migrate_migrates_both_databases(infra: Infrastructure) -> None:
    names = {service: f"migrate_{service}_{os.urandom(4).hex()}" for service in DATABASES}
    await ensure_databases(infra.postgres_url, list(names.values()))
    urls = {service: database_url(infra.postgres_url, name) for service, name in names.items()}
    env = run_env(
        METERAI_INVENTORY_DATABASE_URL=urls["inventory"],
        METERAI_STAMPING_DATABASE_URL=urls["stamping"],
    )
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            entrypoint("migrate"),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT / "deploy",  # no .meterai/stack.json to borrow settings from
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["inventory:", "migrated", "stamping:", "migrated"]
        for url in urls.values():
            connection = await asyncpg.connect(url)
            try:
                assert await connection.fetchval("SELECT version_num FROM alembic_version")
            finally:
                await connection.close()
    finally:
        for url in urls.values():
            await infra.drop_database(url)


def test_the_compose_key_step_makes_keys_once(tmp_path: Path) -> None:
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    (command,) = re.findall(r"^\s+- (test -f \S+ \|\| meterai keys init --dir \S+)$", compose, re.M)
    keys = tmp_path / "keys"
    command = command.replace("/var/lib/meterai/keys", str(keys))
    first = subprocess.run(["sh", "-c", command], env=run_env(), timeout=60, check=True)
    assert first.returncode == 0
    made = {path.name: path.stat().st_mtime_ns for path in keys.iterdir()}
    assert set(made) == {"ca.pem", "signer.pem", "signer-key.pem"}
    subprocess.run(["sh", "-c", command], env=run_env(), timeout=60, check=True)
    assert {path.name: path.stat().st_mtime_ns for path in keys.iterdir()} == made


# ------------------------------------------------------------------------------- the Dockerfile


def test_the_image_is_python_slim_and_runs_as_a_fixed_non_root_user() -> None:
    build, runtime = stages(DOCKERFILE)
    assert build.base == runtime.base
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", runtime.base), runtime.base
    assert runtime.arguments("USER") == ["10001:10001"]  # runAsUser in k8s/base
    assert any("--uid 10001" in run for run in runtime.arguments("RUN"))
    assert runtime.arguments("ENTRYPOINT") == ['["meterai-entrypoint"]']
    assert "deploy/entrypoint.sh /usr/local/bin/meterai-entrypoint" in runtime.arguments("COPY")
    assert "--from=build /opt/meterai /opt/meterai" in runtime.arguments("COPY")


def test_the_image_installs_pinned_dependencies_and_no_test_tools() -> None:
    build, runtime = stages(DOCKERFILE)
    runs = " ".join(build.arguments("RUN") + runtime.arguments("RUN"))
    assert "--requirement /tmp/constraints.txt" in runs
    assert "pip install --no-deps . && pip check" in runs
    # poppler-utils, qpdf, zbar and Chromium validate and render in the tests only.
    for tool in ("poppler", "qpdf", "zbar", "chromium", "apt-get"):
        assert tool not in runs


def test_everything_the_image_copies_is_in_the_build_context() -> None:
    sources = []
    for stage in stages(DOCKERFILE):
        for arguments in stage.arguments("COPY"):
            if not arguments.startswith("--from"):
                sources += arguments.split()[:-1]
    assert "services" in sources and "deploy/entrypoint.sh" in sources
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.*")
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not ignored(relative, DOCKERIGNORE), f"{relative} is not sent to Docker"
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".meterai/x"):
        assert ignored(left_out, DOCKERIGNORE), left_out


def test_the_constraints_pin_what_pyproject_pins() -> None:
    def name(requirement: str) -> str:
        return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9.-]+==[\w.+!-]+", line), line
            assert name(line) not in pins, f"{line} twice"
            pins[name(line)] = line.split("==")[1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert "==" in requirement, f"{requirement} is not pinned in pyproject.toml"
        version = requirement.split("==")[1].split(";")[0].strip()
        assert pins.get(name(requirement)) == version, f"{requirement}: run deploy/lock.py"


@pytest.mark.parametrize(
    ("path", "left_out"),
    [("services/platform/app.py", False), ("deploy/lock.py", True), ("README.md", False)],
)
def test_dockerignore_reader(path: str, left_out: bool) -> None:
    assert ignored(path, DOCKERIGNORE) is left_out
