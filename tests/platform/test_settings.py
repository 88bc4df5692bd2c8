"""Shared settings: read from `METERAI_*`, and placeholder secrets refused in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.platform.settings import DEV_INTERNAL_SECRET, Environment, ServiceSettings

REAL_SECRET = "a-real-production-secret-of-enough-length-0123"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "METERAI_ENVIRONMENT",
        "METERAI_INTERNAL_SECRET",
        "METERAI_LOG_LEVEL",
        "METERAI_LOG_JSON",
        "METERAI_PUBLIC_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def test_development_defaults() -> None:
    settings = ServiceSettings()
    assert settings.environment is Environment.development
    assert settings.internal_secret.get_secret_value() == DEV_INTERNAL_SECRET
    assert DEV_INTERNAL_SECRET not in repr(settings)


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ValidationError, match="internal_secret must be set to a real secret"):
        ServiceSettings(environment=Environment.production)


def test_production_refuses_a_short_secret() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        ServiceSettings(environment="production", internal_secret="x" * 31)


def test_production_refuses_any_secret_that_is_still_a_placeholder() -> None:
    with pytest.raises(ValidationError):
        ServiceSettings(environment="production", internal_secret="please-change-me-" + "x" * 40)


def test_production_accepts_a_real_secret() -> None:
    settings = ServiceSettings(environment="production", internal_secret=REAL_SECRET)
    assert settings.internal_secret.get_secret_value() == REAL_SECRET


def test_the_shared_variables_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERAI_INTERNAL_SECRET", REAL_SECRET)
    monkeypatch.setenv("METERAI_ENVIRONMENT", "production")
    monkeypatch.setenv("METERAI_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("METERAI_LOG_JSON", "false")
    settings = ServiceSettings()
    assert settings.internal_secret.get_secret_value() == REAL_SECRET
    assert settings.environment is Environment.production
    assert settings.log_level == "DEBUG"
    assert settings.log_json is False


def test_production_from_the_environment_without_a_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERAI_ENVIRONMENT", "production")
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_a_service_can_add_its_own_secrets_to_the_check() -> None:
    class OpsSettings(ServiceSettings):
        ops_token: str = "ops-token-change-me"

        def secrets(self) -> dict[str, str]:
            return {**super().secrets(), "ops_token": self.ops_token}

    assert OpsSettings().ops_token == "ops-token-change-me"
    with pytest.raises(ValidationError, match="ops_token"):
        OpsSettings(environment="production", internal_secret=REAL_SECRET)
