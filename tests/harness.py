"""The test harness: real embedded servers once per session, real services per test.

Nothing here is a mock: PostgreSQL, Redis and the Kafka-protocol broker are the same binaries
`meterai up` runs, and services are served by uvicorn on real ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI

from meterai.stack import database_url
from services.gateway.app import create_app as create_gateway
from services.gateway.config import GatewaySettings
from services.inventory import service as inventory_service
from services.inventory.app import create_app as create_inventory
from services.inventory.config import InventorySettings
from services.platform.admission import AdmissionCodec
from services.platform.db import create_engine, create_sessionmaker, transaction
from services.platform.embedded import (
    EmbeddedKafka,
    EmbeddedPostgres,
    EmbeddedRedis,
    ensure_databases,
    free_port,
    free_ports,
)
from services.platform.kafka import TopicSpec, ensure_topics
from services.platform.migrations import upgrade
from services.platform.serve import HTTP, KEEP_ALIVE_SECONDS
from services.platform.supervisor import Supervisor
from services.queue.app import create_app as create_queue
from services.queue.config import QueueSettings
from services.stamping.app import create_app as create_stamping
from services.stamping.config import StampingSettings
from services.stamping.keys import SigningKeyPaths
from services.stamping.worker import create_worker_app

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services"
INTERNAL_SECRET = "test-internal-secret-that-is-long-enough-0123456789"
OPS_TOKEN = "test-ops-token"
ADMISSION_SECRET = "test-admission-secret-that-is-long-enough-0123"
PAYMENT_SECRET = "test-payment-secret-of-the-provider-0123456789"
TEMPLATES = {"inventory": "tmpl_inventory", "stamping": "tmpl_stamping"}


@dataclass
class Infrastructure:
    """The session's servers."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    kafka: EmbeddedKafka
    supervisor: Supervisor
    keys: SigningKeyPaths
    root: Path

    @property
    def postgres_url(self) -> str:
        return self.postgres.url()

    async def create_database(self, service: str) -> str:
        """A fresh, migrated database for one test (cloned from a migrated template)."""
        name = f"t_{service}_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(self.postgres_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATES[service]}"')
        finally:
            await connection.close()
        return database_url(self.postgres_url, name)

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        connection = await asyncpg.connect(self.postgres_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


async def start_infrastructure(root: Path) -> Infrastructure:
    """Start PostgreSQL, Redis and the broker, and migrate the template databases."""
    from services.stamping.keys import create_development_keys

    supervisor = Supervisor(lambda message: None)
    postgres = EmbeddedPostgres(root / "postgres", free_port())
    await asyncio.to_thread(postgres.prepare)
    redis = EmbeddedRedis(root / "redis", free_port())
    kafka = EmbeddedKafka(free_port())
    await supervisor.start_group(
        [
            postgres.spec(root / "logs" / "postgres.log"),
            redis.spec(root / "logs" / "redis.log"),
            kafka.spec(root / "logs" / "kafka.log"),
        ]
    )
    await ensure_databases(postgres.url(), list(TEMPLATES.values()))
    for service, template in TEMPLATES.items():
        await asyncio.to_thread(
            upgrade, SERVICES / service / "migrations", database_url(postgres.url(), template)
        )
    keys = await asyncio.to_thread(create_development_keys, root / "keys")
    return Infrastructure(postgres, redis, kafka, supervisor, keys, root)


class _InProcessServer(uvicorn.Server):
    """uvicorn without its signal handlers: many servers share this test process, and each
    would otherwise install (and later restore) SIGINT/SIGTERM handlers over the others'."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Served:
    """An ASGI app served by uvicorn on a real port, in this event loop."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.server = _InProcessServer(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                lifespan="on",
                http=HTTP,  # the loop is the test's own
                timeout_keep_alive=KEEP_ALIVE_SECONDS,  # as services.platform.serve runs them
            )
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        done, _ = await asyncio.wait({self.task}, timeout=15)
        if not done:  # say what it waits for, then keep waiting (the test timeout ends it)
            state = self.server.server_state
            print(  # noqa: T201 - diagnostics for a hung test
                f"{self.url} has not stopped after 15 s: {len(state.connections)} connections, "
                f"{len(state.tasks)} request tasks; all tasks:",
                file=sys.stderr,
            )
            for task in asyncio.all_tasks():
                task.print_stack(limit=8, file=sys.stderr)
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None


