"""Engine and sessionmaker factories, with the SQLite settings that make it safe to share."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
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
        # A connection that died with its server is replaced on checkout, so the
        # process recovers by itself when PostgreSQL comes back.
        "pool_pre_ping": True,
        "connect_args": {
            "timeout": settings.db_timeout,
            "command_timeout": settings.db_timeout,
            "server_settings": {"application_name": "strawgate"},
        },
    }
    options.update(overrides)
    return create_async_engine(url, **options)


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
