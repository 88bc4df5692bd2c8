"""What the inventory tests share: a serial's row, and inventory's internal API as stamping
calls it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from services.platform.http import ServiceClient, create_http_client
from services.platform.identity import Principal, PrincipalCodec, PrincipalKind
from services.stamping.inventory_client import InventoryClient
from tests.harness import INTERNAL_SECRET, ServiceStack


async def serial_row(stack: ServiceStack, serial: str) -> asyncpg.Record:
    """The serial's state, job and owner, read from inventory's database."""
    connection = await asyncpg.connect(stack.inventory_db)
    try:
        row = await connection.fetchrow(
            "SELECT state::text, job_id, owner FROM serials WHERE serial = $1", serial
        )
    finally:
        await connection.close()
    assert row is not None
    return row


@contextlib.asynccontextmanager
async def as_stamping(stack: ServiceStack) -> AsyncIterator[InventoryClient]:
    """Inventory's internal API, called as stamping calls it."""
    http = create_http_client(stack.servers["inventory"].url, timeout=5)
    try:
        yield InventoryClient(
            ServiceClient(
                http, PrincipalCodec(INTERNAL_SECRET), Principal(PrincipalKind.service, "stamping")
            )
        )
    finally:
        await http.aclose()
