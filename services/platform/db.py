"""The async SQLAlchemy engine and one transaction scope per request or job.

Services only `flush()`; the scope that opened the transaction commits it or rolls it back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import ClauseElement, MetaData, text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.sql.compiler import SQLCompiler

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_metadata() -> MetaData:
    """Metadata with the naming convention every service's migrations rely on."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def async_url(url: str) -> str:
    """Accept `postgresql://` URLs (as operators write them) and use the asyncpg driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if "sslmode" in parsed.query:
        # libpq spells it `sslmode`; asyncpg, given it by SQLAlchemy, wants `ssl`.
        query = dict(parsed.query)
        query["ssl"] = query.pop("sslmode")
        parsed = parsed.set(query=query)
    return parsed.render_as_string(hide_password=False)


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 0,
    pool_timeout: float = 10.0,
    server_settings: dict[str, str] | None = None,
) -> AsyncEngine:
    """An engine with a bounded pool that recycles connections the server dropped.

    A request that waits longer than `pool_timeout` for a connection gets a 503 (the service
    is saturated) instead of waiting without bound. No pre-ping: it would cost a round trip on
    every checkout; a connection the server dropped fails once (a 503) and is replaced. No
    overflow by default: under load, overflow connections are opened and closed per request,
    and a connection costs several round trips (measured as the largest cost per purchase).
    `server_settings`: PostgreSQL settings for every connection of the pool.
    """
    return _create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        connect_args={"server_settings": server_settings} if server_settings else {},
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay usable after commit (no implicit reloads)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session in one transaction: committed when the block ends, rolled back on error."""
    async with sessionmaker() as session, session.begin():
        yield session


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose every statement is its own transaction: for work that is one
    statement, it saves the BEGIN and COMMIT round trips."""
    async with engine.connect() as connection:
        yield await connection.execution_options(isolation_level="AUTOCOMMIT")


@dataclass(frozen=True)
class DriverStatement:
    """A Core statement compiled once for asyncpg, to run on the driver's own connection
    (:func:`driver_connection`): for the statements a hot loop runs for every item.

    Through SQLAlchemy (a session, an execution context, the DB-API adapter around asyncpg,
    bind and result processing), a signing worker's lease cost 1.7-1.8 ms of the worker's
    CPU on the benchmark machine, 1.2-1.3 ms on a Core connection, and 0.8-0.9 ms on the
    driver's connection, checkout from the pool included. The statement stays one Core
    construct; what SQLAlchemy's processing did, the caller does: values as asyncpg takes
    them (JSON as text; enums of strings pass as they are), and rows come back as asyncpg
    records, column types unconverted (a PostgreSQL enum as its text).
    """

    sql: str
    names: tuple[str, ...]
    """The bound parameters, in the order of their ``$n`` placeholders."""
    constants: Mapping[str, Any]
    """The values the statement itself binds (``.values(status=...)``, literals)."""

    @classmethod
    def compile(cls, statement: ClauseElement) -> DriverStatement:
        dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        constants = {
            name: value
            for name, value in compiled.params.items()
            if not compiled.binds[name].required
        }
        return cls(str(compiled), tuple(compiled.positiontup or ()), constants)

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``values`` by name (every parameter the statement
        does not bind itself is required)."""
        try:
            return [values[name] if name in values else self.constants[name] for name in self.names]
        except KeyError as exc:
            raise TypeError(f"missing values for {exc.args[0]}") from None


@asynccontextmanager
async def driver_connection(engine: AsyncEngine, *, begin: bool = False) -> AsyncIterator[Any]:
    """asyncpg's own connection (an ``asyncpg.Connection``) from `engine`'s pool, for
    :class:`DriverStatement`; in one transaction with `begin` (committed when the block ends,
    rolled back on error), else every statement commits at once.

    SQLAlchemy never opens a transaction on it meanwhile (it does only when it executes a
    statement itself). A connection the block ends with an error on, other than a server's
    error about a statement, is thrown away rather than handed out again."""
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        if driver is None:  # the pool gives out connections, never a closed slot
            raise RuntimeError("the pool gave out no driver connection")
        try:
            if begin:
                async with driver.transaction():
                    yield driver
            else:
                yield driver
        except BaseException as exc:
            # After a server's error about a statement the connection is fine; after anything
            # else (the network, a server that ended the session, a query cancelled half way)
            # its state is unknown.
            if driver.is_closed() or not isinstance(exc, asyncpg.PostgresError):
                await connection.invalidate()
            raise


async def check_database(engine: AsyncEngine) -> None:
    """Health check: a round trip to the server."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with transaction(request.app.state.sessionmaker) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a client never sees a
# success for a transaction that then failed to commit.
SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]
