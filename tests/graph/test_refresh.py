"""refresh: rotation, the reuse interval, reuse detection, lifetimes, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import RefreshToken, UserSession
from db.security.tokens import token_digest
from db.settings import Settings
from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import ME, gql, refresh, signup


async def refresh_rows(database_url: str) -> list[RefreshToken]:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(RefreshToken).order_by(RefreshToken.generation))).all()
    await engine.dispose()
    return rows  # type: ignore[return-value]


async def test_refresh_rotates(client: httpx.AsyncClient, clock: MutableClock) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    clock.advance(minutes=1)
    second = await refresh(client, first["refreshToken"])
    assert second["__typename"] == "AuthSession"
    assert second["refreshToken"] != first["refreshToken"]
    assert second["accessToken"] != first["accessToken"]
    assert second["user"] == first["user"]
    third = await refresh(client, second["refreshToken"])
    assert third["__typename"] == "AuthSession"
    me = await gql(client, ME, token=third["accessToken"])
    assert me["data"]["me"]["id"] == first["user"]["id"]


async def test_tokens_are_stored_only_as_digests(
    client: httpx.AsyncClient, database_url: str, clock: MutableClock
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    second = await refresh(client, first["refreshToken"])
    rows = await refresh_rows(database_url)
    assert [row.token_hash for row in rows] == [
        token_digest(first["refreshToken"]),
        token_digest(second["refreshToken"]),
    ]
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        dump = str((await conn.execute(select(UserSession))).all()) + str(rows)
    await engine.dispose()
    for token in (first["refreshToken"], second["refreshToken"], first["accessToken"]):
        assert token not in dump


async def test_a_retry_within_the_reuse_interval_gets_the_same_successor(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    second = await refresh(client, first["refreshToken"])
    clock.advance(seconds=9)
    retry = await refresh(client, first["refreshToken"])
    assert retry["__typename"] == "AuthSession"
    assert retry["refreshToken"] == second["refreshToken"]
    # The session lives on and the successor still rotates normally.
    assert (await refresh(client, second["refreshToken"]))["__typename"] == "AuthSession"


async def test_reuse_after_the_interval_revokes_the_session(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    second = await refresh(client, first["refreshToken"])
    clock.advance(seconds=11)
    reused = await refresh(client, first["refreshToken"])
    assert reused["code"] == "TOKEN_REUSED"
    # The whole family is dead, the newest token and its access tokens included.
    assert (await refresh(client, second["refreshToken"]))["code"] == "INVALID_TOKEN"
    me = await gql(client, ME, token=second["accessToken"])
    assert me["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_reuse_of_an_older_generation_revokes_even_within_the_interval(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    second = await refresh(client, first["refreshToken"])
    third = await refresh(client, second["refreshToken"])
    # The successor of `first` has itself been rotated: this is not a racing retry.
    assert (await refresh(client, first["refreshToken"]))["code"] == "TOKEN_REUSED"
    assert (await refresh(client, third["refreshToken"]))["code"] == "INVALID_TOKEN"


async def test_the_reuse_interval_is_configurable(
    make_settings: Callable[..., Settings], clock: MutableClock
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for

    app = create_app(make_settings(refresh_token_reuse_interval=0), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        first = await signup(http, unique_email(), PASSWORD)
        await refresh(http, first["refreshToken"])
        clock.advance(seconds=1)
        assert (await refresh(http, first["refreshToken"]))["code"] == "TOKEN_REUSED"


async def test_refresh_tokens_expire_absolutely(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    token = (await signup(client, unique_email(), PASSWORD))["refreshToken"]
    # Used often enough for the idle timeout (14 days), up to the 30 days' end.
    for step in (timedelta(days=10), timedelta(days=10), timedelta(days=9, hours=23)):
        clock.advance(seconds=step.total_seconds())
        rotated = await refresh(client, token)
        assert rotated["__typename"] == "AuthSession"
        token = rotated["refreshToken"]
    clock.advance(hours=2)  # rotation does not extend the session's absolute lifetime
    assert (await refresh(client, token))["code"] == "INVALID_TOKEN"


async def test_unknown_and_malformed_tokens(client: httpx.AsyncClient) -> None:
    for token in (None, "", "x" * 43, "ü" * 43, "y" * 5000):
        result = await refresh(client, token)
        assert result["code"] == "INVALID_TOKEN", token
    bad = await refresh(client, "abc\x00def")
    assert bad["code"] == "INVALID_INPUT"
    assert bad["field"] == "refreshToken"


async def test_an_access_token_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    assert (await refresh(client, first["accessToken"]))["code"] == "INVALID_TOKEN"


async def test_refresh_of_a_disabled_account(client: httpx.AsyncClient, database_url: str) -> None:
    from tests.graph.test_login import set_user

    email = unique_email()
    first = await signup(client, email, PASSWORD)
    await set_user(database_url, email, is_active=False)
    assert (await refresh(client, first["refreshToken"]))["code"] == "ACCOUNT_DISABLED"


async def test_concurrent_refreshes_of_one_token_agree(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Racing tabs: every answer is the same successor; exactly one rotation happened."""
    first = await signup(client, unique_email(), PASSWORD)
    results = await asyncio.gather(*(refresh(client, first["refreshToken"]) for _ in range(8)))
    assert {r["__typename"] for r in results} == {"AuthSession"}
    assert len({r["refreshToken"] for r in results}) == 1
    assert len(await refresh_rows(database_url)) == 2


async def test_refresh_ignores_the_authorization_header(client: httpx.AsyncClient) -> None:
    from tests.gql import REFRESH

    first = await signup(client, unique_email(), PASSWORD)
    body = await gql(client, REFRESH, {"i": {"refreshToken": first["refreshToken"]}}, token="junk")
    assert body["data"]["refresh"]["__typename"] == "AuthSession"
