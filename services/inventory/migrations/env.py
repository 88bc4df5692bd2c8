"""Alembic environment of the inventory database."""

from services.inventory.models import Base
from services.platform.migrations import run_env

run_env(Base.metadata)
