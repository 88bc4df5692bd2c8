"""Inventory settings (environment prefix `METERAI_INVENTORY_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.platform.settings import ServiceSettings, per_service


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
    stamp_price_rupiah: int = 10_000
    max_quantity_per_purchase: int = 1_000
    db_pool_size: int = 10
