"""The `meterai` command: run the stack, prepare databases, and operators' chores."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import click

from meterai.stack import (
    DATABASES,
    SERVICES_DIR,
    STACK_FILE,
    StackSettings,
    run_stack,
    stack_env,
)
from meterai.surge.plan import CURVES
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


def _faults_option(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from meterai.surge.faults import parse_faults
    from meterai.surge.prepare import SurgeError

    try:
        parse_faults(value)
    except SurgeError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


@main.command()
@click.option("--applicants", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option(
    "--over",
    "ramp_seconds",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds over which the applicants arrive.",
)
@click.option(
    "--curve",
    type=click.Choice(CURVES),
    default="linear",
    show_default=True,
    help="linear: a steady stream; accelerating: ever more as the deadline nears; "
    "burst: half of them in the first tenth.",
)
@click.option("--distributors", type=click.IntRange(min=0), default=3, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Stamps a distributor buys and stamps at once.",
)
@click.option("--batches", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--batch-interval",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    help="Seconds between a distributor's batches.",
)
@click.option(
    "--verify-fraction",
    type=click.FloatRange(0, 1),
    default=0.02,
    show_default=True,
    help="Share of applicants who check their stamped document at POST /api/v1/verify.",
)
@click.option(
    "--admit-per-minute",
    type=click.IntRange(min=0),
    default=None,
    help="The room's admission rate for the run (PATCH /ops/queue; restored afterwards).",
)
@click.option(
    "--max-active",
    type=click.IntRange(min=0),
    default=None,
    help="The room's limit of active admitted sessions for the run (restored afterwards).",
)
@click.option(
    "--baseline",
    type=click.FloatRange(min=0),
    default=None,
    help="The standalone signing rate (jobs/s) for the same number of workers, from "
    "`python -m benchmarks.stamping --part stack`: the report compares the surge's with it.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the report [default DATA_DIR/surge/<date-time>].",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Stop the load after this long, finished or not.",
)
@click.option(
    "--settle-seconds",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="After the load, how long to wait for unfinished jobs before checking.",
)
@click.option(
    "--connections",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Connections the crowd may open to the gateway at once (keep it above the requests "
    "in flight, or they queue in the load generator).",
)
@click.option(
    "--faults",
    default=None,
    callback=_faults_option,
    help="During the rush, kill or restart parts of the local stack one at a time: `all`, or "
    "some of worker,stamping,inventory,queue,gateway,broker,postgres,redis,redis-lost; the "
    "report has a table of recovery times, what clients saw and the invariants after each.",
)
@click.option(
    "--fault-first-after",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    help="Seconds into the rush before the first fault.",
)
@click.option(
    "--fault-gap",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds between one fault's recovery and the next fault.",
)
@click.option(
    "--gateway", default=None, help="The stack's public URL [default: the running `meterai up`]."
)
@click.pass_context
def surge(
    ctx: click.Context,
    applicants: int,
    ramp_seconds: float,
    curve: str,
    distributors: int,
    batch_size: int,
    batches: int,
    batch_interval: float,
    verify_fraction: float,
    admit_per_minute: int | None,
    max_active: int | None,
    baseline: float | None,
    report_dir: Path | None,
    max_minutes: float,
    settle_seconds: float,
    connections: int,
    faults: str | None,
    fault_first_after: float,
    fault_gap: float,
    gateway: str | None,
) -> None:
    """Rehearse a deadline rush against the running stack and write a report (HTML + PNG).

    Applicants arrive along the curve, wait in the room, buy, pay at a simulated provider,
    upload a reference PDF, download the stamp (a sample verifies it); distributors buy and
    stamp in batches. Afterwards the databases are checked: exits 1 if an invariant fails or a
    server error other than a shed 503 was seen.
    """
    from meterai.surge.prepare import SurgeError
    from meterai.surge.run import SurgeOptions, run_surge

    stack_file = ctx.obj["data_dir"] / STACK_FILE
    # The local stack's processes (for the report's CPU figures), unless another one is named.
    local = gateway is None and stack_file.exists()
    stack_pid = json.loads(stack_file.read_text())["pid"] if local else None
    gateway = gateway or os.environ.get("METERAI_PUBLIC_BASE_URL")
    if not gateway:
        raise click.ClickException("no running stack found: start `meterai up`, or give --gateway")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    options = SurgeOptions(
        gateway=gateway,
        report_dir=report_dir or ctx.obj["data_dir"] / "surge" / stamp,
        applicants=applicants,
        ramp_seconds=ramp_seconds,
        curve=curve,
        distributors=distributors,
        batch_size=batch_size,
        batches=batches,
        batch_interval_seconds=batch_interval,
        verify_fraction=verify_fraction,
        admit_per_minute=admit_per_minute,
        max_active=max_active,
        baseline=baseline,
        max_seconds=60 * max_minutes,
        drain_seconds=settle_seconds,
        stack_pid=stack_pid,
        connections=connections,
        faults=faults,
        fault_first_after=fault_first_after,
        fault_gap=fault_gap,
    )
    try:
        code = run_surge(options, _announce)
    except SurgeError as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)


main.add_command(distributor)
main.add_command(serials)
main.add_command(reconcile)
main.add_command(keys)
