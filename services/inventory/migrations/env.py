"""Alembic environment of the inventory database."""

from alembic import context

from services.inventory.models import Base
from services.platform.migrations import run_env

run_env(context, Base.metadata)
