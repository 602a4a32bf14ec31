"""logout: one session, every session, spent tokens, and immediate revocation."""

from __future__ import annotations

import httpx

from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import ME, gql, login, logout, refresh, signup


async def test_logout_ends_the_session_and_its_access_tokens_at_once(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    mine = await signup(client, email, PASSWORD)
    other = await login(client, email, PASSWORD)
    assert await logout(client, mine["refreshToken"]) == 1
    me = await gql(client, ME, token=mine["accessToken"])
    assert me["data"] == {"me": None}
    assert me["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await refresh(client, mine["refreshToken"]))["code"] == "INVALID_TOKEN"
    # The other session is untouched.
    assert (await gql(client, ME, token=other["accessToken"]))["data"]["me"]["email"] == email
    assert await logout(client, mine["refreshToken"]) == 0


async def test_logout_everywhere(client: httpx.AsyncClient) -> None:
    email = unique_email()
    sessions = [await signup(client, email, PASSWORD)]
    sessions += [await login(client, email, PASSWORD) for _ in range(2)]
    stranger = await signup(client, unique_email(), PASSWORD)
    assert await logout(client, sessions[0]["refreshToken"], everywhere=True) == 3
    for session in sessions:
        me = await gql(client, ME, token=session["accessToken"])
        assert me["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await gql(client, ME, token=stranger["accessToken"]))["data"]["me"] is not None


async def test_a_spent_token_of_a_live_session_logs_it_out(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    second = await refresh(client, first["refreshToken"])
    clock.advance(minutes=5)
    assert await logout(client, first["refreshToken"]) == 1
    assert (await refresh(client, second["refreshToken"]))["code"] == "INVALID_TOKEN"


async def test_unknown_or_missing_tokens_end_nothing(client: httpx.AsyncClient) -> None:
    session = await signup(client, unique_email(), PASSWORD)
    assert await logout(client, None) == 0
    assert await logout(client, "") == 0
    assert await logout(client, "not-a-token", everywhere=True) == 0
    assert await logout(client, session["accessToken"]) == 0
    assert (await gql(client, ME, token=session["accessToken"]))["data"]["me"] is not None


async def test_logout_refuses_control_characters(client: httpx.AsyncClient) -> None:
    from tests.gql import LOGOUT

    body = await gql(client, LOGOUT, {"i": {"refreshToken": "a\x00b"}})
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"


async def test_logout_ignores_the_authorization_header(client: httpx.AsyncClient) -> None:
    from tests.gql import LOGOUT

    session = await signup(client, unique_email(), PASSWORD)
    body = await gql(
        client, LOGOUT, {"i": {"refreshToken": session["refreshToken"]}}, token="expired"
    )
    assert body == {"data": {"logout": {"revoked": 1}}}


async def test_concurrent_logouts_everywhere_do_not_fail(client: httpx.AsyncClient) -> None:
    """Two devices pressing "sign out everywhere" at once: no deadlock, no error; the
    sessions end once, and the counts add up to them."""
    import asyncio

    email = unique_email()
    sessions = [await signup(client, email, PASSWORD)]
    sessions += [await login(client, email, PASSWORD) for _ in range(5)]
    for _ in range(3):
        counts = await asyncio.gather(
            *(logout(client, s["refreshToken"], everywhere=True) for s in sessions)
        )
        assert sum(counts) == len(sessions)
        sessions = [await login(client, email, PASSWORD) for _ in range(6)]


async def test_logout_and_refresh_race_without_errors(client: httpx.AsyncClient) -> None:
    import asyncio

    email = unique_email()
    sessions = [await signup(client, email, PASSWORD)]
    sessions += [await login(client, email, PASSWORD) for _ in range(3)]
    results = await asyncio.gather(
        *(refresh(client, s["refreshToken"]) for s in sessions),
        *(logout(client, s["refreshToken"], everywhere=True) for s in sessions[:2]),
    )
    refreshed, ended = results[: len(sessions)], results[len(sessions) :]
    assert sum(ended) == len(sessions)  # every session ended exactly once
    for answer in refreshed:
        assert answer["__typename"] == "AuthSession" or answer["code"] == "INVALID_TOKEN"
