"""The audit trail: rows written in the caller's transaction, one JSON log line each
(after the commit), the user's newest-first pages, and the retention passes."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from db.errors import AuthFailure, ErrorCode
from db.models import IP_MAX, USER_AGENT_MAX
from db.security.tokens import token_digest
from db.services.events import (
    MAX_PAGE_SIZE,
    EventKind,
    SecurityEvents,
    decode_cursor,
    encode_cursor,
    prune_ended_sessions,
    prune_events,
    prune_spent_generations,
)
from db.services.types import ClientInfo
from db.session import Statements, create_engine
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import logout, refresh, signup

CLIENT = ClientInfo(ip="203.0.113.9", user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0")
LOGGER = "strawgate.security"


class Boom(Exception):
    pass


@pytest.fixture
def events(clock: MutableClock) -> SecurityEvents:
    return SecurityEvents(clock=clock)


async def rows(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        found = [dict(row) for row in (await conn.execute(text(sql), params)).mappings()]
    await engine.dispose()
    return found


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The audit log lines so far: each one's event fields (the line's `security_event`)."""
    out = []
    for record in caplog.records:
        if record.name == LOGGER:
            fields: dict[str, Any] = record.__dict__["security_event"]
            assert record.getMessage() == f"security event {fields['event']}"
            out.append(fields)
    return out


def logged(record: logging.LogRecord) -> str:
    """All a record says: its message and its event's fields."""
    return record.getMessage() + json.dumps(getattr(record, "security_event", None))


# -- recording -------------------------------------------------------------------------


