"""Waiting-room settings (environment prefix `METERAI_QUEUE_`)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.platform.settings import ServiceSettings


class QueueSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERAI_QUEUE_", extra="ignore", populate_by_name=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    event: str = "default"
    # Defaults for a new event; operators change them at run time with PATCH /ops/queue.
    admit_per_minute: int = 600
    tick_seconds: float = 1.0
    serving_refresh_seconds: float = 0.25
    cookie_name: str = "meterai_ticket"
    cookie_secure: bool = False
