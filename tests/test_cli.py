"""The `meterai` command's chores, run as an operator would."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterai.cli import main
from tests.harness import Infrastructure


@pytest.fixture
async def inventory_db(infra: Infrastructure) -> AsyncIterator[str]:
    url = await infra.create_database("inventory")
    try:
        yield url
    finally:
        await infra.drop_database(url)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_keys_init_writes_keys_once(tmp_path: Path) -> None:
    code, output = run("keys", "init", "--dir", str(tmp_path / "keys"))
    assert code == 0, output
    assert (tmp_path / "keys" / "signer-key.pem").stat().st_mode & 0o077 == 0
    code, output = run("keys", "init", "--dir", str(tmp_path / "keys"))
    assert code == 1 and "--force" in output
    before = (tmp_path / "keys" / "signer.pem").read_bytes()
    assert run("keys", "init", "--dir", str(tmp_path / "keys"), "--force")[0] == 0
    assert (tmp_path / "keys" / "signer.pem").read_bytes() != before


def test_distributor_create_and_mint(inventory_db: str, tmp_path: Path) -> None:
    env = {"METERAI_INVENTORY_DATABASE_URL": inventory_db, "METERAI_DATA_DIR": str(tmp_path)}
    code, output = run("distributor", "create", "pos-indonesia", "--balance", "250000", env=env)
    assert code == 0, output
    assert re.search(r"api key:\s+mtr_\S{40,}", output)
    assert "Rp 250,000" in output
    code, output = run("distributor", "create", "pos-indonesia", env=env)
    assert code == 1 and "already exists" in output
    code, output = run("distributor", "create", "x", "--balance", "-5", env=env)
    assert code == 2
    code, output = run("serials", "mint", "25", env=env)
    assert code == 0 and "minted 25 serials" in output


def test_an_unreachable_database_is_explained(tmp_path: Path) -> None:
    env = {
        "METERAI_INVENTORY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing",
        "METERAI_DATA_DIR": str(tmp_path),
    }
    code, output = run("serials", "mint", "1", env=env)
    assert code == 1
    assert "cannot reach the inventory database" in output and "meterai up" in output
