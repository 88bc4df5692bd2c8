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
    # A known key's last answer keeps serving this long while inventory cannot be asked.
    auth_stale_seconds: float = 60.0
    upstream_timeout_seconds: float = 30.0
    # Share of quick, successful waiting-room polls written to the access log (all are counted
    # in the metrics; errors and slow answers are always logged).
    status_access_log_sample: float = 0.01
    max_body_bytes: int = 21 * 1024 * 1024
    # Browsers on these origins (distributors' web apps) may call the API; empty: none.
    cors_allow_origins: list[str] = Field(default_factory=list)
    # Strict-Transport-Security max-age once the public URL is HTTPS (0: not sent).
    hsts_seconds: int = 0

    # Rate limits: token buckets in Redis, shared by every gateway replica. If Redis cannot be
    # reached, requests pass (availability over strictness) and
    # meterai_gateway_rate_limit_fail_open_total counts them.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=per_service("GATEWAY", "REDIS_URL"),
    )
    rate_limit_enabled: bool = True
    rate_limit_key_prefix: str = "meterai:gateway:rl"
    # A distributor's default contract: tokens per second and bucket size (the burst).
    distributor_rate_per_second: float = 200.0
    distributor_burst: int = 400
    # Public routes (waiting room, verification, payment callback), per client address; generous,
    # since a whole office behind one NAT shares an address.
    public_rate_per_second: float = 200.0
    public_burst: int = 1_000
    # Tokens one request of each route class takes (uploads cost the backend most).
    route_class_weights: dict[str, int] = {"read": 1, "room": 1, "write": 1, "upload": 5}
    # How many proxies in front of the gateway append to X-Forwarded-For (0: use the peer).
    trusted_proxy_hops: int = 0
    # Seconds a Redis call may take before the request passes unlimited, and how long the
    # gateway then stops asking Redis (so a dead Redis costs no latency per request).
    rate_limit_redis_timeout_seconds: float = 0.25
    rate_limit_pause_seconds: float = 1.0
    # A replica takes a distributor's tokens from Redis a few at a time and spends them within
    # this long (a tenth of the burst at most, and what the rate refills meanwhile): a busy
    # distributor costs a Redis round trip per lease, not per request.
    rate_limit_lease_seconds: float = 0.05
    rate_limit_lease_max_tokens: int = 20

    # Load shedding: requests in flight to one upstream. A route class may use only its share
    # of that budget (cheap reads the whole of it, so they are shed last) and at most its own
    # budget; beyond either, an immediate 503 `overloaded` with Retry-After.
    max_in_flight_per_upstream: int = 512
    in_flight_share: dict[str, float] = {"read": 1.0, "room": 1.0, "write": 0.8, "upload": 0.6}
    max_in_flight_per_class: dict[str, int] = {
        "read": 512,
        "room": 512,
        "write": 384,
        "upload": 64,
    }
    shed_retry_after_seconds: int = 1

    # Circuit breaker per upstream: this many consecutive connection failures or timeouts open
    # it; while open, requests fail at once (503 `upstream_unavailable`); after
    # `breaker_open_seconds` one probe at a time is let through (half-open).
    breaker_failure_threshold: int = 5
    breaker_open_seconds: float = 5.0

    def secrets(self) -> dict[str, str]:
        return {
            **super().secrets(),
            "ops_token": self.ops_token.get_secret_value(),
            "admission_secret": self.admission_secret.get_secret_value(),
        }
