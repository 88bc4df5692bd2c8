"""`meterai up`: the whole system on one machine, as separate processes like in production.

Embedded PostgreSQL, Redis and a Kafka-protocol broker start when no URLs are configured;
migrations and topics are applied; then inventory, stamping, queue, N signing workers and the
gateway start, each its own process under a supervisor. Data lives in the data directory, so the
next `up` continues where the last one stopped.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from services.platform.db import create_engine, create_sessionmaker
from services.platform.embedded import (
    EmbeddedKafka,
    EmbeddedPostgres,
    EmbeddedRedis,
    ensure_databases,
)
from services.platform.kafka import TopicSpec, ensure_topics
from services.platform.migrations import upgrade
from services.platform.supervisor import ProcessSpec, ReadyCheck, Supervisor
from services.stamping.config import StampingSettings
from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.relay import replay_after_broker_loss

SERVICES_DIR = Path(__file__).resolve().parent.parent / "services"
# Results published a little before the lost broker started may still have been waiting in it.
BROKER_REPLAY_MARGIN = timedelta(minutes=1)
# After a restart, the embedded broker is trusted again this much later (see _broker_ready).
BROKER_SETTLE_SECONDS = 10.0
DATABASES = {"inventory": "meterai_inventory", "stamping": "meterai_stamping"}
STACK_FILE = "stack.json"


class StackSettings(BaseSettings):
    """Where the stack keeps its data and which external servers it uses (none: embedded)."""

    model_config = SettingsConfigDict(env_prefix="METERAI_", extra="ignore")

    data_dir: Path = Path(".meterai")
    host: str = "127.0.0.1"
    base_port: int = 8000
    workers: int = 2
    # The waiting room's event (e.g. "cpns-2024"): admission credentials are valid for it only.
    event: str = "default"
    # A PostgreSQL server URL; the stack creates one database per service on it.
    postgres_url: str | None = None
    redis_url: str | None = None
    kafka_bootstrap_servers: str | None = None


@dataclass(frozen=True)
class Ports:
    gateway: int
    queue: int
    inventory: int
    stamping: int
    postgres: int
    redis: int
    kafka: int
    first_worker: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(
            gateway=base,
            queue=base + 1,
            inventory=base + 2,
            stamping=base + 3,
            postgres=base + 32,
            redis=base + 33,
            kafka=base + 34,
            first_worker=base + 10,
        )


@dataclass
class Endpoints:
    """Where each piece runs once the stack is up (written to `stack.json` for the CLI)."""

    postgres_server: str
    redis: str
    kafka: str
    services: dict[str, str] = field(default_factory=dict)


def _secrets(data_dir: Path) -> dict[str, str]:
    """Per-installation secrets, created on first use and kept across restarts."""
    path = data_dir / "secrets.json"
    values: dict[str, str] = {}
    if path.exists():
        values = json.loads(path.read_text())
    wanted = (
        "internal_secret",
        "ops_token",
        "admission_secret",
        "payment_secret",
        "callback_secret",
    )
    if all(name in values for name in wanted):
        return values
    # Data directories from older versions lack the newer secrets: add them, keep the rest.
    for name in wanted:
        values.setdefault(name, secrets.token_urlsafe(32))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(values, handle)
    return values


def database_url(server_url: str, database: str) -> str:
    """The URL of `database` on the server at `server_url`."""
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def stack_env(data_dir: Path) -> dict[str, str]:
    """The environment of a running local stack (for CLI commands), or {} if none runs."""
    path = data_dir / STACK_FILE
    if not path.exists():
        return {}
    env: dict[str, str] = json.loads(path.read_text())["env"]
    return env


class Stack:
    def __init__(self, settings: StackSettings, announce: Callable[[str], None]) -> None:
        self.settings = settings
        self.announce = announce
        self.data_dir = settings.data_dir.resolve()
        self.ports = Ports.from_base(settings.base_port)
        self.supervisor = Supervisor(announce)
        self.logs = self.data_dir / "logs"
        self._broker_started: datetime | None = None
        self._stamping_database: str | None = None
        self._replays: set[asyncio.Task[None]] = set()

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    async def start_infrastructure(self) -> Endpoints:
        """Embedded servers for what is not configured; databases, migrations, topics."""
        settings, host = self.settings, self.settings.host
        specs: list[ProcessSpec] = []
        postgres = settings.postgres_url
        if postgres is None:
            embedded_pg = EmbeddedPostgres(self.data_dir / "postgres", self.ports.postgres, host)
            await asyncio.to_thread(embedded_pg.prepare)
            specs.append(embedded_pg.spec(self._log("postgres")))
            postgres = embedded_pg.url()
        redis = settings.redis_url
        if redis is None:
            embedded_redis = EmbeddedRedis(self.data_dir / "redis", self.ports.redis, host)
            specs.append(embedded_redis.spec(self._log("redis")))
            redis = embedded_redis.url()
        kafka = settings.kafka_bootstrap_servers
        if kafka is None:
            broker = EmbeddedKafka(self.ports.kafka, host)
            spec = broker.spec(self._log("kafka"))
            # This broker forgets its topics and messages when it restarts: recreate the topics
            # every time, and have stamping publish again what may have been lost.
            spec.on_ready = lambda: self._broker_ready(broker.bootstrap_servers)
            specs.append(spec)
            kafka = broker.bootstrap_servers
        if specs:
            await self.supervisor.start_group(specs)
        await ensure_databases(postgres, list(DATABASES.values()))
        for service, database in DATABASES.items():
            await asyncio.to_thread(
                upgrade, SERVICES_DIR / service / "migrations", database_url(postgres, database)
            )
        self.announce("migrations applied")
        if settings.kafka_bootstrap_servers is not None:
            await self._create_topics(kafka)
        return Endpoints(postgres_server=postgres, redis=redis, kafka=kafka)

    async def _broker_ready(self, bootstrap: str) -> None:
        # Back empty: a client may have made a topic with the broker's default partition count
        # before this runs; such a topic is replaced (its keys would miss some consumers).
        await self._create_topics(bootstrap, replace_smaller=self._broker_started is not None)
        previous, self._broker_started = self._broker_started, datetime.now(UTC)
        if previous is None or self._stamping_database is None:
            return  # first start: nothing was published to it yet
        since = previous - BROKER_REPLAY_MARGIN
        await self._replay(since, "kafka restarted empty")
        # The embedded broker also drops some of what it acknowledges in its first seconds
        # back (messages that clients sent before the topics existed again): once more, later.
        replay = asyncio.create_task(self._replay_after(BROKER_SETTLE_SECONDS, since))
        self._replays.add(replay)
        replay.add_done_callback(self._replays.discard)

    async def _replay_after(self, delay: float, since: datetime) -> None:
        await asyncio.sleep(delay)
        await self._replay(since, f"kafka restarted {delay:.0f} s ago")

    async def _replay(self, since: datetime, why: str) -> None:
        assert self._stamping_database is not None  # noqa: S101 - services started
        try:
            queued, results = await _replay_lost_messages(self._stamping_database, since)
        except Exception as exc:  # noqa: BLE001 - the stack keeps running; say what to do
            self.announce(f"could not republish what kafka lost ({exc!r}); restart the stack")
            return
        self.announce(f"{why}: {queued} queued jobs and {results} results published again")

    async def _create_topics(self, bootstrap: str, *, replace_smaller: bool = False) -> None:
        stamping = StampingSettings()
        await ensure_topics(
            bootstrap,
            [
                TopicSpec(stamping.requests_topic, stamping.requests_partitions),
                TopicSpec(stamping.results_topic, stamping.results_partitions),
            ],
            replace_smaller=replace_smaller,
        )

    def service_env(self, endpoints: Endpoints) -> dict[str, str]:
        """Environment for every service process (each reads only its own prefix)."""
        host, ports = self.settings.host, self.ports
        keys = SigningKeyPaths.in_directory(self.data_dir / "keys")
        secrets_ = _secrets(self.data_dir)
        env = {
            "METERAI_ENVIRONMENT": "development",
            "METERAI_INTERNAL_SECRET": secrets_["internal_secret"],
            "METERAI_ADMISSION_SECRET": secrets_["admission_secret"],
            "METERAI_EVENT": self.settings.event,
            "METERAI_INVENTORY_PAYMENT_SECRET": secrets_["payment_secret"],
            "METERAI_STAMPING_CALLBACK_SECRET": secrets_["callback_secret"],
            "METERAI_PUBLIC_BASE_URL": f"http://{host}:{ports.gateway}",
            "METERAI_KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka,
            "METERAI_GATEWAY_INVENTORY_URL": f"http://{host}:{ports.inventory}",
            "METERAI_GATEWAY_QUEUE_URL": f"http://{host}:{ports.queue}",
            "METERAI_GATEWAY_STAMPING_URL": f"http://{host}:{ports.stamping}",
            "METERAI_GATEWAY_OPS_TOKEN": secrets_["ops_token"],
            "METERAI_GATEWAY_REDIS_URL": endpoints.redis,
            "METERAI_INVENTORY_DATABASE_URL": database_url(
                endpoints.postgres_server, DATABASES["inventory"]
            ),
            "METERAI_QUEUE_REDIS_URL": endpoints.redis,
            "METERAI_QUEUE_STAMPING_URL": f"http://{host}:{ports.stamping}",
            "METERAI_STAMPING_DATABASE_URL": database_url(
                endpoints.postgres_server, DATABASES["stamping"]
            ),
            "METERAI_STAMPING_INVENTORY_URL": f"http://{host}:{ports.inventory}",
            "METERAI_INVENTORY_STAMPING_URL": f"http://{host}:{ports.stamping}",
            "METERAI_STAMPING_BLOB_STORE_URL": f"file://{self.data_dir / 'blobs'}",
            "METERAI_STAMPING_SIGNING_KEY_PATH": str(keys.signer_key),
            "METERAI_STAMPING_SIGNING_CERT_PATH": str(keys.signer_cert),
            "METERAI_STAMPING_SIGNING_CHAIN_PATHS": json.dumps([str(keys.ca_cert)]),
        }
        # Settings the operator gave explicitly win over the stack's defaults.
        return {name: os.environ.get(name, value) for name, value in env.items()}

    def _uvicorn(self, name: str, factory: str, port: int, env: dict[str, str]) -> ProcessSpec:
        host = self.settings.host
        return ProcessSpec(
            name=name,
            argv=[
                sys.executable,
                "-m",
                "services.platform.serve",
                factory,
                "--host",
                host,
                "--port",
                str(port),
            ],
            env=env,
            ready=_http_ok(f"http://{host}:{port}/livez"),
            log_path=self._log(name),
        )

    async def start_services(self, endpoints: Endpoints) -> None:
        env = self.service_env(endpoints)
        self._stamping_database = env["METERAI_STAMPING_DATABASE_URL"]
        keys = SigningKeyPaths.in_directory(self.data_dir / "keys")
        if not keys.exist() and "METERAI_STAMPING_SIGNING_KEY_PATH" not in os.environ:
            await asyncio.to_thread(create_development_keys, keys.directory)
            self.announce(f"development signing keys created in {keys.directory}")
        ports, host = self.ports, self.settings.host
        await self.supervisor.start_group(
            [
                self._uvicorn(
                    "inventory", "services.inventory.app:create_app", ports.inventory, env
                ),
                self._uvicorn("stamping", "services.stamping.app:create_app", ports.stamping, env),
                self._uvicorn("queue", "services.queue.app:create_app", ports.queue, env),
            ]
        )
        workers = []
        for index in range(self.settings.workers):
            port = ports.first_worker + index
            name = f"signer-{index + 1}"
            workers.append(
                ProcessSpec(
                    name=name,
                    argv=signing_worker_argv(host, port),
                    env={**env, "METERAI_STAMPING_WORKER_ID": name},
                    ready=_http_ok(f"http://{host}:{port}/livez"),
                    stop_timeout=30,
                    log_path=self._log(name),
                )
            )
        if workers:
            await self.supervisor.start_group(workers)
        await self.supervisor.start_group(
            [self._uvicorn("gateway", "services.gateway.app:create_app", ports.gateway, env)]
        )
        endpoints.services = {
            "gateway": f"http://{host}:{ports.gateway}",
            "queue": f"http://{host}:{ports.queue}",
            "inventory": f"http://{host}:{ports.inventory}",
            "stamping": f"http://{host}:{ports.stamping}",
        }
        self._write_stack_file(endpoints, env)

    def _write_stack_file(self, endpoints: Endpoints, env: dict[str, str]) -> None:
        path = self.data_dir / STACK_FILE
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(
                {
                    "pid": os.getpid(),
                    "services": endpoints.services,
                    "postgres": endpoints.postgres_server,
                    "redis": endpoints.redis,
                    "kafka": endpoints.kafka,
                    "env": env,
                },
                handle,
                indent=2,
            )

    async def stop(self) -> None:
        (self.data_dir / STACK_FILE).unlink(missing_ok=True)
        for replay in list(self._replays):
            replay.cancel()
        await asyncio.gather(*self._replays, return_exceptions=True)
        await self.supervisor.stop()


async def _replay_lost_messages(database_url: str, finished_since: datetime) -> tuple[int, int]:
    """Stamping's outbox gets again what an emptied broker may not have delivered."""
    engine = create_engine(database_url, pool_size=1)
    try:
        return await replay_after_broker_loss(
            create_sessionmaker(engine),
            results_topic=StampingSettings().results_topic,
            finished_since=finished_since,
        )
    finally:
        await engine.dispose()


