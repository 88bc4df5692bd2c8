"""Inventory settings (environment prefix `METERAI_INVENTORY_`)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.platform.settings import ServiceSettings, per_service

DEV_PAYMENT_SECRET = "meterai-development-payment-secret-change-me"  # noqa: S105


class InventorySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERAI_INVENTORY_", extra="ignore", populate_by_name=True
    )

    database_url: str = "postgresql://postgres@127.0.0.1:5432/meterai_inventory"
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=per_service("INVENTORY", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    # Stamping results tell inventory which serials became used (or were released).
    stamping_results_topic: str = "stamping.results"
    consumer_group: str = "inventory"
    # Claims whose job has not reported back after `claim_check_after_seconds` are settled by
    # asking stamping (looked for every `claim_check_interval_seconds`); a claim whose job
    # stamping never recorded is given back after `orphan_claim_after_seconds`.
    stamping_url: str = "http://127.0.0.1:8003"
    claim_check_after_seconds: float = 120.0
    claim_check_interval_seconds: float = 30.0
    orphan_claim_after_seconds: float = 900.0
    stamp_price_rupiah: int = 10_000
    max_quantity_per_purchase: int = 1_000
    db_pool_size: int = 20
    # Distributor purchases arriving together run as one statement and one commit: at most
    # this many purchases per batch, and this many batches at once (a second one starts only
    # when a whole batch is waiting).
    purchase_batch_size: int = 64
    purchase_batches_in_flight: int = 2
    db_pool_timeout_seconds: float = 10.0

    # Applicants: how many stamps one admitted applicant may hold, and how long a
    # reservation waits for its payment.
    applicant_max_stamps: int = 2
    reservation_ttl_seconds: int = 900
    sweep_interval_seconds: float = 5.0
    # The payment provider signs callbacks with this secret (HMAC-SHA256); callbacks older
    # than the tolerance are refused as replays.
    payment_secret: SecretStr = SecretStr(DEV_PAYMENT_SECRET)
    payment_tolerance_seconds: int = 300
    payment_provider: str = "provider"

    def secrets(self) -> dict[str, str]:
        return {**super().secrets(), "payment_secret": self.payment_secret.get_secret_value()}
