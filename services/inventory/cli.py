"""Operator commands of the inventory service (mounted under `meterai`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory import service
from services.inventory.config import InventorySettings
from services.platform.db import create_engine, create_sessionmaker, transaction
from services.platform.errors import MeteraiError

T = TypeVar("T")


def _run_in_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction on the inventory database, with operator-friendly errors."""
    url = InventorySettings().database_url

    async def run() -> T:
        engine = create_engine(url, pool_size=1)
        try:
            async with transaction(create_sessionmaker(engine)) as session:
                return await work(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except MeteraiError as exc:
        raise click.ClickException(exc.detail) from exc
    except (OSError, DBAPIError) as exc:
        if isinstance(exc, IntegrityError):
            raise click.ClickException(_integrity_message(exc)) from exc
        where = make_url(url).render_as_string(hide_password=True)
        raise click.ClickException(
            f"cannot reach the inventory database at {where} ({exc.__class__.__name__}); "
            "is `meterai up` running, or is METERAI_INVENTORY_DATABASE_URL set?"
        ) from exc


def _integrity_message(exc: IntegrityError) -> str:
    if "uq_distributors_name" in str(exc.orig):
        return "a distributor with that name already exists"
    return f"refused by the database: {exc.orig}"


@click.group()
def distributor() -> None:
    """Distributors: companies that buy stamps in bulk through the API."""


@distributor.command("create")
@click.argument("name")
@click.option(
    "--balance",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Opening prepaid balance in rupiah.",
)
def create_distributor(name: str, balance: int) -> None:
    """Create distributor NAME and print its API key (shown only this once)."""
    created = _run_in_transaction(lambda s: service.create_distributor(s, name, balance))
    click.echo(f"distributor: {created.distributor.id}")
    click.echo(f"name:        {created.distributor.name}")
    click.echo(f"balance:     Rp {created.distributor.balance:,}")
    click.echo(f"api key:     {created.api_key}")
    click.echo("Store the API key now: only its hash is kept.", err=True)


@distributor.group("key")
def key() -> None:
    """API keys: rotate with an overlap, revoke, list."""


@key.command("rotate")
@click.argument("name")
@click.option(
    "--overlap-hours",
    type=click.FloatRange(min=0),
    default=24.0,
    show_default=True,
    help="How long the current keys keep working, so clients can switch over.",
)
def rotate_key(name: str, overlap_hours: float) -> None:
    """Issue a new API key for distributor NAME (printed once)."""
    api_key = _run_in_transaction(
        lambda s: service.rotate_api_key(s, name, overlap=timedelta(hours=overlap_hours))
    )
    click.echo(f"api key:     {api_key}")
    click.echo(f"The previous keys stop working in {overlap_hours:g} hours.", err=True)


@key.command("revoke")
@click.argument("name")
@click.argument("prefix")
def revoke_key(name: str, prefix: str) -> None:
    """Revoke NAME's keys starting with PREFIX (see `key list`); effective within seconds."""
    revoked = _run_in_transaction(lambda s: service.revoke_api_key(s, name, prefix))
    if not revoked:
        raise click.ClickException(f"no active key of {name} starts with {prefix!r}")
    click.echo(f"revoked {revoked} key(s)")


@key.command("list")
@click.argument("name")
def list_keys(name: str) -> None:
    """NAME's keys: prefix, created, expires, revoked."""
    for api_key in _run_in_transaction(lambda s: service.list_api_keys(s, name)):
        expires = f"{api_key.expires_at:%Y-%m-%d %H:%M}" if api_key.expires_at else "-"
        revoked = f"{api_key.revoked_at:%Y-%m-%d %H:%M}" if api_key.revoked_at else "-"
        click.echo(
            f"{api_key.prefix}…  created {api_key.created_at:%Y-%m-%d %H:%M}  "
            f"expires {expires}  revoked {revoked}"
        )


@click.command()
def reconcile() -> None:
    """Check that ledger, balances and serial counts agree, and say where they do not."""
    result = _run_in_transaction(service.reconcile)
    for name, value in result.totals.items():
        click.echo(f"{name:22} {value:,}")
    for line in result.needs_attention:
        click.echo(f"attention: {line}")
    if not result.ok:
        for line in result.discrepancies:
            click.echo(f"MISMATCH: {line}")
        raise SystemExit(1)
    click.echo("ledger, balances and serials agree")


@click.group()
def serials() -> None:
    """The pool of e-meterai serial numbers."""


@serials.command("mint")
@click.argument("count", type=click.IntRange(min=1, max=10_000_000))
def mint(count: int) -> None:
    """Add COUNT fresh, unguessable serials to the pool."""
    minted = _run_in_transaction(lambda s: service.mint_serials(s, count))
    click.echo(f"minted {minted} serials")
