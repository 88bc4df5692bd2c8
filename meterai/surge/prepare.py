"""Before the rush: find the stack, give distributors their keys and money, make sure there are
serials enough, set the room, and start the payment provider."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from meterai.paysim import SECRET_ENV
from meterai.surge.plan import DistributorAccount
from services.gateway.config import GatewaySettings
from services.inventory import service as inventory
from services.inventory.config import InventorySettings
from services.inventory.models import Serial, SerialState
from services.platform.db import create_engine, create_sessionmaker, transaction
from services.platform.embedded import free_port
from services.stamping.config import StampingSettings


class SurgeError(Exception):
    """The surge cannot run as asked (said in words an operator can act on)."""


@dataclass(frozen=True)
class Target:
    """The running stack: its public address, its operator's token, the payment provider's
    secret, and its databases (for the checks)."""

    gateway: str
    ops_token: str
    payment_secret: str
    stamp_price: int
    inventory_db: str
    stamping_db: str

    @classmethod
    def from_environment(cls, gateway: str) -> Target:
        """The stack `meterai up` describes (the CLI puts its settings in the environment),
        or the servers the METERAI_* variables name."""
        inventory_settings = InventorySettings()
        return cls(
            gateway=gateway.rstrip("/"),
            ops_token=GatewaySettings().ops_token.get_secret_value(),
            payment_secret=inventory_settings.payment_secret.get_secret_value(),
            stamp_price=inventory_settings.stamp_price_rupiah,
            inventory_db=inventory_settings.database_url,
            stamping_db=StampingSettings().database_url,
        )

    @property
    def ops_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ops_token}"}


async def check_health(target: Target) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(f"{target.gateway}/healthz")
        except httpx.TransportError as exc:
            raise SurgeError(
                f"nothing answers at {target.gateway} ({exc.__class__.__name__}); "
                "start the stack first (`meterai up`) or name it with --gateway"
            ) from exc
    if response.status_code != 200:
        raise SurgeError(f"the stack is not healthy: {response.text[:500]}")


async def room(target: Target) -> dict[str, Any]:
    """The room as operators see it (GET /ops/queue)."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{target.gateway}/ops/queue", headers=target.ops_headers)
    if response.status_code != 200:
        raise SurgeError(f"GET /ops/queue: {response.status_code} {response.text[:300]}")
    view: dict[str, Any] = response.json()
    return view


async def set_room(target: Target, **changes: Any) -> dict[str, Any]:
    """Change the room's run-time settings (PATCH /ops/queue), as an operator does."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.patch(
            f"{target.gateway}/ops/queue", json=changes, headers=target.ops_headers
        )
    if response.status_code != 200:
        raise SurgeError(f"PATCH /ops/queue: {response.status_code} {response.text[:300]}")
    view: dict[str, Any] = response.json()
    return view


async def create_distributors(
    target: Target, count: int, stamps_each: int, run_id: str
) -> list[DistributorAccount]:
    """`count` new distributors, each with the balance for `stamps_each` stamps."""
    engine = create_engine(target.inventory_db, pool_size=1)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            accounts = []
            for number in range(1, count + 1):
                name = f"surge-{run_id}-{number}"
                created = await inventory.create_distributor(
                    session, name, stamps_each * target.stamp_price
                )
                accounts.append(DistributorAccount(name, created.api_key))
            return accounts
    finally:
        await engine.dispose()


async def ensure_serials(target: Target, needed: int) -> int:
    """Mint what the pool lacks for `needed` sales; returns how many were minted."""
    engine = create_engine(target.inventory_db, pool_size=1)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            available = await session.scalar(
                select(func.count())
                .select_from(Serial)
                .where(Serial.state == SerialState.available)
            )
            missing = needed - int(available or 0)
            if missing <= 0:
                return 0
            return await inventory.mint_serials(session, missing)
    finally:
        await engine.dispose()


@contextmanager
def payment_provider(target: Target, log: Path) -> Iterator[str]:
    """The payment provider simulator (`meterai.paysim`) as a process of its own; its URL."""
    port = free_port()
    env = {**os.environ, SECRET_ENV: target.payment_secret}
    with open(log, "wb") as output:
        process = subprocess.Popen(  # noqa: S603 - our own module, with fixed arguments
            [
                sys.executable,
                "-m",
                "meterai.paysim",
                "--port",
                str(port),
                "--notify-url",
                f"{target.gateway}/api/v1/payments/notify",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_live(f"{url}/livez", process, log)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_live(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SurgeError(f"the payment provider exited:\n{log.read_text()[-2000:]}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise SurgeError("the payment provider did not start within 30 s")