def signing_worker_argv(host: str, port: int) -> list[str]:
    """The command of a signing worker serving its health and metrics on `host:port`."""
    return [
        sys.executable,
        "-m",
        "services.platform.serve",
        "services.stamping.worker:create_worker_app",
        "--host",
        host,
        "--port",
        str(port),
        "--graceful-seconds",
        "5",
    ]


def _http_ok(url: str) -> ReadyCheck:
    """Ready check: `url` answers 2xx."""

    async def check() -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(url)
            response.raise_for_status()

    return check


def _lock(data_dir: Path) -> int:
    """One `up` per data directory: a second one would fight over the same database."""
    descriptor = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RuntimeError(f"another `meterai up` is already running on {data_dir}") from None
    return descriptor


async def run_stack(settings: StackSettings, announce: Callable[[str], None]) -> int:
    """Bring the stack up, print where it is, and run until SIGINT or SIGTERM."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(data_dir)
    stack = Stack(settings, announce)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(_start(stack))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is None:
            _print_summary(stack, starting.result(), announce)
            await stopped
        elif starting.done():
            announce(f"failed to start: {starting.exception()}")
            return 1
        else:
            starting.cancel()
        return 0
    finally:
        announce("stopping…")
        for task in (starting, stopped):
            task.cancel()
        await asyncio.gather(starting, stopped, return_exceptions=True)
        await stack.stop()
        os.close(lock)
        announce("stopped; data kept in " + str(data_dir))


async def _start(stack: Stack) -> Endpoints:
    endpoints = await stack.start_infrastructure()
    await stack.start_services(endpoints)
    return endpoints


def _print_summary(stack: Stack, endpoints: Endpoints, announce: Callable[[str], None]) -> None:
    secrets_ = _secrets(stack.data_dir)
    lines = [
        "",
        "Meterai is up.",
        f"  gateway (public API): {endpoints.services['gateway']}",
        f"  waiting room page:    {endpoints.services['gateway']}/",
        f"  OpenAPI:              {endpoints.services['gateway']}/openapi.json",
        f"  health:               {endpoints.services['gateway']}/healthz",
        f"  ops token:            {secrets_['ops_token']}",
        f"  payment callback:     {endpoints.services['gateway']}/api/v1/payments/notify "
        f"(HMAC secret in {stack.data_dir / 'secrets.json'})",
        f"  signing workers:      {stack.settings.workers}",
        f"  postgres:             {endpoints.postgres_server}",
        f"  redis:                {endpoints.redis}",
        f"  kafka:                {endpoints.kafka}",
        f"  data and logs:        {stack.data_dir}",
        f"Create a distributor: {os.environ.get('METERAI_PROG', 'meterai')} "
        "distributor create NAME --balance 1000000",
        "Press Ctrl-C to stop.",
    ]
    for line in lines:
        announce(line)
