"""The request-path statement runner gives the same answers on both databases."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.exc import StatementError

from db.migrate import upgrade_head
from db.models import RefreshToken, User, UserSession
from db.session import Statements, create_engine
from db.settings import Settings

_SESSION_ROW = (
    select(User.id, User.created_at, UserSession.amr, RefreshToken.token_hash)
    .join(UserSession, UserSession.user_id == User.id)
    .join(RefreshToken, RefreshToken.session_id == UserSession.id)
    .where(UserSession.id == bindparam("sid"), UserSession.expires_at > bindparam("now"))
    .limit(1)
)


@pytest.fixture(params=["postgresql", "sqlite"])
def settings_for(
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    clean_db: None,
) -> Settings:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
        upgrade_head(url)
        return make_settings(database_url=url)
    return make_settings()


async def test_rows_are_the_same_on_both_databases(settings_for: Settings) -> None:
    engine = create_engine(settings_for)
    statements = Statements(engine)
    await statements.start()
    now = datetime.now(UTC).replace(microsecond=0)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    try:
        for table, values in (
            (
                User,
                {
                    "id": user_id,
                    "email": "a@example.com",
                    "email_normalized": "a@example.com",
                    "password_hash": "x",
                    "is_active": True,
                    "created_at": now,
                    "updated_at": now,
                },
            ),
            (
                UserSession,
                {
                    "id": session_id,
                    "user_id": user_id,
                    "created_at": now,
                    "last_used_at": now,
                    "expires_at": now + timedelta(days=1),
                    "amr": "pwd",
                },
            ),
        ):
            async with engine.begin() as conn:  # set-up through SQLAlchemy
                await conn.execute(table.__table__.insert().values(**values))  # type: ignore[attr-defined]
        async with statements.transaction() as tx:
            await tx.execute(
                RefreshToken.__table__.insert().values(  # type: ignore[attr-defined]
                    session_id=bindparam("sid"),
                    generation=0,
                    token_hash=bindparam("digest"),
                    created_at=bindparam("now"),
                ),
                {"sid": session_id, "digest": b"\x01" * 32, "now": now},
            )
        async with statements.connection() as conn:
            row = await conn.first(_SESSION_ROW, {"sid": session_id, "now": now})
            missing = await conn.first(_SESSION_ROW, {"sid": uuid.uuid4(), "now": now})
    finally:
        await statements.close()
        await engine.dispose()
    assert row is not None and missing is None
    assert row["id"] == user_id
    assert row["created_at"] == now and row["created_at"].utcoffset() == timedelta(0)
    assert row["amr"] == "pwd"
    assert bytes(row["token_hash"]) == b"\x01" * 32


async def test_a_missing_parameter_is_an_error(settings_for: Settings) -> None:
    engine = create_engine(settings_for)
    statements = Statements(engine)
    await statements.start()
    try:
        async with statements.connection() as conn:
            with pytest.raises((KeyError, StatementError)):
                await conn.first(_SESSION_ROW, {"now": datetime.now(UTC)})
    finally:
        await statements.close()
        await engine.dispose()


def test_statement_parameters_stay_out_of_error_messages(settings_for: Settings) -> None:
    assert create_engine(settings_for).sync_engine.hide_parameters
