"""Serials claimed by stamping jobs that never reported back are settled by asking stamping.

Inventory normally learns what became of a job from `stamping.results`. A message can still be
lost (a broker that restarts empty, a topic recreated under a running producer), and a serial
would then stay claimed forever: paid for, affixed, yet never `used`. So every replica looks, now
and then, at claims older than `check_after` and asks stamping what became of their jobs: a done
job uses its serial, a failed one gives it back, and a job stamping never recorded (its upload
did not commit) gives the serial back once the claim is older than `orphan_after`. Applying an
outcome is idempotent, exactly as when the message arrives; SKIP LOCKED keeps replicas apart.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.inventory import repository as repo
from services.inventory import service
from services.platform.db import transaction
from services.platform.errors import MeteraiError
from services.platform.http import ServiceClient

log = structlog.get_logger(__name__)

CLAIMS_CHECKED = Counter(
    "meterai_inventory_claims_checked_total",
    "Serial claims whose job had not reported back, by what stamping said",
    ["outcome"],
)


class ClaimChecker:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        stamping: ServiceClient,
        *,
        check_after: timedelta,
        orphan_after: timedelta,
        batch: int = 200,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.stamping = stamping
        self.check_after = check_after
        self.orphan_after = orphan_after
        self.batch = batch

    async def check_once(self) -> dict[str, int]:
        """Settle one batch of due claims; counts by outcome."""
        now = datetime.now(UTC)
        async with transaction(self.sessionmaker) as session:
            claims = await repo.take_due_claims(
                session, checked_before=now - self.check_after, limit=self.batch
            )
        if not claims:
            return {}
        response = await self.stamping.request(
            "POST",
            "/internal/v1/jobs/outcomes",
            json={"job_ids": [str(claim.job_id) for claim in claims]},
            timeout=10,
        )
        response.raise_for_status()
        outcomes = {job["job_id"]: job for job in response.json()["jobs"]}
        counts: dict[str, int] = {}
        for claim in claims:
            outcome = self._outcome_of(claim, outcomes.get(str(claim.job_id)), now)
            if outcome in ("done", "failed", "orphaned"):
                outcome = await self._apply(claim, outcome)
            counts[outcome] = counts.get(outcome, 0) + 1
            CLAIMS_CHECKED.labels(outcome).inc()
        log.info("claims_checked", **counts)
        return counts

    def _outcome_of(self, claim: repo.OpenClaim, job: dict[str, str] | None, now: datetime) -> str:
        if job is None:
            return "orphaned" if claim.claimed_at < now - self.orphan_after else "not_recorded_yet"
        if job["status"] in ("done", "failed"):
            return job["status"] if job["serial"] == claim.serial else "conflict"
        return "unfinished"

    async def _apply(self, claim: repo.OpenClaim, outcome: str) -> str:
        try:
            async with transaction(self.sessionmaker) as session:
                if outcome == "done":
                    first = await service.mark_used(session, claim.job_id, claim.serial)
                    outcome = "used" if first else "already_used"
                else:
                    # Unless an upload retried meanwhile renewed the claim.
                    released = await service.release_serial(
                        session, claim.job_id, claimed_at=claim.claimed_at
                    )
                    outcome = "released" if released else "already_released"
        except MeteraiError as exc:
            log.error("claim_outcome_rejected", serial=claim.serial, error=exc.detail)
            return "conflict"
        log.info("claim_settled", serial=claim.serial, job_id=str(claim.job_id), outcome=outcome)
        return outcome

    async def run(self, interval: float) -> None:
        """Check every `interval` seconds (a full batch: again at once) until cancelled."""
        while True:
            try:
                counts = await self.check_once()
                if sum(counts.values()) >= self.batch:
                    continue
            except Exception as exc:  # noqa: BLE001 - outages only delay the next round
                log.warning("claim_check_failed", error=repr(exc))
            await asyncio.sleep(interval)
