"""What the code says a deployment must match: the image's processes, their ports and settings.

Read from the sources of truth, never restated: the processes and ports from
deploy/entrypoint.sh, the environment variables from the settings classes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from meterai.stack import Endpoints, Stack, StackSettings
from services.gateway.config import GatewaySettings
from services.inventory.config import InventorySettings
from services.queue.config import QueueSettings
from services.stamping.config import StampingSettings

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"

# The settings each process of the image reads (every class it instantiates).
SETTINGS_OF: dict[str, tuple[type[BaseSettings], ...]] = {
    "gateway": (GatewaySettings,),
    "queue": (QueueSettings,),
    "inventory": (InventorySettings,),
    "stamping": (StampingSettings,),
    "signing-worker": (StampingSettings,),
    "migrate": (InventorySettings, StampingSettings),
}

_SERVE = re.compile(r"^\s*([a-z-]+)\)\s+serve\s+(\S+:\S+)\s+(\d+)\b(.*?);;", re.MULTILINE)
_EXEC = re.compile(r"^\s*([a-z-]+)\)\s+exec\s+(meterai\b[^;]*);;", re.MULTILINE)
_GRACEFUL = re.compile(r"--graceful-seconds\s+(\d+)")


@dataclass(frozen=True)
class Process:
    """One process of the image: `meterai-entrypoint <name>`."""

    name: str
    command: str
    factory: str | None = None
    port: int | None = None
    graceful_seconds: float = 10.0  # services.platform.serve's default


def image_processes() -> dict[str, Process]:
    """The processes deploy/entrypoint.sh starts, by name."""
    text = ENTRYPOINT.read_text()
    processes = {}
    for name, factory, port, rest in _SERVE.findall(text):
        graceful = _GRACEFUL.search(rest)
        processes[name] = Process(
            name,
            f"python -m services.platform.serve {factory} --port {port}",
            factory,
            int(port),
            float(graceful.group(1)) if graceful else 10.0,
        )
    for name, command in _EXEC.findall(text):
        processes[name] = Process(name, command.replace('"$@"', "").strip())
    return processes


def accepted_env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables pydantic-settings reads for `settings` (upper case).

    A field with a validation alias is read from its alias choices only; any other from the
    class's env_prefix plus its name. Names are case-insensitive (case_sensitive is off).
    """
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def env_names_of(process: str) -> set[str]:
    """Every variable some settings class of `process` reads."""
    names: set[str] = set()
    for settings in SETTINGS_OF[process]:
        names |= accepted_env_names(settings)
    return names


def required_env_names(process: str, data_dir: Path) -> set[str]:
    """What `meterai up`, a working stack, sets for `process`: its URLs, paths and secrets,
    which defaults meant for one machine (127.0.0.1, relative paths) would get wrong."""
    stack = Stack(StackSettings(data_dir=data_dir), announce=lambda message: None)
    endpoints = Endpoints(postgres_server="postgresql://p@db/x", redis="redis://r", kafka="k:1")
    return set(stack.service_env(endpoints)) & env_names_of(process)


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Exactly `values` as the METERAI_ part of the environment, for the duration."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("METERAI_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


def load_settings(process: str, values: Mapping[str, str]) -> list[BaseSettings]:
    """The settings `process` would build from `values` (raises as the process would)."""
    with environment(values):
        return [settings() for settings in SETTINGS_OF[process]]
