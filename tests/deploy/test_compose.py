"""deploy/docker-compose.yml, checked without Docker: its structure (services, dependencies,
health checks, volumes) and its agreement with the code (settings, ports, topics, databases)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.stamping.config import StampingSettings
from tests.deploy.processes import (
    ROOT,
    env_names_of,
    image_processes,
    load_settings,
    required_env_names,
)

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")

Service = dict[str, Any]


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME-default}` in every string."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if operator == ":-" and not env.get(name):
            return str(argument)
        if operator == "-" and name not in env:
            return str(argument)
        assert operator in (None, ":-", "-"), f"${{{name}{operator}...}} would stop compose"
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return dict(interpolate(yaml.safe_load(COMPOSE.read_text()), env or {}))


def variables() -> set[str]:
    """Every variable the file lets the operator set (deploy/.env or the shell)."""
    return {name for name, _, _ in _VARIABLE.findall(COMPOSE.read_text())}


def ours(service: Service) -> bool:
    """Runs the Meterai image."""
    return "build" in service and service["build"]["dockerfile"] == "deploy/Dockerfile"


def process_of(service: Service) -> str | None:
    """The image process a service runs (None: a shell command of its own)."""
    if "entrypoint" in service:
        return None
    return str(service["command"][0])


def port_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


@pytest.fixture
def services() -> dict[str, Service]:
    return dict(compose()["services"])


def test_the_file_has_infrastructure_services_and_one_shot_steps(
    services: dict[str, Service],
) -> None:
    assert {"postgres", "redis", "kafka", "kafka-topics", "keys", "migrate"} <= set(services)
    processes = {process_of(s) for s in services.values() if ours(s)}
    # Every process of the image but the operators' `meterai`, and the keys step (a shell).
    assert processes == {None, *image_processes()} - {"meterai"}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    roles = set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}, "KRaft: the broker is its own controller"
    assert not any("ZOOKEEPER" in name for name in kafka["environment"])
    assert kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_dependencies_exist_and_their_conditions_can_be_met(services: dict[str, Service]) -> None:
    for name, service in services.items():
        for target, dependency in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = dependency["condition"]
            assert condition in CONDITIONS, f"{name} → {target}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no health check"
            if condition == "service_completed_successfully":
                assert services[target]["restart"] == "no", f"{target} is not a one-shot step"


def test_every_long_running_service_has_a_health_check(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "healthcheck" in service, name


def test_services_start_after_their_migrations_topics_and_infrastructure(
    services: dict[str, Service],
) -> None:
    needs = {
        "migrate": {"postgres"},
        "inventory": {"migrate", "kafka-topics"},
        "stamping": {"migrate", "kafka-topics", "keys"},
        "signing-worker": {"migrate", "kafka-topics", "keys"},
        "queue": {"redis"},
        "gateway": {"redis", "queue", "inventory", "stamping"},
    }
    for name, wanted in needs.items():
        assert wanted <= set(services[name]["depends_on"]), name


def test_volumes_are_declared_and_bind_mounts_exist(services: dict[str, Service]) -> None:
    declared = set(compose()["volumes"])
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
            else:
                assert source in declared, volume
                used.add(source)
            assert target.startswith("/"), volume
    assert used == declared


def test_health_checks_probe_readiness_on_the_process_port(services: dict[str, Service]) -> None:
    processes = image_processes()
    for name, service in services.items():
        process = process_of(service) if ours(service) else None
        if process is None or processes[process].port is None:
            continue
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "meterai-entrypoint", "probe"], name
        url = urlsplit(test[3])
        assert (url.hostname, url.port, url.path) == (
            "127.0.0.1",
            processes[process].port,
            "/readyz",
        ), name
    gateway_port = processes["gateway"].port
    assert services["gateway"]["ports"] == [f"8000:{gateway_port}"]


def test_every_variable_is_a_setting_the_process_reads(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if not ours(service):
            assert not any(v.startswith("METERAI_") for v in service.get("environment", {})), name
            continue
        process = process_of(service)
        env = service.get("environment", {})
        if process is None:
            assert env == {}, name
            continue
        unknown = set(env) - env_names_of(process)
        assert unknown == set(), f"{name} sets what it never reads"
        load_settings(process, {k: str(v) for k, v in env.items()})


def test_every_service_gets_what_a_working_stack_sets(
    services: dict[str, Service], tmp_path: Path
) -> None:
    for name, service in services.items():
        process = process_of(service) if ours(service) else None
        if process is not None:
            missing = required_env_names(process, tmp_path) - set(service["environment"])
            assert missing == set(), name


def test_a_production_env_file_reaches_every_secret() -> None:
    # What deploy/README.md tells operators to put in deploy/.env.
    given = {"METERAI_ENVIRONMENT": "production"} | {
        name: secrets.token_urlsafe(32)
        for name in variables()
        if name.endswith(("_SECRET", "_TOKEN"))
    }
    for service in compose(given)["services"].values():
        process = process_of(service) if ours(service) else None
        if process is not None:
            env = {k: str(v) for k, v in service["environment"].items()}
            load_settings(process, env)  # production refuses a placeholder left unset


def test_urls_point_at_the_services_that_serve_them(services: dict[str, Service]) -> None:
    processes = image_processes()
    topics_command = services["kafka-topics"]["command"][0]
    kafka_listener = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    postgres = services["postgres"]["environment"]
    databases = re.findall(
        r"CREATE DATABASE (\w+);", (DEPLOY / "postgres" / "init-databases.sql").read_text()
    )
    for name, service in services.items():
        for variable, value in service.get("environment", {}).items():
            if not variable.startswith("METERAI_"):
                continue
            value = str(value)
            if value.startswith("http://") and variable != "METERAI_PUBLIC_BASE_URL":
                host, port = port_of(value)
                target = process_of(services[host])
                assert target is not None and processes[target].port == port, (name, variable)
            elif value.startswith("redis://"):
                assert port_of(value) == ("redis", 6379), (name, variable)
            elif value.startswith("postgresql://"):
                url = urlsplit(value)
                assert (url.hostname, url.port) == ("postgres", 5432), (name, variable)
                assert url.username == postgres["POSTGRES_USER"]
                assert url.password == postgres["POSTGRES_PASSWORD"]
                assert url.path.lstrip("/") in databases, (name, variable)
            elif variable == "METERAI_KAFKA_BOOTSTRAP_SERVERS":
                assert kafka_listener == f"PLAINTEXT://{value}", name
                assert f"--bootstrap-server {value}" in topics_command


def test_topics_are_made_as_the_code_expects(services: dict[str, Service]) -> None:
    settings = StampingSettings()
    command = services["kafka-topics"]["command"][0]
    made = {
        topic: int(partitions)
        for topic, partitions in re.findall(r"--topic (\S+) --partitions (\d+)", command)
    }
    assert made == {
        settings.requests_topic: settings.requests_partitions,
        settings.results_topic: settings.results_partitions,
    }
    workers = int(services["signing-worker"]["deploy"]["replicas"])
    assert made[settings.requests_topic] >= workers
    for service in services.values():
        overridden = [v for v in service.get("environment", {}) if v.endswith(("_TOPIC", "_GROUP"))]
        assert overridden == [], "the topics above are the settings' defaults"


def test_stamping_and_workers_share_documents_and_keys(services: dict[str, Service]) -> None:
    for name in ("stamping", "signing-worker"):
        service = services[name]
        env = service["environment"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        blobs = env["METERAI_STAMPING_BLOB_STORE_URL"].removeprefix("file://")
        assert mounts.get(blobs) == "blobs", name
        key = env["METERAI_STAMPING_SIGNING_KEY_PATH"].rsplit("/", 1)[0]
        assert mounts.get(key) == "keys", name
    keys_step = services["keys"]["command"][0]
    assert "--dir /var/lib/meterai/keys" in keys_step
    assert services["keys"]["volumes"] == ["keys:/var/lib/meterai/keys"]


def test_workers_finish_their_jobs_within_the_stop_grace_period(
    services: dict[str, Service],
) -> None:
    worker = services["signing-worker"]
    grace = float(
        worker["environment"].get(
            "METERAI_STAMPING_WORKER_GRACE_SECONDS", StampingSettings().worker_grace_seconds
        )
    )
    period = int(worker["stop_grace_period"].removesuffix("s"))
    assert period > grace + image_processes()["signing-worker"].graceful_seconds


def test_postgres_18_keeps_its_data_on_the_volume(services: dict[str, Service]) -> None:
    postgres = services["postgres"]
    major = int(re.match(r"postgres:(\d+)", postgres["image"]).group(1))  # type: ignore[union-attr]
    target = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    assert f"postgres:{target}" in postgres["volumes"]
