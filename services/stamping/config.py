"""Stamping settings (environment prefix `METERAI_STAMPING_`), shared by API, relay and workers."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.platform.settings import Environment, ServiceSettings, per_service

DEV_CALLBACK_SECRET = "meterai-development-callback-secret-change-me"  # noqa: S105


class StampingSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERAI_STAMPING_", extra="ignore", populate_by_name=True
    )

    database_url: str = "postgresql://postgres@127.0.0.1:5432/meterai_stamping"
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=per_service("STAMPING", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    inventory_url: str = "http://127.0.0.1:8002"
    blob_store_url: str = "file:///var/lib/meterai/blobs"

    requests_topic: str = "stamping.requests"
    results_topic: str = "stamping.results"
    # At least the largest number of signing workers you will run: extra workers sit idle.
    requests_partitions: int = 24
    results_partitions: int = 6
    worker_group: str = "signing-workers"

    max_upload_bytes: int = 20 * 1024 * 1024
    # Uploads are refused (503 `backlog_full`, with Retry-After) while this many jobs are
    # unfinished, so that an accepted document is stamped soon (0: no bound). The count is
    # read every `backlog_refresh_seconds`.
    max_backlog_jobs: int = 20_000
    backlog_refresh_seconds: float = 0.5
    # CPU time reading one document may take, at upload and again when signing (hostile
    # documents are refused as `too_complex`); as signing.DEFAULT_CPU_BUDGET_SECONDS.
    document_cpu_budget_seconds: float = 3.0
    db_pool_size: int = 20

    # Outbox relay: how often it looks for unsent messages, and when a job that has not
    # finished is published again (the broker may have lost it): `republish_after_seconds`
    # after it was queued, or twice the time the backlog ahead of it takes to finish if that
    # is longer, then after ever longer waits (each as long as the job has waited since it
    # was queued or last leased, at most `republish_max_interval_seconds`), so that a long
    # backlog is not flooded with duplicates. A leased job is due when its lease ends.
    relay_interval_seconds: float = 0.05
    republish_after_seconds: float = 30.0
    republish_max_interval_seconds: float = 300.0

    # Signing workers.
    signing_key_path: Path = Path("keys/signer-key.pem")
    signing_cert_path: Path = Path("keys/signer.pem")
    signing_chain_paths: list[Path] = Field(default_factory=lambda: [Path("keys/ca.pem")])
    signing_key_passphrase: str | None = None
    # An RFC 3161 timestamp authority: every signature gets a signature timestamp from it
    # (PAdES B-T). Empty: no timestamps (PAdES B-B, the time of signing is only claimed).
    tsa_url: str = ""
    tsa_timeout_seconds: float = 5.0
    # Jobs in flight per worker: their I/O overlaps one signature at a time (with a timestamp
    # authority, that many signatures wait for it at once).
    worker_concurrency: int = 2
    worker_lease_seconds: float = 30.0
    # A job whose attempt failed through no fault of its document (the signing key, storage)
    # is tried again after a backoff that doubles from `worker_retry_backoff_seconds` up to
    # `worker_retry_backoff_max_seconds`; after `worker_max_attempts` attempts it is `failed`
    # with `too_many_attempts` and recorded in `dead_letters`.
    worker_max_attempts: int = 5
    worker_retry_backoff_seconds: float = 5.0
    worker_retry_backoff_max_seconds: float = 300.0
    worker_grace_seconds: float = 20.0
    worker_id: str = ""

    # Verification (`/verify/{serial}`, `POST /api/v1/verify`): the certificates trusted as
    # roots for stamp signatures (default: the self-signed ones in signing_chain_paths, i.e. the
    # CA of `meterai keys init`), and how many uploads are checked at once and may wait.
    verify_trust_roots_paths: list[Path] = Field(default_factory=list)
    verify_concurrency: int = 1
    verify_queue_limit: int = 8

    # Callbacks to a job's `callback_url` once it is done or failed: signed with a secret
    # derived from this one per owner (see services.stamping.callbacks), retried with
    # exponential backoff until `callback_max_attempts`, then given up.
    callback_secret: SecretStr = SecretStr(DEV_CALLBACK_SECRET)
    callback_max_attempts: int = 12
    callback_backoff_initial_seconds: float = 15.0
    callback_backoff_max_seconds: float = 3600.0
    callback_timeout_seconds: float = 10.0
    callback_concurrency: int = 32
    callback_poll_interval_seconds: float = 1.0
    # Callbacks to loopback, private and link-local addresses (None: allowed outside production).
    callback_allow_private_addresses: bool | None = None

    def secrets(self) -> dict[str, str]:
        return {**super().secrets(), "callback_secret": self.callback_secret.get_secret_value()}

    @property
    def callbacks_may_reach_private_addresses(self) -> bool:
        """Whether callbacks may go to loopback and private networks (never by default in
        production, where such a URL is a way into the internal network)."""
        if self.callback_allow_private_addresses is not None:
            return self.callback_allow_private_addresses
        return self.environment is not Environment.production