async def test_an_event_is_written_and_logged_once_its_transaction_commits(
    statements: Statements,
    events: SecurityEvents,
    clock: MutableClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    async with events.transaction(statements) as tx:
        await events.record(
            tx,
            EventKind.LOGIN_SUCCEEDED,
            user_id=user_id,
            session_id=session_id,
            client=CLIENT,
            details={"method": "pwd", "mfa": False, "attempt": 1},
        )
        assert lines(caplog) == []  # not before the commit
    (row,) = await rows(database_url, "SELECT * FROM security_events")
    assert row["kind"] == "LOGIN_SUCCEEDED"
    assert row["at"] == clock.now()
    assert row["user_id"] == user_id and row["session_id"] == session_id
    assert row["ip"] == CLIENT.ip and row["user_agent"] == CLIENT.user_agent
    assert row["email"] is None
    assert json.loads(row["details"]) == {"method": "pwd", "mfa": False, "attempt": 1}
    (line,) = lines(caplog)
    assert line == {
        "event": "LOGIN_SUCCEEDED",
        "id": row["id"],
        "at": clock.now().isoformat(),
        "user_id": str(user_id),
        "session_id": str(session_id),
        "ip": CLIENT.ip,
        "user_agent": CLIENT.user_agent,
        "email": None,
        "details": {"method": "pwd", "mfa": False, "attempt": 1},
    }
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.INFO


async def test_a_rolled_back_transaction_leaves_no_event_and_no_log_line(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(Boom):
        async with events.transaction(statements) as tx:
            await events.record(tx, EventKind.PASSWORD_CHANGED, user_id=uuid.uuid4())
            raise Boom
    assert await rows(database_url, "SELECT id FROM security_events") == []
    assert lines(caplog) == []


async def test_on_a_plain_transaction_the_line_is_logged_at_record_time(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The documented fallback: the row still follows the transaction, the line does not."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(Boom):
        async with statements.transaction() as tx:
            await events.record(tx, EventKind.LOGOUT, user_id=uuid.uuid4())
            assert [line["event"] for line in lines(caplog)] == ["LOGOUT"]
            raise Boom
    assert await rows(database_url, "SELECT id FROM security_events") == []


async def test_record_now_stands_when_the_callers_transaction_rolls_back(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    user_id = uuid.uuid4()
    with pytest.raises(Boom):
        async with events.transaction(statements):
            await events.record_now(
                statements, EventKind.REFRESH_REUSED, user_id=user_id, client=CLIENT
            )
            raise Boom
    (row,) = await rows(database_url, "SELECT kind, user_id FROM security_events")
    assert row == {"kind": "REFRESH_REUSED", "user_id": user_id}
    assert [line["event"] for line in lines(caplog)] == ["REFRESH_REUSED"]


async def test_secret_looking_details_are_never_written_or_logged(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="strawgate")
    leaked = "hunter2-correct-horse"
    await events.record_now(
        statements,
        EventKind.LOGIN_FAILED,
        client=CLIENT,
        details={
            "password": leaked,
            "new_Password": leaked,
            "refresh_token": leaked,
            "code": leaked,
            "recovery_code": leaked,
            "client_secret": leaked,
            "password_hash": leaked,
            "TOKEN": leaked,
            "reason": "wrong_password",
        },
    )
    (row,) = await rows(database_url, "SELECT * FROM security_events")
    assert json.loads(row["details"]) == {"reason": "wrong_password"}
    assert leaked not in json.dumps({key: str(value) for key, value in row.items()})
    (line,) = lines(caplog)
    assert line["details"] == {"reason": "wrong_password"}
    # Nowhere in any log record either (the warning names the key, never the value).
    assert all(leaked not in logged(record) for record in caplog.records)
    assert any(
        record.name == "strawgate.events" and "'password'" in record.getMessage()
        for record in caplog.records
    )


async def test_a_failed_login_keeps_the_email_only_when_it_is_a_valid_address(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # People type passwords into the email field: what is no address is not kept.
    for typed in ("Tr0ub4dor&3", "not an address@", "", None):
        await events.record_now(statements, EventKind.LOGIN_FAILED, email=typed, client=CLIENT)
    await events.record_now(
        statements, EventKind.LOGIN_FAILED, email="alice@example.com", client=CLIENT
    )
    found = await rows(database_url, "SELECT email FROM security_events ORDER BY id")
    assert [row["email"] for row in found] == [None, None, None, None, "alice@example.com"]
    assert [line["email"] for line in lines(caplog)] == [None] * 4 + ["alice@example.com"]
    assert all("Tr0ub4dor" not in logged(record) for record in caplog.records)


async def test_client_fields_are_cleaned_and_capped(
    statements: Statements,
    events: SecurityEvents,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = ClientInfo(ip="1" * 100, user_agent="evil\r\n\x00agent" + "x" * 1000)
    await events.record_now(
        statements,
        EventKind.SIGNUP,
        user_id=uuid.uuid4(),
        client=client,
        details={"note": "line\nbreak" + "y" * 500},
    )
    (row,) = await rows(database_url, "SELECT ip, user_agent, details FROM security_events")
    assert row["ip"] == "1" * IP_MAX
    assert row["user_agent"].startswith("evilagent") and len(row["user_agent"]) == USER_AGENT_MAX
    assert "\n" not in json.loads(row["details"])["note"]
    (line,) = lines(caplog)
    assert line["ip"] == row["ip"] and line["user_agent"] == row["user_agent"]


async def test_an_event_without_a_client_or_user(
    statements: Statements, events: SecurityEvents, database_url: str
) -> None:
    await events.record_now(statements, EventKind.LOCKED_OUT)
    (row,) = await rows(database_url, "SELECT * FROM security_events")
    assert row["kind"] == "LOCKED_OUT"
    assert (row["user_id"], row["ip"], row["user_agent"], row["details"]) == (None,) * 4


def test_the_kinds_are_the_contracts() -> None:
    # The contract's kinds (abuse.graphql), then the ones added since (adding is free).
    assert [kind.value for kind in EventKind] == [
        "SIGNUP",
        "EMAIL_VERIFIED",
        "LOGIN_SUCCEEDED",
        "LOGIN_FAILED",
        "LOCKED_OUT",
        "REFRESH_REUSED",
        "LOGOUT",
        "PASSWORD_CHANGED",
        "PASSWORD_RESET",
        "TOTP_ENABLED",
        "TOTP_DISABLED",
        "RECOVERY_CODE_USED",
        "SESSION_REVOKED",
        "EMAIL_CHANGED",
        "ACCOUNT_DELETED",
        "OPERATOR_DISABLE",
        "OPERATOR_ENABLE",
        "OPERATOR_UNLOCK",
        "OPERATOR_LOGOUT",
        "REAUTHENTICATED",
        "PASSKEY_ADDED",
        "PASSKEY_REMOVED",
        "PASSKEY_CLONE_SUSPECTED",
        "IDENTITY_LINKED",
        "IDENTITY_UNLINKED",
        "ROLES_CHANGED",
    ]


# -- pages -----------------------------------------------------------------------------


async def record_many(
    statements: Statements, events: SecurityEvents, user_id: uuid.UUID, count: int
) -> None:
    kinds = list(EventKind)
    async with events.transaction(statements) as tx:
        for n in range(count):
            await events.record(tx, kinds[n % len(kinds)], user_id=user_id, client=CLIENT)


async def test_pages_are_newest_first_and_walk_the_whole_log(
    statements: Statements, events: SecurityEvents, database_url: str
) -> None:
    user_id = uuid.uuid4()
    await record_many(statements, events, user_id, 7)
    await record_many(statements, events, uuid.uuid4(), 3)  # someone else's
    ids = [
        row["id"]
        for row in await rows(
            database_url,
            "SELECT id FROM security_events WHERE user_id = :u ORDER BY id DESC",
            u=user_id,
        )
    ]
    seen: list[int] = []
    after = None
    pages = 0
    while True:
        page = await events.page(statements, user_id=user_id, first=3, after=after)
        pages += 1
        seen += [event.id for event in page.events]
        assert page.end_cursor == page.events[-1].cursor
        assert all(decode_cursor(event.cursor) == event.id for event in page.events)
        if not page.has_next_page:
            break
        after = page.end_cursor
    assert seen == ids
    assert pages == 3  # 3 + 3 + 1; the last one says there is no next page

    # An exact fit: the page that holds the last event says so.
    page = await events.page(statements, user_id=user_id, first=7)
    assert [event.id for event in page.events] == ids and not page.has_next_page
    # Past the end: an empty page, no end cursor.
    page = await events.page(statements, user_id=user_id, after=encode_cursor(ids[-1]))
    assert page.events == [] and page.end_cursor is None and not page.has_next_page


async def test_a_page_shows_what_the_contract_exposes(
    statements: Statements, events: SecurityEvents, clock: MutableClock
) -> None:
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    await events.record_now(
        statements, EventKind.TOTP_ENABLED, user_id=user_id, session_id=session_id, client=CLIENT
    )
    (event,) = (await events.page(statements, user_id=user_id)).events
    assert event.kind is EventKind.TOTP_ENABLED
    assert event.at == clock.now()
    assert (event.ip, event.user_agent, event.session_id) == (
        CLIENT.ip,
        CLIENT.user_agent,
        session_id,
    )


async def test_page_sizes(statements: Statements, events: SecurityEvents) -> None:
    user_id = uuid.uuid4()
    await record_many(statements, events, user_id, MAX_PAGE_SIZE + 5)
    page = await events.page(statements, user_id=user_id)
    assert len(page.events) == 20 and page.has_next_page  # the default
    page = await events.page(statements, user_id=user_id, first=10_000)
    assert len(page.events) == MAX_PAGE_SIZE and page.has_next_page  # clamped
    page = await events.page(statements, user_id=user_id, first=0)
    assert page.events == [] and page.has_next_page and page.end_cursor is None
    with pytest.raises(AuthFailure) as refused:
        await events.page(statements, user_id=user_id, first=-1)
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.field == "first"


async def test_a_user_with_no_events_gets_an_empty_page(
    statements: Statements, events: SecurityEvents
) -> None:
    await record_many(statements, events, uuid.uuid4(), 2)
    page = await events.page(statements, user_id=uuid.uuid4())
    assert page.events == [] and not page.has_next_page and page.end_cursor is None


async def test_another_users_cursor_shows_only_ones_own_events(
    statements: Statements, events: SecurityEvents
) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    await record_many(statements, events, mine, 2)
    await record_many(statements, events, theirs, 2)
    their_page = await events.page(statements, user_id=theirs)
    page = await events.page(statements, user_id=mine, after=their_page.events[0].cursor)
    assert page.events and {event.id for event in page.events}.isdisjoint(
        event.id for event in their_page.events
    )


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor",
        "djE6",  # "v1:" without an id
        "djE6MTI=",  # padded
        "djI6MTI",  # "v2:12"
        "djE6LTE",  # "v1:-1"
        "djE6MA",  # "v1:0"
        "djE6MDEy",  # "v1:012": not the canonical form of 12
        "djE6OTk5OTk5OTk5OTk5OTk5OTk5OTk5",  # beyond BIGINT
        "djE6MTI" + "=" * 50,
        "djE6MT+",
        "djE6MTI\x00",
        "djE6MTIé",
        "MTI",  # "12"
        "12",
    ],
)
async def test_a_malformed_cursor_is_invalid_input(
    statements: Statements, events: SecurityEvents, cursor: str
) -> None:
    with pytest.raises(AuthFailure) as refused:
        await events.page(statements, user_id=uuid.uuid4(), after=cursor)
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.field == "after"


def test_cursors_round_trip() -> None:
    for event_id in (1, 12, 2**31, 2**63 - 1):
        cursor = encode_cursor(event_id)
        assert str(event_id) not in cursor  # opaque: no bare id to tamper with
        assert decode_cursor(cursor) == event_id


# -- retention -------------------------------------------------------------------------


async def test_events_older_than_the_retention_are_pruned(
    statements: Statements, events: SecurityEvents, clock: MutableClock, database_url: str
) -> None:
    user_id = uuid.uuid4()
    await events.record_now(statements, EventKind.SIGNUP, user_id=user_id)
    clock.advance(days=10)
    await events.record_now(statements, EventKind.LOGOUT, user_id=user_id)
    retention = timedelta(days=30)
    clock.advance(days=20)  # the first is exactly 30 days old: kept
    assert await prune_events(statements, clock.now(), retention) == 0
    clock.advance(seconds=1)
    assert await prune_events(statements, clock.now(), retention) == 1
    found = await rows(database_url, "SELECT kind FROM security_events")
    assert found == [{"kind": "LOGOUT"}]


async def session_ids(database_url: str) -> set[uuid.UUID]:
    return {row["id"] for row in await rows(database_url, "SELECT id FROM sessions")}


async def generations(database_url: str, session_id: uuid.UUID) -> list[int]:
    found = await rows(
        database_url,
        "SELECT generation FROM refresh_tokens WHERE session_id = :s ORDER BY generation",
        s=session_id,
    )
    return [row["generation"] for row in found]


async def sign_up(client: httpx.AsyncClient) -> dict[str, Any]:
    session = await signup(client, unique_email(), PASSWORD)
    assert session["__typename"] == "AuthSession", session
    return session


async def session_of(database_url: str, refresh_token: str) -> uuid.UUID:
    (row,) = await rows(
        database_url,
        "SELECT session_id FROM refresh_tokens WHERE token_hash = :d",
        d=token_digest(refresh_token),
    )
    found: uuid.UUID = row["session_id"]
    return found


async def test_ended_sessions_are_pruned_after_the_retention(
    client: httpx.AsyncClient,
    statements: Statements,
    clock: MutableClock,
    database_url: str,
    settings: Settings,
) -> None:
    assert settings.refresh_token_expire_days == 30  # sessions end 30 days after sign-in
    retention = timedelta(days=10)
    revoked = await sign_up(client)
    revoked_id = await session_of(database_url, revoked["refreshToken"])
    expiring = await sign_up(client)
    expiring_id = await session_of(database_url, expiring["refreshToken"])
    assert await logout(client, revoked["refreshToken"]) == 1  # day 0
    clock.advance(days=10)
    live = await sign_up(client)  # day 10, ends on day 24 unless used
    live_id = await session_of(database_url, live["refreshToken"])

    # Revoked exactly `retention` ago: kept.
    assert await prune_ended_sessions(statements, clock.now(), retention) == 0
    clock.advance(seconds=1)
    assert await prune_ended_sessions(statements, clock.now(), retention) == 1
    assert await session_ids(database_url) == {expiring_id, live_id}
    assert await generations(database_url, revoked_id) == []  # its tokens went with it

    # Never revoked, it went idle on day 14 (SESSION_IDLE_TIMEOUT): it goes once it
    # has been over that long.
    clock.advance(days=14, seconds=-1)  # day 24
    assert await prune_ended_sessions(statements, clock.now(), retention) == 0
    clock.advance(seconds=1)
    assert await prune_ended_sessions(statements, clock.now(), retention) == 1
    assert await session_ids(database_url) == {live_id}
    assert await generations(database_url, expiring_id) == []


async def rotate(client: httpx.AsyncClient, token: str) -> str:
    rotated = await refresh(client, token)
    assert rotated["__typename"] == "AuthSession", rotated
    fresh: str = rotated["refreshToken"]
    return fresh


async def test_spent_generations_of_live_sessions_are_pruned_but_the_last_two_kept(
    client: httpx.AsyncClient,
    statements: Statements,
    clock: MutableClock,
    database_url: str,
) -> None:
    retention = timedelta(days=7)
    session = await sign_up(client)
    session_id = await session_of(database_url, session["refreshToken"])
    tokens = [session["refreshToken"]]
    for _ in range(4):  # generation n is spent on day n + 1
        clock.advance(days=1)
        tokens.append(await rotate(client, tokens[-1]))
    # An ended session's spent generations are left to prune_ended_sessions.
    ended = await sign_up(client)  # day 4
    ended_id = await session_of(database_url, ended["refreshToken"])
    ended_token = ended["refreshToken"]
    for _ in range(3):
        ended_token = await rotate(client, ended_token)
    assert await logout(client, ended_token) == 1
    assert await generations(database_url, session_id) == [0, 1, 2, 3, 4]

    clock.advance(days=4)  # day 8: generation 0 spent exactly `retention` ago: kept
    assert await prune_spent_generations(statements, clock.now(), retention) == 0
    clock.advance(days=1, seconds=1)  # day 9: generations 0 and 1 past it
    assert await prune_spent_generations(statements, clock.now(), retention) == 2
    assert await generations(database_url, session_id) == [2, 3, 4]
    # Day 17 (the session, last used on day 4, is inside its idle timeout): everything
    # spent is old; the newest two stay.
    clock.advance(days=8)
    assert await prune_spent_generations(statements, clock.now(), retention) == 1
    assert await generations(database_url, session_id) == [3, 4]
    assert await generations(database_url, ended_id) == [0, 1, 2, 3]

    # A pruned generation is an unknown token now: refused, and the session lives on.
    stale = await refresh(client, tokens[0])
    assert stale["__typename"] == "AuthError" and stale["code"] == "INVALID_TOKEN", stale
    await rotate(client, tokens[-1])
    # The generation before the newest still tells reuse: it ends the session.
    reused = await refresh(client, tokens[-2])
    assert reused["__typename"] == "AuthError" and reused["code"] == "TOKEN_REUSED", reused


# -- SQLite ----------------------------------------------------------------------------


@pytest.fixture
async def sqlite(
    make_settings: Callable[..., Settings], tmp_path: Path, clock: MutableClock
) -> AsyncIterator[tuple[httpx.AsyncClient, Statements]]:
    """The app on SQLite (migrated on start) and Statements of the test's own beside it."""
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/strawgate.db")
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        engine = create_engine(settings)
        runner = Statements(engine)
        await runner.start()
        yield http, runner
        await runner.close()
        await engine.dispose()


async def test_the_trail_and_its_retention_on_sqlite(
    sqlite: tuple[httpx.AsyncClient, Statements], events: SecurityEvents, clock: MutableClock
) -> None:
    client, statements = sqlite
    user_id = uuid.uuid4()
    with pytest.raises(Boom):
        async with events.transaction(statements) as tx:
            await events.record(tx, EventKind.LOGOUT, user_id=user_id)
            raise Boom
    await record_many(statements, events, user_id, 5)
    first = await events.page(statements, user_id=user_id, first=3)
    rest = await events.page(statements, user_id=user_id, after=first.end_cursor)
    ids = [event.id for event in first.events + rest.events]
    assert len(ids) == 5 and ids == sorted(ids, reverse=True)
    assert first.has_next_page and not rest.has_next_page

    tokens = [(await sign_up(client))["refreshToken"]]
    for _ in range(3):
        clock.advance(days=1)
        tokens.append(await rotate(client, tokens[-1]))
    ended = await sign_up(client)
    assert await logout(client, ended["refreshToken"]) == 1
    clock.advance(days=12)  # day 15: the live session is inside its idle timeout
    retention = timedelta(days=10)
    assert await prune_spent_generations(statements, clock.now(), retention) == 2
    assert await prune_ended_sessions(statements, clock.now(), retention) == 1
    assert await prune_events(statements, clock.now(), retention) >= 5  # the app records too
    assert (await events.page(statements, user_id=user_id)).events == []
    await rotate(client, tokens[-1])
