"""One migration history for PostgreSQL and SQLite: upgrade, check, downgrade, upgrade."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command
from db.base import UTCDateTime
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
    "passkeys",
    "identities",
    "identity_flows",
    "spent_id_tokens",
    "user_roles",
    "webhook_events",
    "webhook_deliveries",
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


_users = sa.table(
    "users",
    sa.column("id", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("email_normalized", sa.String()),
    sa.column("password_hash", sa.String()),
    sa.column("is_active", sa.Boolean()),
    sa.column("created_at", UTCDateTime()),
    sa.column("updated_at", UTCDateTime()),
)
_sessions = sa.table(
    "sessions",
    sa.column("id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    sa.column("created_at", UTCDateTime()),
    sa.column("last_used_at", UTCDateTime()),
    sa.column("expires_at", UTCDateTime()),
    sa.column("amr", sa.String()),
)


async def _run(url: str, statement: Any) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(statement)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_the_idle_timeout_reaches_the_sessions_there_are(
    database: str, empty_pg_database: str, tmp_path: Path
) -> None:
    """Upgrading to the idle timeout: a session unused for 20 days ends now, a fresh one
    keeps its end as its absolute one; downgrading brings no ended session back."""
    url = empty_pg_database if database == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/s.db"
    config = alembic_config(url)
    command.upgrade(config, "8f255ede1df0")  # the revision before the idle timeout
    now = datetime.now(UTC).replace(microsecond=0)
    user_id, idle_id, fresh_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    asyncio.run(
        _run(
            url,
            sa.insert(_users).values(
                id=user_id,
                email="a@example.com",
                email_normalized="a@example.com",
                password_hash="x",
                is_active=True,
                created_at=now,
                updated_at=now,
            ),
        )
    )
    for session_id, last_used in ((idle_id, now - timedelta(days=20)), (fresh_id, now)):
        asyncio.run(
            _run(
                url,
                sa.insert(_sessions).values(
                    id=session_id,
                    user_id=user_id,
                    created_at=now - timedelta(days=25),
                    last_used_at=last_used,
                    expires_at=now + timedelta(days=5),
                    amr="pwd",
                ),
            )
        )
    command.upgrade(config, "head")
    ends = sa.table(
        "sessions",
        sa.column("id", sa.Uuid()),
        sa.column("expires_at", UTCDateTime()),
        sa.column("absolute_expires_at", UTCDateTime()),
    )
    rows = {
        row.id: (row.expires_at, row.absolute_expires_at)
        for row in asyncio.run(_run(url, sa.select(ends)))
    }
    assert rows[idle_id] == (now - timedelta(days=6), now + timedelta(days=5))
    assert rows[fresh_id] == (now + timedelta(days=5), now + timedelta(days=5))
    command.downgrade(config, "8f255ede1df0")
    after = {row.id: row.expires_at for row in asyncio.run(_run(url, sa.select(_sessions)))}
    assert after[idle_id] == now - timedelta(days=6)  # still ended


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_downgrade_past_passkeys_ends_their_ceremonies_and_keeps_other_steps(
    database: str, empty_pg_database: str, tmp_path: Path
) -> None:
    """The passkeys revision's downgrade drops the table and the user handles, and the
    registration ceremonies waiting in `challenges` (the older code knows no such step);
    every other pending step stays."""
    url = empty_pg_database if database == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/p.db"
    config = alembic_config(url)
    command.upgrade(config, "head")
    now = datetime.now(UTC).replace(microsecond=0)
    user_id = uuid.uuid4()
    asyncio.run(
        _run(
            url,
            sa.insert(_users).values(
                id=user_id,
                email="a@example.com",
                email_normalized="a@example.com",
                password_hash="x",
                is_active=True,
                created_at=now,
                updated_at=now,
            ),
        )
    )
    challenges = sa.table(
        "challenges",
        sa.column("id", sa.Uuid()),
        sa.column("token_hash", sa.LargeBinary()),
        sa.column("user_id", sa.Uuid()),
        sa.column("purpose", sa.String()),
        sa.column("method", sa.String()),
        sa.column("amr", sa.String()),
        sa.column("created_at", UTCDateTime()),
        sa.column("expires_at", UTCDateTime()),
    )
    for method, purpose in (("PASSKEY", "PASSKEY_REGISTER"), ("TOTP", "LOGIN")):
        asyncio.run(
            _run(
                url,
                sa.insert(challenges).values(
                    id=uuid.uuid4(),
                    token_hash=uuid.uuid4().bytes * 2,
                    user_id=user_id,
                    purpose=purpose,
                    method=method,
                    amr="pwd",
                    created_at=now,
                    expires_at=now + timedelta(minutes=5),
                ),
            )
        )
    command.downgrade(config, "185a068ce528")
    left = asyncio.run(_run(url, sa.select(challenges.c.method)))
    assert [row.method for row in left] == ["TOTP"]
    assert "passkeys" not in asyncio.run(table_names(url))
    command.upgrade(config, "head")
