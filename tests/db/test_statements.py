"""The request-path statement runner gives the same answers on both databases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Integer, Select, bindparam, insert, literal_column, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.errors import UniqueViolation
from db.migrate import upgrade_head
from db.models import RefreshToken, User, UserSession
from db.services.sessions import _MARK_ROTATED, _OPEN_SESSION, _ROTATE, _TOUCH_SESSION
from db.session import Statements, Writes, create_engine
from db.settings import Settings

_ONE: Select[int] = select(literal_column("1", Integer).label("one"))
_SESSION_ROW = (
    select(User.id, User.created_at, UserSession.amr, RefreshToken.token_hash)
    .join(UserSession, UserSession.user_id == User.id)
    .join(RefreshToken, RefreshToken.session_id == UserSession.id)
    .where(UserSession.id == bindparam("sid"), UserSession.expires_at > bindparam("now"))
    .limit(1)
)

_FIRST_TOKEN = insert(RefreshToken).values(
    session_id=bindparam("sid"),
    generation=0,
    token_hash=bindparam("digest"),
    created_at=bindparam("now"),
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


@pytest.fixture
async def started(settings_for: Settings) -> AsyncIterator[tuple[AsyncEngine, Statements]]:
    """The engine and the request path's runner on it, started; closed afterwards."""
    engine = create_engine(settings_for)
    statements = Statements(engine)
    await statements.start()
    try:
        yield engine, statements
    finally:
        await statements.close()
        await engine.dispose()


async def _user_with_a_session(
    engine: AsyncEngine, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime
) -> None:
    """A user and a session of theirs, set up through SQLAlchemy."""
    for table, values in (
        (
            User,
            {
                "id": user_id,
                "email": f"{user_id.hex}@example.com",
                "email_normalized": f"{user_id.hex}@example.com",
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
                "auth_time": now,
                "expires_at": now + timedelta(days=1),
                "absolute_expires_at": now + timedelta(days=1),
                "amr": "pwd",
            },
        ),
    ):
        async with engine.begin() as conn:
            await conn.execute(table.__table__.insert().values(**values))  # type: ignore[attr-defined]


async def _first_token(engine: AsyncEngine, session_id: uuid.UUID, at: datetime) -> int:
    """The session's first refresh token (digest 01...01), through SQLAlchemy; its id."""
    async with engine.begin() as conn:
        added = await conn.execute(
            insert(RefreshToken)
            .values(session_id=session_id, generation=0, token_hash=b"\x01" * 32, created_at=at)
            .returning(RefreshToken.id)
        )
        return int(added.scalar_one())


