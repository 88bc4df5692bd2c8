"""serial claim attempt: which upload attempt holds a job's claim

Revision ID: 2c7d9f1e3a55
Revises: 8e4a1c7b2f90
Create Date: 2026-11-30 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2c7d9f1e3a55"
down_revision: str | None = "8e4a1c7b2f90"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and without a default: adding it rewrites nothing, and claims made by a
    # stamping replica that does not send attempts yet simply have none.
    op.add_column("serials", sa.Column("claim_attempt", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column("serials", "claim_attempt")
