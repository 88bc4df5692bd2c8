"""Operator commands of the inventory service (mounted under `meterai`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory import service
from services.inventory.config import InventorySettings
from services.platform.db import create_engine, create_sessionmaker, transaction

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


@click.group()
def serials() -> None:
    """The pool of e-meterai serial numbers."""


@serials.command("mint")
@click.argument("count", type=click.IntRange(min=1, max=10_000_000))
def mint(count: int) -> None:
    """Add COUNT fresh, unguessable serials to the pool."""
    minted = _run_in_transaction(lambda s: service.mint_serials(s, count))
    click.echo(f"minted {minted} serials")
