"""sessions and revokeSession: the signed-in user's own live sessions, newest first, and
ending one of them at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    ME,
    REVOKE_SESSION,
    SESSIONS,
    gql,
    logout,
    refresh,
    signed_in,
    signup,
)

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36"
)
CURL = "curl/8.5.0"

Device = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def device(app: Starlette) -> AsyncIterator[Device]:
    """Makes clients of the app from a given address with a given user agent."""
    opened: list[httpx.AsyncClient] = []

    def make(ip: str = "203.0.113.7", user_agent: str = "pytest") -> httpx.AsyncClient:
        http = client_for(app, ip=ip)
        http.headers["user-agent"] = user_agent
        opened.append(http)
        return http

    yield make
    for http in opened:
        await http.aclose()


async def sessions_of(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    body = await gql(client, SESSIONS, token=token)
    assert "errors" not in body, body
    listed: list[dict[str, Any]] = body["data"]["sessions"]
    return listed


async def current_id(client: httpx.AsyncClient, token: str) -> str:
    (current,) = [s["id"] for s in await sessions_of(client, token) if s["current"]]
    return str(current)


async def revoke(client: httpx.AsyncClient, token: str, session_id: str) -> int:
    body = await gql(client, REVOKE_SESSION, {"i": {"id": session_id}}, token=token)
    assert "errors" not in body, body
    return int(body["data"]["revokeSession"]["revoked"])


async def is_unauthenticated(client: httpx.AsyncClient, token: str) -> bool:
    body = await gql(client, ME, token=token)
    return bool(
        body["data"] == {"me": None}
        and body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    )


def at(value: str) -> datetime:
    """An ISO 8601 timestamp with its offset, as the DateTime scalar gives it."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


async def test_sessions_lists_the_users_sessions_newest_first(
    device: Device, clock: MutableClock
) -> None:
    email = unique_email()
    laptop, desktop, script = (
        device("203.0.113.7", FIREFOX),
        device("198.51.100.20", CHROME),
        device("2001:db8:1::5", CURL),
    )
    first = await signup(laptop, email, PASSWORD)
    created = [clock.now()]
    clock.advance(minutes=3)
    second = await signed_in(desktop, email)
    created.append(clock.now())
    clock.advance(minutes=3)
    third = await signed_in(script, email)
    created.append(clock.now())

    listed = await sessions_of(desktop, second["accessToken"])
    assert [(s["userAgent"], s["ipAddress"], s["current"]) for s in listed] == [
        (CURL, "2001:db8:1::5", False),
        (CHROME, "198.51.100.20", True),
        (FIREFOX, "203.0.113.7", False),
    ]
    assert [at(s["createdAt"]) for s in listed] == created[::-1]
    assert [at(s["lastUsedAt"]) for s in listed] == created[::-1]
    assert len({s["id"] for s in listed}) == 3
    # Each session sees the same list, with itself as the current one.
    for token, index in ((first["accessToken"], 2), (third["accessToken"], 0)):
        again = await sessions_of(laptop, token)
        assert [s["id"] for s in again] == [s["id"] for s in listed]
        assert [s["current"] for s in again] == [i == index for i in range(3)]


async def test_last_used_moves_on_refresh(device: Device, clock: MutableClock) -> None:
    email = unique_email()
    laptop = device("203.0.113.7", FIREFOX)
    first = await signup(laptop, email, PASSWORD)
    started = clock.now()
    clock.advance(minutes=1)
    second = await signed_in(laptop, email)
    signed_in_at = clock.now()
    clock.advance(minutes=10)
    refreshed = await refresh(laptop, first["refreshToken"])
    assert refreshed["__typename"] == "AuthSession", refreshed
    listed = await sessions_of(laptop, refreshed["accessToken"])
    # Still ordered by creation, not by use.
    newest, oldest = listed
    assert (oldest["current"], newest["current"]) == (True, False)
    assert (at(oldest["createdAt"]), at(oldest["lastUsedAt"])) == (started, clock.now())
    assert (at(newest["createdAt"]), at(newest["lastUsedAt"])) == (signed_in_at, signed_in_at)
    assert await current_id(laptop, second["accessToken"]) == newest["id"]


