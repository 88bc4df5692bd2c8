"""Waiting-room settings (environment prefix `METERAI_QUEUE_`)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.platform.settings import (
    DEV_ADMISSION_SECRET,
    ServiceSettings,
    per_service,
    shared,
)


class QueueSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERAI_QUEUE_", extra="ignore", populate_by_name=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    event: str = Field(default="default", validation_alias=per_service("QUEUE", "EVENT"))
    admission_secret: SecretStr = Field(
        default=SecretStr(DEV_ADMISSION_SECRET), validation_alias=shared("ADMISSION_SECRET")
    )
    # How long an admission credential lasts; it is renewed while the applicant is active.
    admission_ttl_seconds: int = 900
    # How long it still serves to use what was bought (pay, upload, download) once it no longer
    # buys: an applicant who paid is never sent back to the queue for that.
    admission_keep_seconds: int = 7 * 24 * 3600
    # Defaults for a new event; operators change them at run time with PATCH /ops/queue.
    admit_per_minute: int = 600
    max_active: int = 5_000
    paused: bool = False
    pow_difficulty: int = 0
    # Admission runs on one replica (the leader) every tick; every replica refreshes its view
    # of the room (counters, settings, measured rate) this often.
    tick_seconds: float = 1.0
    serving_refresh_seconds: float = 0.25
    # A ticket not polled for this long loses its place (the page polls at most every 30 s);
    # an admitted session not seen for this long frees its slot under `max_active`.
    ticket_ttl_seconds: float = 120.0
    session_seconds: float = 900.0
    # Should Redis come back without the room, admission waits this long after rebuilding it,
    # so that every waiting page has polled again (longer than the longest poll interval).
    rebuild_hold_seconds: float = 40.0
    # Joins per address per window (0 = unlimited); a whole office behind one NAT must fit.
    join_limit_per_ip: int = 300
    join_limit_window_seconds: int = 60
    # Proxies that append to X-Forwarded-For in front of the queue: the gateway (1), plus as
    # many as the gateway trusts (its METERAI_GATEWAY_TRUSTED_PROXY_HOPS) behind a load
    # balancer, or every applicant would share the balancer's join limit.
    trusted_proxy_hops: int = 1
    # Closed loop: admission slows while stamping has more than this many unfinished jobs or
    # its oldest job waits longer than this, and speeds up again as the backlog drains.
    stamping_url: str = "http://127.0.0.1:8003"
    backlog_target_jobs: int = 2_000
    backlog_target_seconds: float = 120.0
    # Share of quick, successful status polls written to the access log (all are counted in
    # the metrics; errors and slow answers are always logged).
    status_access_log_sample: float = 0.01
    cookie_name: str = "meterai_ticket"
    cookie_secure: bool = False

    def secrets(self) -> dict[str, str]:
        return {**super().secrets(), "admission_secret": self.admission_secret.get_secret_value()}
