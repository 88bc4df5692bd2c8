"""Alembic environment of the stamping database."""

from alembic import context

from services.stamping.models import Base
from services.platform.migrations import run_env

run_env(context, Base.metadata)
