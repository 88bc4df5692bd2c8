"""Gateway settings (environment prefix `METERAI_GATEWAY_`)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.platform.settings import (
    DEV_ADMISSION_SECRET,
    ServiceSettings,
    per_service,
    shared,
)

DEV_OPS_TOKEN = "meterai-development-ops-token-change-me"  # noqa: S105


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERAI_GATEWAY_", extra="ignore", populate_by_name=True
    )

    inventory_url: str = "http://127.0.0.1:8002"
    queue_url: str = "http://127.0.0.1:8001"
    stamping_url: str = "http://127.0.0.1:8003"
    # The waiting room's event and the secret of its admission credentials (shared with queue).
    event: str = Field(default="default", validation_alias=per_service("GATEWAY", "EVENT"))
    admission_secret: SecretStr = Field(
        default=SecretStr(DEV_ADMISSION_SECRET), validation_alias=shared("ADMISSION_SECRET")
    )
    # Operators authenticate on /ops/... with this bearer token.
    ops_token: SecretStr = SecretStr(DEV_OPS_TOKEN)
    # How long a verified API key (or a refusal) is remembered: revocation takes effect
    # within this many seconds.
    auth_cache_seconds: float = 5.0
    upstream_timeout_seconds: float = 30.0
    max_body_bytes: int = 21 * 1024 * 1024

    def secrets(self) -> dict[str, str]:
        return {
            **super().secrets(),
            "ops_token": self.ops_token.get_secret_value(),
            "admission_secret": self.admission_secret.get_secret_value(),
        }
