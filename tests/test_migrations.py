"""One migration history for PostgreSQL and SQLite: upgrade, check, downgrade, upgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command
from db.migrate import alembic_config, downgrade_base, upgrade_head
from tests.pg import scratch_database

TABLES = {
    "users",
    "sessions",
    "refresh_tokens",
    "totp_credentials",
    "recovery_codes",
    "challenges",
    "outbox",
    "security_events",
    "login_throttles",
}


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    await engine.dispose()
    return names - {"alembic_version"}


@pytest.fixture
def empty_pg_database(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "strawgate_migrations") as url:
        yield url


def round_trip(url: str) -> None:
    upgrade_head(url)
    assert asyncio.run(table_names(url)) == TABLES
    command.check(alembic_config(url))  # raises when the models and migrations drift
    downgrade_base(url)
    assert asyncio.run(table_names(url)) == set()
    upgrade_head(url)
    assert asyncio.run(table_names(url)) == TABLES


def test_migrations_on_postgresql(empty_pg_database: str) -> None:
    round_trip(empty_pg_database)


def test_migrations_on_sqlite(tmp_path: Path) -> None:
    round_trip(f"sqlite+aiosqlite:///{tmp_path}/strawgate.db")