async def test_ended_sessions_and_other_users_sessions_are_not_listed(device: Device) -> None:
    email = unique_email()
    http = device()
    mine = await signup(http, email, PASSWORD)
    logged_out = await signed_in(http, email)
    revoked = await signed_in(http, email)
    kept = await signed_in(http, email)
    stranger = await signup(http, unique_email(), PASSWORD)
    assert await logout(http, logged_out["refreshToken"]) == 1
    revoked_id = await current_id(http, revoked["accessToken"])
    assert await revoke(http, mine["accessToken"], revoked_id) == 1

    listed = await sessions_of(http, mine["accessToken"])
    ids = {s["id"] for s in listed}
    assert ids == {
        await current_id(http, mine["accessToken"]),
        await current_id(http, kept["accessToken"]),
    }
    assert ids.isdisjoint({s["id"] for s in await sessions_of(http, stranger["accessToken"])})
    assert len(await sessions_of(http, stranger["accessToken"])) == 1


async def test_revoking_another_session_ends_it_at_once(device: Device) -> None:
    email = unique_email()
    phone, laptop = device("198.51.100.20", CHROME), device("203.0.113.7", FIREFOX)
    mine = await signup(laptop, email, PASSWORD)
    theirs = await signed_in(phone, email)
    target = await current_id(phone, theirs["accessToken"])
    assert not await is_unauthenticated(phone, theirs["accessToken"])

    assert await revoke(laptop, mine["accessToken"], target) == 1
    assert await is_unauthenticated(phone, theirs["accessToken"])
    assert (await refresh(phone, theirs["refreshToken"]))["code"] == "INVALID_TOKEN"
    assert await revoke(laptop, mine["accessToken"], target) == 0
    listed = await sessions_of(laptop, mine["accessToken"])
    assert [s["current"] for s in listed] == [True]
    # This session goes on.
    assert (await refresh(laptop, mine["refreshToken"]))["__typename"] == "AuthSession"


async def test_another_users_session_or_nonsense_ends_nothing(device: Device) -> None:
    http = device()
    mine = await signup(http, unique_email(), PASSWORD)
    stranger = await signup(http, unique_email(), PASSWORD)
    theirs = await current_id(http, stranger["accessToken"])
    for session_id in (theirs, "not-a-session", "", "00000000-0000-0000-0000-000000000000"):
        assert await revoke(http, mine["accessToken"], session_id) == 0
    assert not await is_unauthenticated(http, stranger["accessToken"])
    assert (await refresh(http, stranger["refreshToken"]))["__typename"] == "AuthSession"
    assert not await is_unauthenticated(http, mine["accessToken"])


async def test_revoking_the_current_session_signs_out(device: Device) -> None:
    http = device()
    email = unique_email()
    mine = await signup(http, email, PASSWORD)
    other = await signed_in(http, email)
    assert await revoke(http, mine["accessToken"], await current_id(http, mine["accessToken"])) == 1
    assert await is_unauthenticated(http, mine["accessToken"])
    assert (await refresh(http, mine["refreshToken"]))["code"] == "INVALID_TOKEN"
    body = await gql(http, SESSIONS, token=mine["accessToken"])
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert not await is_unauthenticated(http, other["accessToken"])


async def test_sessions_and_revoke_need_a_signed_in_user(device: Device) -> None:
    http = device()
    mine = await signup(http, unique_email(), PASSWORD)
    target = await current_id(http, mine["accessToken"])
    for headers in ({}, {"authorization": "Bearer not-a-token"}):
        listed = await gql(http, SESSIONS, headers=headers)
        assert listed["data"] is None
        assert listed["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        revoked = await gql(http, REVOKE_SESSION, {"i": {"id": target}}, headers=headers)
        assert revoked["data"] is None
        assert revoked["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert not await is_unauthenticated(http, mine["accessToken"])
