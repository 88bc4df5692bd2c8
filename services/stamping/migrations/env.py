"""Alembic environment of the stamping database."""

from services.platform.migrations import run_env
from services.stamping.models import Base

run_env(Base.metadata)
