"""API keys rotate with an overlap and revoke within seconds; `meterai reconcile` finds
every disagreement between ledger, balances and serials."""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import pytest
from click.testing import CliRunner, Result

from meterai.cli import main as meterai
from tests.harness import ServiceStack, wait_for

pytestmark = [pytest.mark.workers(0), pytest.mark.settings(gateway={"auth_cache_seconds": 1})]


def cli(stack: ServiceStack, *args: str) -> Result:
    return CliRunner().invoke(
        meterai, list(args), env={"METERAI_INVENTORY_DATABASE_URL": stack.inventory_db}
    )


async def test_rotated_keys_overlap_and_revoked_keys_stop_within_seconds(
    stack: ServiceStack,
) -> None:
    old_key = await stack.create_distributor("rotator")
    rotated = await asyncio.to_thread(
        cli, stack, "distributor", "key", "rotate", "rotator", "--overlap-hours", "0.0008"
    )
    assert rotated.exit_code == 0, rotated.output
    new_key = re.search(r"api key:\s+(\S+)", rotated.output).group(1)  # type: ignore[union-attr]
    async with stack.client(old_key) as old, stack.client(new_key) as new:
        assert (await old.get("/api/v1/balance")).status_code == 200  # still in its overlap
        assert (await new.get("/api/v1/balance")).status_code == 200

        async def old_refused() -> bool:
            return (await old.get("/api/v1/balance")).status_code == 401

        started = time.monotonic()
        await wait_for(old_refused, within=10, interval=0.2)  # overlap ~3 s + cache 1 s
        assert time.monotonic() - started < 8

        listing = await asyncio.to_thread(cli, stack, "distributor", "key", "list", "rotator")
        prefix = listing.output.splitlines()[-1].split("…")[0]
        assert new_key.startswith(prefix)
        revoked = await asyncio.to_thread(
            cli, stack, "distributor", "key", "revoke", "rotator", prefix
        )
        assert revoked.exit_code == 0 and "revoked 1" in revoked.output

        async def new_refused() -> bool:
            response = await new.get("/api/v1/balance")
            return response.status_code == 401 and response.json()["code"] == "invalid_api_key"

        started = time.monotonic()
        await wait_for(new_refused, within=5, interval=0.1)
        assert time.monotonic() - started < 3  # the gateway's cache lasts 1 s here

    missing = await asyncio.to_thread(cli, stack, "distributor", "key", "rotate", "nobody")
    assert missing.exit_code == 1 and "No distributor named" in missing.output


async def test_reconcile_agrees_then_names_each_disagreement(stack: ServiceStack) -> None:
    await stack.mint(10)
    api_key = await stack.create_distributor("books", balance=100_000)
    async with stack.client(api_key) as client:
        bought = (await client.post("/api/v1/purchases", json={"quantity": 3})).json()
    async with stack.applicant(1) as applicant:
        await applicant.post("/api/v1/purchases", json={"quantity": 1})

    clean = await asyncio.to_thread(cli, stack, "reconcile")
    assert clean.exit_code == 0, clean.output
    assert "ledger, balances and serials agree" in clean.output
    assert re.search(r"serials_sold\s+3", clean.output)
    assert re.search(r"serials_reserved\s+1", clean.output)

    connection = await asyncpg.connect(stack.inventory_db.replace("+asyncpg", ""))
    try:
        await connection.execute("UPDATE distributors SET balance = balance + 1")
        await connection.execute(
            "UPDATE serials SET state = 'available', owner = NULL, purchase_id = NULL "
            "WHERE serial = $1",
            bought["serials"][0],
        )
        await connection.execute(
            "INSERT INTO ledger_entries (txn_id, account, unit, amount, memo) "
            "VALUES (gen_random_uuid(), 'deposits', 'IDR', 5, 'stray leg')"
        )
    finally:
        await connection.close()
    broken = await asyncio.to_thread(cli, stack, "reconcile")
    assert broken.exit_code == 1
    mismatches = [line for line in broken.output.splitlines() if line.startswith("MISMATCH")]
    assert any("does not balance in IDR" in line for line in mismatches)
    assert any("distributor books: balance Rp 70,001" in line for line in mismatches)
    assert any("serials are available but stamps:pool holds" in line for line in mismatches)
    assert any("owns 2 unused serials but the ledger says 3" in line for line in mismatches)
