"""The engine URL, one transaction per unit of work, and the per-request session dependency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from fastapi import APIRouter, FastAPI
from sqlalchemy import String, bindparam, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.platform.db import (
    NAMING_CONVENTION,
    DriverStatement,
    SessionDep,
    async_url,
    check_database,
    create_engine,
    create_sessionmaker,
    driver_connection,
    make_metadata,
    transaction,
)
from services.platform.embedded import free_port
from services.platform.errors import Conflict
from tests.harness import wait_for
from tests.platform.apps import asgi_client, assert_problem, service_app
from tests.platform.scratch import notes


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/inventory", "postgresql+asyncpg://u:p@db:5432/inventory"),
        ("postgres://u:p@db/inventory", "postgresql+asyncpg://u:p@db/inventory"),
        ("postgresql+psycopg2://u@db/x", "postgresql+asyncpg://u@db/x"),
        ("postgresql+asyncpg://u@db/x", "postgresql+asyncpg://u@db/x"),
        # An escaped password stays escaped and visible (the engine needs it).
        ("postgresql://u:p%40ss%2Fw@db/x", "postgresql+asyncpg://u:p%40ss%2Fw@db/x"),
        ("sqlite+aiosqlite:///tmp/x.db", "sqlite+aiosqlite:///tmp/x.db"),
    ],
)
def test_async_url_uses_the_asyncpg_driver(url: str, expected: str) -> None:
    assert async_url(url) == expected


def test_metadata_carries_the_naming_convention() -> None:
    assert make_metadata().naming_convention == NAMING_CONVENTION


@pytest.fixture
async def engine(scratch_database: str) -> AsyncIterator[AsyncEngine]:
    # A libpq-style URL, as operators write it: create_engine must accept it.
    assert scratch_database.startswith("postgresql://")
    engine = create_engine(scratch_database, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


async def texts(sessions: async_sessionmaker[AsyncSession], marker: str) -> list[str]:
    async with transaction(sessions) as session:
        rows = await session.scalars(select(notes.c.text).where(notes.c.text.like(f"{marker}%")))
        return sorted(rows)


async def test_transaction_commits_when_the_block_ends(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    marker = uuid.uuid4().hex
    async with transaction(sessions) as session:
        await session.execute(notes.insert().values(text=f"{marker}-a"))
        await session.execute(notes.insert().values(text=f"{marker}-b"))
        assert session.in_transaction()
    assert await texts(sessions, marker) == [f"{marker}-a", f"{marker}-b"]


async def test_transaction_rolls_back_everything_on_an_exception(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    marker = uuid.uuid4().hex
    with pytest.raises(ValueError, match="half way"):
        async with transaction(sessions) as session:
            await session.execute(notes.insert().values(text=f"{marker}-a"))
            await session.flush()
            raise ValueError("half way")
    assert await texts(sessions, marker) == []


async def test_transaction_rolls_back_on_a_database_error(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    marker = uuid.uuid4().hex
    async with transaction(sessions) as session:
        row_id = await session.scalar(
            notes.insert().values(text=f"{marker}-kept").returning(notes.c.id)
        )
    with pytest.raises(IntegrityError):
        async with transaction(sessions) as session:
            await session.execute(notes.insert().values(text=f"{marker}-lost"))
            await session.execute(notes.insert().values(id=row_id, text=f"{marker}-dup"))
    assert await texts(sessions, marker) == [f"{marker}-kept"]


def _add_note() -> DriverStatement:
    return DriverStatement.compile(
        notes.insert().values(text=bindparam("text", type_=String)).returning(notes.c.id)
    )


def test_a_driver_statement_takes_the_values_it_does_not_bind_itself_by_name() -> None:
    statement = DriverStatement.compile(
        select(notes.c.id).where(
            notes.c.text == bindparam("text", type_=String),
            notes.c.id > 7,
            notes.c.text != bindparam("text", type_=String),
        )
    )
    # A name used twice is one placeholder; the statement's own 7 is the other.
    assert "$1" in statement.sql and "$2" in statement.sql and "$3" not in statement.sql
    assert statement.arguments({"text": "a"}) == ["a", 7]
    with pytest.raises(TypeError, match="missing values for text"):
        statement.arguments({})


async def test_the_driver_connection_commits_each_statement_or_one_block_pool_left_as_it_was(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    marker = uuid.uuid4().hex
    added = _add_note()
    with pytest.raises(ValueError, match="half way"):
        async with driver_connection(engine) as connection:
            await connection.fetchval(added.sql, *added.arguments({"text": f"{marker}-a"}))
            # Committed as it ran: another connection sees it while this one is out.
            assert await texts(sessions, marker) == [f"{marker}-a"]
            raise ValueError("half way")
    assert await texts(sessions, marker) == [f"{marker}-a"]
    # In one transaction: nothing of it is seen before it ends, all of it after.
    async with driver_connection(engine, begin=True) as connection:
        for suffix in ("b", "c"):
            await connection.fetchval(added.sql, *added.arguments({"text": f"{marker}-{suffix}"}))
        assert await texts(sessions, marker) == [f"{marker}-a"]
    assert await texts(sessions, marker) == [f"{marker}-{x}" for x in "abc"]
    # An error rolls the whole block back.
    with pytest.raises(ValueError, match="half way"):
        async with driver_connection(engine, begin=True) as connection:
            await connection.fetchval(added.sql, *added.arguments({"text": f"{marker}-d"}))
            raise ValueError("half way")
    assert await texts(sessions, marker) == [f"{marker}-{x}" for x in "abc"]
    # The pool's connections are transactional again for sessions: none opened meanwhile.
    for _ in range(2):  # both of the pool's connections
        with pytest.raises(ValueError, match="half way"):
            async with transaction(sessions) as session:
                await session.execute(notes.insert().values(text=f"{marker}-e"))
                await session.flush()
                raise ValueError("half way")
    assert await texts(sessions, marker) == [f"{marker}-{x}" for x in "abc"]


async def test_a_driver_connection_the_server_closed_is_replaced_not_handed_out_again(
    scratch_database: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    lone = create_engine(scratch_database, pool_size=1)
    try:
        async with driver_connection(lone) as connection:
            backend = await connection.fetchval("SELECT pg_backend_pid()")
        # A statement the server refuses leaves the connection as good as it was: kept.
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with driver_connection(lone, begin=True) as connection:
                await connection.fetchval("SELECT 1 / 0")
        async with driver_connection(lone) as connection:
            assert await connection.fetchval("SELECT pg_backend_pid()") == backend
        async with transaction(sessions) as session:
            await session.execute(text(f"SELECT pg_terminate_backend({int(backend)})"))
        # How asyncpg fails then depends on when it reads the server's farewell.
        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
        ):
            async with driver_connection(lone) as connection:
                await connection.fetchval("SELECT 1")
        # The pool's one connection was thrown away: the next one is new, and works.
        async with driver_connection(lone) as connection:
            assert await connection.fetchval("SELECT pg_backend_pid()") != backend
    finally:
        await lone.dispose()


async def test_check_database_passes_on_a_live_server_and_fails_on_a_dead_one(
    engine: AsyncEngine,
) -> None:
    await check_database(engine)
    dead = create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", pool_size=1)
    try:
        with pytest.raises(OSError):
            await check_database(dead)
    finally:
        await dead.dispose()


router = APIRouter()


@router.post("/notes/{text}", status_code=201)
async def add_note(text: str, session: SessionDep) -> dict[str, str]:
    await session.execute(notes.insert().values(text=text))
    if text.endswith("-refused"):
        raise Conflict("Refused after writing.")
    return {"text": text}


@pytest.fixture
def app(sessions: async_sessionmaker[AsyncSession]) -> FastAPI:
    app = service_app("ptdb", [router])
    app.state.sessionmaker = sessions
    return app


async def test_the_request_session_commits_before_the_response_and_rolls_back_on_error(
    app: FastAPI, sessions: async_sessionmaker[AsyncSession]
) -> None:
    marker = uuid.uuid4().hex
    async with asgi_client(app) as client:
        created = await client.post(f"/notes/{marker}-ok")
        # Visible to another session as soon as the response arrived.
        assert await texts(sessions, marker) == [f"{marker}-ok"]
        refused = await client.post(f"/notes/{marker}-refused")
    assert created.status_code == 201
    assert_problem(refused, 409, "conflict")
    assert await texts(sessions, marker) == [f"{marker}-ok"]


@router.get("/notes/wait")
async def wait_in_a_query(session: SessionDep) -> dict[str, str]:
    await session.execute(text("SELECT pg_sleep(30)"))
    return {}


@router.get("/notes/wrong")
async def wrong_statement(session: SessionDep) -> dict[str, str]:
    await session.execute(text("SELECT * FROM no_such_table"))
    return {}


async def test_a_database_that_goes_away_is_a_503_and_a_wrong_statement_a_500(
    app: FastAPI, engine: AsyncEngine, scratch_database: str
) -> None:
    """While PostgreSQL restarts, sessions are ended (SQLSTATE 57P01) and connects are refused:
    the caller should come back shortly (503 with Retry-After), never see a 500."""
    async with asgi_client(app) as client:
        waiting = asyncio.create_task(client.get("/notes/wait"))

        async def in_the_query() -> int:
            async with engine.connect() as connection:
                return int(
                    await connection.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
                        )
                    )
                    or 0
                )

        await wait_for(in_the_query, within=10, interval=0.05)
        async with engine.connect() as connection:
            await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query = 'SELECT pg_sleep(30)'"
                )
            )
        ended = await waiting
        wrong = await client.get("/notes/wrong")
    assert_problem(ended, 503, "database_unavailable")
    assert ended.headers["retry-after"] == "2"
    assert_problem(wrong, 500, "internal_error")

    refused_sessions = create_sessionmaker(
        create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/gone", pool_size=1)
    )
    app.state.sessionmaker = refused_sessions
    async with asgi_client(app) as client:
        refused = await client.get("/notes/wait")
    assert_problem(refused, 503, "database_unavailable")
