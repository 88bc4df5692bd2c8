"""The `meterai` command: run the stack, prepare databases, and operators' chores."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import datetime
from pathlib import Path

import click

from meterai.stack import DATABASES, SERVICES_DIR, StackSettings, run_stack, stack_env
from services.inventory.cli import distributor, reconcile, serials
from services.stamping.cli import keys


def _announce(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    click.echo(f"[{stamp}] {message}" if message else "", err=False)
    sys.stdout.flush()


@click.group()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the local stack keeps its data [env METERAI_DATA_DIR; default .meterai].",
)
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None) -> None:
    """Meterai: sell and affix e-meterai through a deadline surge."""
    if data_dir is not None:
        os.environ["METERAI_DATA_DIR"] = str(data_dir)
    settings = StackSettings()
    ctx.obj = {"data_dir": settings.data_dir}
    # Commands run against the local stack unless the environment names other servers.
    for name, value in stack_env(settings.data_dir).items():
        os.environ.setdefault(name, value)


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(min=0, max=64),
    default=None,
    help="Signing worker processes [default 2].",
)
@click.option(
    "--base-port",
    type=click.IntRange(min=1024, max=65000),
    default=None,
    help="Gateway port; the other services use the next ports [default 8000].",
)
@click.option("--host", default=None, help="Interface to listen on [default 127.0.0.1].")
def up(workers: int | None, base_port: int | None, host: str | None) -> None:
    """Start the whole stack on this machine (embedded infrastructure unless URLs are set)."""
    overrides: dict[str, object] = {}
    if workers is not None:
        overrides["workers"] = workers
    if base_port is not None:
        overrides["base_port"] = base_port
    if host is not None:
        overrides["host"] = host
    settings = StackSettings(**overrides)  # type: ignore[arg-type]
    raise SystemExit(asyncio.run(run_stack(settings, _announce)))


@main.command()
def migrate() -> None:
    """Apply database migrations of every service (uses the services' database URLs)."""
    from services.inventory.config import InventorySettings
    from services.platform.migrations import upgrade
    from services.stamping.config import StampingSettings

    urls = {
        "inventory": InventorySettings().database_url,
        "stamping": StampingSettings().database_url,
    }
    for service in DATABASES:
        upgrade(SERVICES_DIR / service / "migrations", urls[service])
        click.echo(f"{service}: migrated")


main.add_command(distributor)
main.add_command(serials)
main.add_command(reconcile)
main.add_command(keys)
