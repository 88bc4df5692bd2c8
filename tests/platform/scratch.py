"""Throwaway tables for the database tests, created in a fresh database of the real server."""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table

from services.platform.idempotency import idempotency_table

metadata = MetaData()
idempotency_keys = idempotency_table(metadata)
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", String(100), nullable=False),
)
