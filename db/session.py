"""Engine and sessionmaker factories, with the SQLite settings that make it safe to share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from db.settings import Settings


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = settings.sqlite_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": settings.db_timeout}, **overrides
        )
        _make_sqlite_transactional(engine, busy_timeout_ms=int(settings.db_timeout * 1000))
        return engine
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_timeout,
        "connect_args": {
            "timeout": settings.db_timeout,
            "command_timeout": settings.db_timeout,
            "server_settings": {"application_name": "strawgate"},
        },
    }
    options.update(overrides)
    engine = create_async_engine(url, **options)
    _ping_on_checkout(engine)
    return engine


def _ping_on_checkout(engine: AsyncEngine) -> None:
    """A pre-ping without a round trip: a connection whose socket the server closed (a
    restart, a failover) is replaced on checkout, so the process recovers by itself when
    PostgreSQL comes back. SQLAlchemy's pool_pre_ping would cost a round trip on every
    request; a connection that dies unnoticed still fails one query, which SQLAlchemy
    recognises as a disconnect and answers by refreshing the whole pool."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("connection closed by the server")


class PointRead:
    """One SELECT on the hot path (every authenticated request runs one), as lean as each
    database allows. The SQL is the SQLAlchemy statement's own, compiled once.

    On PostgreSQL the statement runs as a prepared statement straight on the pooled asyncpg
    connection, outside any transaction (no BEGIN and ROLLBACK round trips around one
    SELECT), with the parameters bound by asyncpg itself: SQLAlchemy's per-execution
    parameter and result processing cost more than the query. The values are
    driver-native (aware datetimes, UUIDs), so nothing is lost by skipping the type
    processors. SQLite runs the statement through SQLAlchemy in its usual transaction
    (BEGIN IMMEDIATE orders it behind writers).
    """

    def __init__(self, engine: AsyncEngine, statement: Select[*tuple[Any, ...]]) -> None:
        self._statement = statement
        self._native: tuple[str, list[str]] | None = None
        self._engine = engine
        if engine.dialect.name == "postgresql":
            compiled = statement.compile(dialect=engine.dialect)
            self._native = (str(compiled), list(compiled.positiontup or ()))

    async def first(self, params: dict[str, Any]) -> Mapping[str, Any] | None:
        async with self._engine.connect() as conn:
            if self._native is None:
                found = (await conn.execute(self._statement, params)).mappings().first()
                return None if found is None else dict(found)
            sql, names = self._native
            raw = await conn.get_raw_connection()
            row = await raw.driver_connection.fetchrow(sql, *(params[n] for n in names))  # type: ignore[union-attr]
            return None if row is None else dict(row.items())


def _make_sqlite_transactional(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    """SQLite drops FOR UPDATE silently: without a write lock taken at BEGIN, two
    concurrent read-modify-write transactions lose an update. SQLAlchemy's pysqlite
    recipe: let SQLAlchemy emit BEGIN itself, and make it BEGIN IMMEDIATE."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
