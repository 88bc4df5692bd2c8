"""serial claim times: find serials whose stamping job never reported back

Revision ID: 5d2e8a7c4b10
Revises: 3b1f0c2d9e41
Create Date: 2026-11-29 22:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d2e8a7c4b10"
down_revision: str | None = "3b1f0c2d9e41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("serials", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "serials", sa.Column("claim_checked_at", sa.DateTime(timezone=True), nullable=True)
    )
    # Claims already held count as made now: they are checked after the usual wait.
    op.execute("UPDATE serials SET claimed_at = now() WHERE state = 'sold' AND job_id IS NOT NULL")
    op.create_index(
        "ix_serials_open_claims",
        "serials",
        [sa.text("coalesce(claim_checked_at, claimed_at)")],
        postgresql_where=sa.text("state = 'sold' AND job_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_serials_open_claims", table_name="serials")
    op.drop_column("serials", "claim_checked_at")
    op.drop_column("serials", "claimed_at")
