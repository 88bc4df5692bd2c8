"""Settings shared by every service; each service subclasses `ServiceSettings` with a prefix."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_INTERNAL_SECRET = "meterai-development-internal-secret-change-me"  # noqa: S105
DEV_ADMISSION_SECRET = "meterai-development-admission-secret-change-me"  # noqa: S105


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


def shared(name: str) -> AliasChoices:
    """A stack-wide setting: `shared("INTERNAL_SECRET")` reads `METERAI_INTERNAL_SECRET`.

    Every service reads the same variable, so operators set common values once.
    """
    return AliasChoices(f"METERAI_{name}", name.lower())


def per_service(service: str, name: str) -> AliasChoices:
    """`METERAI_<SERVICE>_<NAME>`, falling back to the stack-wide `METERAI_<NAME>`."""
    return AliasChoices(f"METERAI_{service}_{name}", f"METERAI_{name}", name.lower())


class ServiceSettings(BaseSettings):
    """What every service needs; subclasses add their URLs with `env_prefix="METERAI_<SVC>_"`."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    environment: Environment = Field(
        default=Environment.development, validation_alias=shared("ENVIRONMENT")
    )
    # Signs the principal token the gateway passes to services and services pass to each other.
    internal_secret: SecretStr = Field(
        default=SecretStr(DEV_INTERNAL_SECRET), validation_alias=shared("INTERNAL_SECRET")
    )
    log_level: str = Field(default="INFO", validation_alias=shared("LOG_LEVEL"))
    log_json: bool = Field(default=True, validation_alias=shared("LOG_JSON"))
    # Where clients reach the public API (the gateway): used in links such as QR codes.
    public_base_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=shared("PUBLIC_BASE_URL")
    )

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Self:
        if self.environment is Environment.production:
            for name, value in self.secrets().items():
                if "change-me" in value or len(value) < 32:
                    raise ValueError(
                        f"{name} must be set to a real secret of at least 32 characters "
                        "in production"
                    )
        return self

    def secrets(self) -> dict[str, str]:
        """Secrets that must not keep their development placeholders in production."""
        return {"internal_secret": self.internal_secret.get_secret_value()}
