"""Operator commands of the stamping service (mounted under `meterai`)."""

from __future__ import annotations

from pathlib import Path

import click

from services.stamping.keys import create_development_keys


@click.group()
def keys() -> None:
    """Signing keys for the stamp signatures."""


@keys.command("init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the keys [default: <data dir>/keys].",
)
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.pass_context
def init(ctx: click.Context, directory: Path | None, force: bool) -> None:
    """Create a development CA and a signing certificate (not for production)."""
    if directory is None:
        directory = Path(ctx.obj["data_dir"]) / "keys" if ctx.obj else Path("keys")
    try:
        paths = create_development_keys(directory, overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc} (use --force to replace them)") from exc
    click.echo(f"CA certificate:      {paths.ca_cert}")
    click.echo(f"signing certificate: {paths.signer_cert}")
    click.echo(f"signing key:         {paths.signer_key}")
