"""`Idempotency-Key` for creating POSTs, stored in the service's own database.

The key row is inserted in the same transaction as the effect and holds the response, so a
replay returns exactly what the first request returned, and two concurrent requests with the same
key serialise on the row's unique index: the second waits for the first to commit, then replays.
A failed request rolls its key back with everything else, so the client may retry it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Header
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.platform.errors import MeteraiError

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        description="Same key and body replays the first response; another body is refused.",
    ),
]
"""The optional `Idempotency-Key` header of a creating POST, as a route parameter."""


class IdempotencyKeyReused(MeteraiError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused with another request"


class InvalidIdempotencyKey(MeteraiError):
    status = 400
    code = "invalid_idempotency_key"
    title = "Invalid Idempotency-Key header"


def idempotency_table(metadata: MetaData) -> Table:
    """The table a service adds to its own metadata (and migrations)."""
    return Table(
        "idempotency_keys",
        metadata,
        Column("owner", String(100), primary_key=True),
        Column("key", String(MAX_KEY_LENGTH), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("status_code", Integer, nullable=True),
        Column("response", JSON, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


def request_fingerprint(*parts: bytes | str) -> str:
    """A hash of what makes two requests "the same" (method, path, canonical body...)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so equal bodies hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: Any


class IdempotencyStore:
    """Claims keys and records responses inside the caller's transaction."""

    def __init__(self, table: Table) -> None:
        self.table = table

    async def claim(
        self, session: AsyncSession, *, owner: str, key: str, request_hash: str
    ) -> StoredResponse | None:
        """None if this request is first with `key` (go ahead, then `record`); else the replay.

        Raises `IdempotencyKeyReused` when the key was used for a different request.
        """
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidIdempotencyKey(
                f"The Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters."
            )
        inserted = await session.execute(
            insert(self.table)
            .values(owner=owner, key=key, request_hash=request_hash)
            .on_conflict_do_nothing()
            .returning(self.table.c.key)
        )
        if inserted.first() is not None:
            return None
        row = (
            await session.execute(
                select(
                    self.table.c.request_hash, self.table.c.status_code, self.table.c.response
                ).where(self.table.c.owner == owner, self.table.c.key == key)
            )
        ).one()
        if row.request_hash != request_hash:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request; "
                "use a new key for a new request."
            )
        return StoredResponse(status_code=row.status_code, body=row.response)

    async def record(
        self, session: AsyncSession, *, owner: str, key: str, status_code: int, body: Any
    ) -> None:
        """Store the response of the first request with `key`."""
        await session.execute(
            self.table.update()
            .where(self.table.c.owner == owner, self.table.c.key == key)
            .values(status_code=status_code, response=body)
        )

    async def purge_older_than(self, session: AsyncSession, cutoff: datetime) -> int:
        """Forget keys older than `cutoff` (clients retry within minutes, not days)."""
        result = await session.execute(self.table.delete().where(self.table.c.created_at < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)