async def test_rows_are_the_same_on_both_databases(settings_for: Settings) -> None:
    engine = create_engine(settings_for)
    statements = Statements(engine)
    await statements.start()
    now = datetime.now(UTC).replace(microsecond=0)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    try:
        await _user_with_a_session(engine, user_id, session_id, now)
        async with statements.transaction() as tx:
            await tx.execute(
                _FIRST_TOKEN,
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


_TOKENS = select(RefreshToken.generation, RefreshToken.token_hash, RefreshToken.rotated_at).where(
    RefreshToken.session_id == bindparam("sid")
)
_SESSION_TIMES = select(UserSession.last_used_at, UserSession.expires_at).where(
    UserSession.id == bindparam("sid")
)


async def test_writes_together_make_every_change_and_only_those(settings_for: Settings) -> None:
    """All of a Writes' statements take effect (one statement on PostgreSQL), each with
    its own parameters only. A refresh's rotation: the spend's UPDATE of refresh_tokens is
    given the successor's session_id, generation and token_hash too, which SQLAlchemy
    would set on the spent row if they reached it (they did, on SQLite, at first)."""
    engine = create_engine(settings_for)
    statements = Statements(engine)
    await statements.start()
    then = datetime(2026, 1, 1, tzinfo=UTC)
    now = then + timedelta(minutes=5)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    try:
        await _user_with_a_session(engine, user_id, session_id, then)
        spent = await _first_token(engine, session_id, then)
        async with statements.transaction() as tx:
            await tx.execute_together(
                _ROTATE,
                {
                    "token_id": spent,
                    "session_id": session_id,
                    "generation": 1,
                    "token_hash": b"\x02" * 32,
                    "now": now,
                    "expires_at": now + timedelta(days=2),
                },
            )
        async with statements.connection() as conn:
            tokens = await conn.all(_TOKENS, {"sid": session_id})
            used = await conn.first(_SESSION_TIMES, {"sid": session_id})
    finally:
        await statements.close()
        await engine.dispose()
    assert sorted((t["generation"], bytes(t["token_hash"]), t["rotated_at"]) for t in tokens) == [
        (0, b"\x01" * 32, now),
        (1, b"\x02" * 32, None),
    ]
    assert used == {"last_used_at": now, "expires_at": now + timedelta(days=2)}


async def test_a_session_and_its_first_token_are_written_together(
    started: tuple[AsyncEngine, Statements],
) -> None:
    """A new session and its refresh token in one statement on PostgreSQL (the token's
    foreign key to the session is checked once the statement has added both), with the
    read that goes with them: it sees the user's sessions as they were before (one live
    session, the one set up; the new one not yet)."""
    engine, statements = started
    now = datetime(2026, 1, 1, tzinfo=UTC)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    await _user_with_a_session(engine, user_id, uuid.uuid4(), now)
    async with statements.transaction() as tx:
        context = await tx.execute_together(
            _OPEN_SESSION,
            {
                "session_id": session_id,
                "user_id": user_id,
                "uid": user_id,
                "now": now,
                "since": now - timedelta(days=30),
                "expires_at": now + timedelta(days=1),
                "absolute_expires_at": now + timedelta(days=30),
                "user_agent": "pytest",
                "ip": "203.0.113.7",
                "amr": "hwk",
                "device": "other",
                "network": "203.0.113.0/24",
                "generation": 0,
                "token_hash": b"\x03" * 32,
            },
        )
    async with statements.connection() as conn:
        row = await conn.first(_SESSION_ROW, {"sid": session_id, "now": now})
    assert context is not None
    assert (bool(context["signed_in_before"]), bool(context["known"]), context["live"]) == (
        True,
        False,
        1,
    )
    assert row is not None
    assert (row["id"], row["amr"], bytes(row["token_hash"])) == (user_id, "hwk", b"\x03" * 32)


_SPEND_TOKEN = _MARK_ROTATED.returning(RefreshToken.id)
_USE_SESSION = _TOUCH_SESSION.returning(UserSession.id)
_SPEND_AND_USE = Writes(_SPEND_TOKEN, _USE_SESSION, counted=True)


async def test_a_standalone_statement_commits_by_itself(
    started: tuple[AsyncEngine, Statements], settings_for: Settings
) -> None:
    """`standalone()`: a write that stands alone is committed once it has run (PostgreSQL
    runs it outside a transaction: no BEGIN and COMMIT round trips), and one that fails
    leaves nothing."""
    engine, statements = started
    now = datetime(2026, 1, 1, tzinfo=UTC)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    await _user_with_a_session(engine, user_id, session_id, now)
    token_id = await _first_token(engine, session_id, now)
    async with statements.standalone() as one:
        assert await one.first(_SPEND_TOKEN, {"token_id": token_id, "now": now}) == {"id": token_id}
        # PostgreSQL: seen from another connection before the block ends (SQLite holds
        # its write transaction to the end of the block, as transaction() does).
        async with statements.connection() as other:
            during = await other.all(_TOKENS, {"sid": session_id})
    async with statements.connection() as other:
        tokens = await other.all(_TOKENS, {"sid": session_id})
    assert [t["rotated_at"] for t in tokens] == [now]
    if not settings_for.is_sqlite:
        assert during == tokens
    with pytest.raises(UniqueViolation):
        async with statements.standalone() as one:
            await one.execute(
                _FIRST_TOKEN,
                {"sid": session_id, "digest": b"\x02" * 32, "now": now},
            )
    async with statements.connection() as conn:
        after = await conn.all(_TOKENS, {"sid": session_id})
    assert [bytes(t["token_hash"]) for t in after] == [b"\x01" * 32]


async def test_counted_writes_tell_which_found_their_row(
    started: tuple[AsyncEngine, Statements],
) -> None:
    """A counted Writes answers each write's count of rows (one statement on
    PostgreSQL): here the token's spend finds it, the session's touch finds none."""
    engine, statements = started
    now = datetime(2026, 1, 1, tzinfo=UTC)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    await _user_with_a_session(engine, user_id, session_id, now)
    token_id = await _first_token(engine, session_id, now)
    params = {"token_id": token_id, "now": now, "expires_at": now + timedelta(days=1)}
    async with statements.transaction() as tx:
        counts = await tx.execute_together(_SPEND_AND_USE, {**params, "session_id": uuid.uuid4()})
    async with statements.transaction() as tx:
        both = await tx.execute_together(_SPEND_AND_USE, {**params, "session_id": session_id})
    async with statements.connection() as conn:
        tokens = await conn.all(_TOKENS, {"sid": session_id})
    assert counts == {"write_1": 1, "write_2": 0}
    assert both == {"write_1": 1, "write_2": 1}
    assert [t["rotated_at"] for t in tokens] == [now]


async def test_writes_together_stopped_by_a_unique_constraint_say_so(
    started: tuple[AsyncEngine, Statements],
) -> None:
    """Writes stopped by a unique constraint raise UniqueViolation, as execute() does,
    whatever they answer (nothing, a read, their counts), and change nothing."""
    engine, statements = started
    now = datetime(2026, 1, 1, tzinfo=UTC)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    await _user_with_a_session(engine, user_id, session_id, now)
    token_id = await _first_token(engine, session_id, now)  # generation 0 is taken
    again = {"sid": session_id, "digest": b"\x02" * 32, "now": now, "token_id": token_id}
    for writes in (
        Writes(_SPEND_TOKEN, _FIRST_TOKEN),
        Writes(_SPEND_TOKEN, _FIRST_TOKEN, before=_ONE),
        Writes(_SPEND_TOKEN, _FIRST_TOKEN.returning(RefreshToken.id), counted=True),
    ):
        with pytest.raises(UniqueViolation):
            async with statements.transaction() as tx:
                await tx.execute_together(writes, again)
    async with statements.connection() as conn:
        tokens = await conn.all(_TOKENS, {"sid": session_id})
    assert [(bytes(t["token_hash"]), t["rotated_at"]) for t in tokens] == [(b"\x01" * 32, None)]


def test_writes_are_two_statements_or_more() -> None:
    with pytest.raises(ValueError, match="two statements"):
        Writes(_MARK_ROTATED)
    assert Writes(_MARK_ROTATED, before=_ONE).before is not None
    with pytest.raises(ValueError, match="RETURNING"):
        Writes(_SPEND_TOKEN, _TOUCH_SESSION, counted=True)
    with pytest.raises(ValueError, match="not both"):
        Writes(_SPEND_TOKEN, before=_ONE, counted=True)


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


async def test_statement_parameters_stay_out_of_error_messages(settings_for: Settings) -> None:
    engine = create_engine(settings_for)
    secret = "$argon2id$v=19$m=19456,t=2,p=1$c2VjcmV0LWhhc2g"
    row = {
        "id": uuid.uuid4(),
        "email": "b@example.com",
        "email_normalized": "b@example.com",
        "password_hash": secret,
        "is_active": True,
        "created_at": datetime.now(UTC),
        "updated_at": datetime.now(UTC),
    }
    try:
        async with engine.begin() as conn:
            await conn.execute(User.__table__.insert().values(**row))  # type: ignore[attr-defined]
        with pytest.raises(IntegrityError) as failure:
            async with engine.begin() as conn:
                await conn.execute(User.__table__.insert().values(**row))  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    assert secret not in str(failure.value)
    assert "parameters hidden" in str(failure.value)


async def test_database_url_options_reach_the_request_pool(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    """What SQLAlchemy reads from DATABASE_URL (?ssl=..., its own options) the request
    path's asyncpg pool reads the same way."""
    url = f"{database_url}?ssl=disable&prepared_statement_cache_size=50"
    engine = create_engine(make_settings(database_url=url))
    statements = Statements(engine)
    await statements.start()
    try:
        async with statements.connection() as conn:
            assert await conn.first(_ONE, {}) == {"one": 1}
        async with engine.connect() as conn:
            assert (await conn.execute(_ONE)).scalar_one() == 1
    finally:
        await statements.close()
        await engine.dispose()


def test_every_write_statement_compiles_on_sqlite_with_its_own_parameters() -> None:
    """On SQLite the statements run through SQLAlchemy, which compiles an INSERT or
    UPDATE for the parameter names given: a WHERE parameter named like a column of the
    table is refused there (it was, for the lockout's: a second wrong password on the
    embedded database answered INTERNAL_SERVER_ERROR). Every module-level write statement
    of the services must compile with exactly its own parameters."""
    import importlib
    import pkgutil

    from sqlalchemy.dialects import sqlite
    from sqlalchemy.sql.dml import Delete, Insert, Update

    import db.mail
    import db.services

    checked = 0
    for package in (db.services, db.mail):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if isinstance(value, Insert | Update | Delete):
                    keys = [bind.key for bind in value.compile().binds.values()]
                    value.compile(dialect=sqlite.dialect(), column_keys=keys)
                    checked += 1
    assert checked > 50, checked
