"""job retries with backoff, republishing on a schedule, and dead letters

Revision ID: 3f6b1c9d2e47
Revises: 68b39e702f4d
Create Date: 2026-11-29 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f6b1c9d2e47"
down_revision: str | None = "68b39e702f4d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = sa.text("status IN ('queued', 'signing')")


def upgrade() -> None:
    op.add_column("stamping_jobs", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column(
        "stamping_jobs", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True)
    )
    # Unfinished jobs that exist already are due at once: one harmless extra publication.
    op.add_column(
        "stamping_jobs",
        sa.Column(
            "republish_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )
    op.drop_index(
        "ix_stamping_jobs_unfinished", table_name="stamping_jobs", postgresql_where=UNFINISHED
    )
    op.create_index(
        "ix_stamping_jobs_republish_at",
        "stamping_jobs",
        ["republish_at"],
        unique=False,
        postgresql_where=UNFINISHED,
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("serial", sa.String(length=22), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["stamping_jobs.id"],
            name=op.f("fk_dead_letters_job_id_stamping_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("job_id", name=op.f("uq_dead_letters_job_id")),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_index(
        "ix_stamping_jobs_republish_at", table_name="stamping_jobs", postgresql_where=UNFINISHED
    )
    op.create_index(
        "ix_stamping_jobs_unfinished",
        "stamping_jobs",
        ["updated_at"],
        unique=False,
        postgresql_where=UNFINISHED,
    )
    op.drop_column("stamping_jobs", "republish_at")
    op.drop_column("stamping_jobs", "not_before")
    op.drop_column("stamping_jobs", "last_error")
