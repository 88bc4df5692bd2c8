"""The house rules that keep the services apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parent.parent / "services"
OWN = ("gateway", "queue", "inventory", "stamping")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", OWN)
def test_a_service_never_imports_another_service(service: str) -> None:
    offending = []
    for path in (SERVICES / service).rglob("*.py"):
        for module in imported_modules(path):
            parts = module.split(".")
            if len(parts) >= 2 and parts[0] == "services" and parts[1] not in (service, "platform"):
                offending.append(f"{path.relative_to(SERVICES)} imports {module}")
    assert offending == []


def test_platform_knows_nothing_about_the_services() -> None:
    offending = [
        f"{path.relative_to(SERVICES)} imports {module}"
        for path in (SERVICES / "platform").rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[:2] in (["services", name] for name in OWN)
    ]
    assert offending == []
