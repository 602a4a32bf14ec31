"""Session lifetime besides the absolute refresh lifetime: the idle timeout
(SESSION_IDLE_TIMEOUT) and the cap on live sessions per user (MAX_SESSIONS_PER_USER),
driven by the injected clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from db.models import SecurityEvent
from db.session import Statements
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, running, unique_email
from tests.gql import SESSIONS, gql, login, refresh, signup


@pytest.fixture
def client_with(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> Callable[..., Any]:
    """A client of an app with `overrides` in its settings."""

    async def make(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        app: Starlette = create_app(make_settings(**overrides), clock=clock)
        async for _ in running(app):
            async with client_for(app) as http:
                yield http

    return make


async def test_the_idle_timeout_ends_a_session_whose_refresh_token_goes_unused(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    kept = await signup(client, email, PASSWORD)
    idle = await login(client, email, PASSWORD)
    token = kept["refreshToken"]
    # Each use starts the 14 days again, past any one 14-day stretch in all.
    for _ in range(2):
        clock.advance(days=13, hours=23)
        rotated = await refresh(client, token)
        assert rotated["__typename"] == "AuthSession"
        token = rotated["refreshToken"]
    # The other session went unused for 27 days: it has ended, and is listed no more.
    assert (await refresh(client, idle["refreshToken"]))["code"] == "INVALID_TOKEN"
    listed = (await gql(client, SESSIONS, token=rotated["accessToken"]))["data"]["sessions"]
    assert [s["current"] for s in listed] == [True]
    # And the kept one ends too once 14 days pass without a use.
    clock.advance(days=14, seconds=1)
    assert (await refresh(client, token))["code"] == "INVALID_TOKEN"


async def test_a_session_used_just_inside_the_idle_timeout_lives_on(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    session = await signup(client, unique_email(), PASSWORD)
    clock.advance(days=14, seconds=-1)
    assert (await refresh(client, session["refreshToken"]))["__typename"] == "AuthSession"


async def test_no_idle_timeout_when_it_is_zero(
    client_with: Callable[..., AsyncIterator[httpx.AsyncClient]], clock: MutableClock
) -> None:
    async for client in client_with(session_idle_timeout="0"):
        session = await signup(client, unique_email(), PASSWORD)
        clock.advance(days=29)
        assert (await refresh(client, session["refreshToken"]))["__typename"] == "AuthSession"
        clock.advance(days=1, seconds=1)  # the absolute lifetime still holds
        assert (await refresh(client, session["refreshToken"]))["code"] == "INVALID_TOKEN"


async def test_a_shorter_idle_timeout_from_configuration(
    client_with: Callable[..., AsyncIterator[httpx.AsyncClient]], clock: MutableClock
) -> None:
    async for client in client_with(session_idle_timeout="2h"):
        session = await signup(client, unique_email(), PASSWORD)
        clock.advance(hours=2, seconds=1)
        assert (await refresh(client, session["refreshToken"]))["code"] == "INVALID_TOKEN"


async def test_the_oldest_session_ends_when_one_too_many_starts(
    client_with: Callable[..., AsyncIterator[httpx.AsyncClient]],
    clock: MutableClock,
    statements: Statements,
) -> None:
    async for client in client_with(max_sessions_per_user=3):
        email = unique_email()
        sessions = [await signup(client, email, PASSWORD)]
        for _ in range(3):
            clock.advance(seconds=1)
            sessions.append(await login(client, email, PASSWORD))
        oldest, *kept = sessions
        assert (await refresh(client, oldest["refreshToken"]))["code"] == "INVALID_TOKEN"
        for session in kept:
            assert (await refresh(client, session["refreshToken"]))["__typename"] == "AuthSession"
        newest = await login(client, email, PASSWORD)
        listed = (await gql(client, SESSIONS, token=newest["accessToken"]))["data"]["sessions"]
        assert len(listed) == 3  # the next oldest made room for this one
        # Each ending is on the user's record, with why.
        user_id = uuid.UUID(newest["user"]["id"])
        async with statements.connection() as conn:
            rows = await conn.all(
                select(SecurityEvent.kind, SecurityEvent.details).where(
                    SecurityEvent.user_id == user_id, SecurityEvent.kind == "SESSION_REVOKED"
                ),
                {},
            )
        assert [row["details"] for row in rows] == ['{"reason":"session_limit"}'] * 2


def test_the_defaults(make_settings: Callable[..., Settings]) -> None:
    settings = Settings(_env_file=None)
    assert settings.max_sessions_per_user == 50
    assert settings.session_idle_timeout.days == 14


async def test_the_new_session_is_never_the_one_the_cap_ends(
    client_with: Callable[..., AsyncIterator[httpx.AsyncClient]],
) -> None:
    """Sign-ins at the very same instant (the test clock stands still): whatever order
    the ids give, each new session lives and the one before it ends."""
    async for client in client_with(max_sessions_per_user=1):
        email = unique_email()
        previous = await signup(client, email, PASSWORD)
        for _ in range(8):
            current = await login(client, email, PASSWORD)
            assert (await refresh(client, current["refreshToken"]))["__typename"] == ("AuthSession")
            assert (await refresh(client, previous["refreshToken"]))["code"] == "INVALID_TOKEN"
            previous = current