@cache
def _client_tls() -> ssl.SSLContext:
    """The TLS settings of the applicants' clients, made once: httpx would otherwise load the
    CA bundle again for every client (about 40 ms each; the surge tests make 500)."""
    return ssl.create_default_context()


@dataclass
class ServiceStack:
    """Every service of one test, with its own databases, topics and room."""

    infra: Infrastructure
    inventory_db: str
    stamping_db: str
    suffix: str
    blob_dir: Path
    servers: dict[str, Served] = field(default_factory=dict)
    workers: list[Served] = field(default_factory=list)
    # Per-service setting overrides, e.g. {"inventory": {"reservation_ttl_seconds": 1}}.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return self.servers["gateway"].url

    @property
    def event(self) -> str:
        return f"test-{self.suffix}"

    def admission_token(self, ticket: int) -> str:
        """An admission credential for `ticket`, in the waiting room's own format."""
        return AdmissionCodec(ADMISSION_SECRET).issue(self.event, ticket)

    def applicant(self, ticket: int, timeout: float = 30) -> httpx.AsyncClient:
        """An HTTP client for an applicant admitted with queue number `ticket`."""
        return httpx.AsyncClient(
            base_url=self.gateway_url,
            headers={"X-Admission-Token": self.admission_token(ticket)},
            timeout=timeout,
            verify=_client_tls(),
        )

    def common(self) -> dict[str, Any]:
        return {
            "internal_secret": INTERNAL_SECRET,
            "log_json": True,
            "log_level": "WARNING",
            "public_base_url": self.gateway_url if "gateway" in self.servers else "",
        }

    def inventory_settings(self) -> InventorySettings:
        values: dict[str, Any] = {
            **self.common(),
            "database_url": self.inventory_db,
            "kafka_bootstrap_servers": self.infra.kafka.bootstrap_servers,
            "stamping_results_topic": f"stamping.results.{self.suffix}",
            "consumer_group": f"inventory-{self.suffix}",
            "payment_secret": PAYMENT_SECRET,
            "stamping_url": self.servers["stamping"].url,
            **self.overrides.get("inventory", {}),
        }
        return InventorySettings(**values)

    def stamping_settings(self, **overrides: Any) -> StampingSettings:
        keys = self.infra.keys
        values: dict[str, Any] = {
            **self.common(),
            "database_url": self.stamping_db,
            "kafka_bootstrap_servers": self.infra.kafka.bootstrap_servers,
            "inventory_url": self.servers["inventory"].url,
            "blob_store_url": f"file://{self.blob_dir}",
            "requests_topic": f"stamping.requests.{self.suffix}",
            "results_topic": f"stamping.results.{self.suffix}",
            "worker_group": f"signers-{self.suffix}",
            "signing_key_path": keys.signer_key,
            "signing_cert_path": keys.signer_cert,
            "signing_chain_paths": [keys.ca_cert],
            "worker_grace_seconds": 5.0,
            **self.overrides.get("stamping", {}),
        }
        values.update(overrides)
        return StampingSettings(**values)

    async def start(self, *, workers: int = 1) -> None:
        """Start services in dependency order, the gateway last (as `meterai up` does)."""
        await ensure_topics(
            self.infra.kafka.bootstrap_servers,
            [
                TopicSpec(f"stamping.requests.{self.suffix}", 4),
                TopicSpec(f"stamping.results.{self.suffix}", 2),
            ],
        )
        # Inventory and stamping call each other: know both URLs before either starts. The
        # ports are chosen together, so that no server here can be given another's port.
        gateway_port, stamping_port, inventory_port, queue_port = free_ports(4)
        self.servers["gateway"] = Served(FastAPI(), gateway_port)  # placeholder for the URL
        self.servers["stamping"] = Served(FastAPI(), stamping_port)  # placeholder for the URL
        await self._serve("inventory", create_inventory(self.inventory_settings()), inventory_port)
        await self._serve("stamping", create_stamping(self.stamping_settings()), stamping_port)
        await self._serve(
            "queue",
            create_queue(
                QueueSettings(
                    **{
                        **self.common(),
                        "redis_url": self.infra.redis.url(),
                        "event": self.event,
                        "admission_secret": ADMISSION_SECRET,
                        "stamping_url": self.servers["stamping"].url,
                        **self.overrides.get("queue", {}),
                    }
                )
            ),
            queue_port,
        )
        for _ in range(workers):
            await self.add_worker()
        gateway = create_gateway(self.gateway_settings())
        self.servers["gateway"] = Served(gateway, gateway_port)
        await self.servers["gateway"].start()

    def gateway_settings(self, **overrides: Any) -> GatewaySettings:
        """The gateway's settings (another replica built from them shares its Redis buckets)."""
        return GatewaySettings(
            **{
                **self.common(),
                "inventory_url": self.servers["inventory"].url,
                "queue_url": self.servers["queue"].url,
                "stamping_url": self.servers["stamping"].url,
                "ops_token": OPS_TOKEN,
                "event": self.event,
                "admission_secret": ADMISSION_SECRET,
                "redis_url": self.infra.redis.url(),
                # Every test from 127.0.0.1 would otherwise share the public buckets.
                "rate_limit_key_prefix": f"rl:{self.suffix}",
                **self.overrides.get("gateway", {}),
                **overrides,
            }
        )

    async def _serve(self, name: str, app: FastAPI, port: int | None = None) -> None:
        served = Served(app, port)
        await served.start()
        self.servers[name] = served

    async def add_worker(self, **overrides: Any) -> Served:
        """One more signing worker in the consumer group."""
        index = len(self.workers) + 1
        worker = Served(
            create_worker_app(
                self.stamping_settings(worker_id=f"worker-{index}-{self.suffix}", **overrides)
            )
        )
        await worker.start()
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        """Gateway first (no new requests), then the rest together: a consumer that is still
        joining its group takes seconds to leave, and those seconds need not add up."""
        if "gateway" in self.servers:
            await self.servers["gateway"].stop()
        await asyncio.gather(
            *(worker.stop() for worker in self.workers),
            *(
                self.servers[name].stop()
                for name in ("queue", "stamping", "inventory")
                if name in self.servers
            ),
        )

    # Operator actions, done as the CLI does them (same service functions, same database).

    async def create_distributor(self, name: str | None = None, balance: int = 1_000_000) -> str:
        """A new distributor; returns its API key."""
        created: inventory_service.NewDistributor = await self._inventory(
            lambda session: inventory_service.create_distributor(
                session, name or f"distributor-{uuid.uuid4().hex[:8]}", balance
            )
        )
        return created.api_key

    async def mint(self, count: int) -> int:
        minted: int = await self._inventory(
            lambda session: inventory_service.mint_serials(session, count)
        )
        return minted

    async def _inventory(self, work: Any) -> Any:
        engine = create_engine(self.inventory_db, pool_size=1)
        try:
            async with transaction(create_sessionmaker(engine)) as session:
                return await work(session)
        finally:
            await engine.dispose()

    def client(self, api_key: str | None = None) -> httpx.AsyncClient:
        """An HTTP client for the gateway, optionally authenticated as a distributor."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(base_url=self.gateway_url, headers=headers, timeout=30)


@contextlib.asynccontextmanager
async def running_stack(
    infra: Infrastructure,
    tmp: Path,
    workers: int = 1,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[ServiceStack]:
    """A started stack with fresh databases, torn down afterwards."""
    stack = ServiceStack(
        infra=infra,
        inventory_db=await infra.create_database("inventory"),
        stamping_db=await infra.create_database("stamping"),
        suffix=uuid.uuid4().hex[:10],
        blob_dir=tmp / "blobs",
        overrides=overrides or {},
    )
    try:
        await stack.start(workers=workers)
        yield stack
    finally:
        await stack.stop()
        await infra.drop_database(stack.inventory_db)
        await infra.drop_database(stack.stamping_db)


async def wait_for(predicate: Any, within: float = 30.0, interval: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {within}s (last: {value!r})")
        await asyncio.sleep(interval)
