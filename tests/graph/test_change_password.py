"""changePassword: the current password, the policy, the session kept with a new refresh
token, every other session ended, pending challenges voided, and the notice mailed."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tests.conftest import PASSWORD
from tests.gql import (
    CHANGE_PASSWORD,
    ME,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    SESSIONS,
    gql,
    login,
    mutate,
    refresh,
    signed_in,
    signed_up,
    verify_otp,
)
from tests.smtp import CODE_LINE, SmtpSink

NEW_PASSWORD = "a different horse, battery and staple"


async def change(
    client: httpx.AsyncClient, token: str | None, current: str, new: str
) -> dict[str, Any]:
    body = await gql(
        client,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": current, "newPassword": new}},
        token=token,
    )
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"]["changePassword"]
    return result


async def unauthenticated(client: httpx.AsyncClient, token: str) -> bool:
    body = await gql(client, ME, token=token)
    return bool(
        body["data"] == {"me": None}
        and body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    )


async def me_email(client: httpx.AsyncClient, token: str) -> str:
    body = await gql(client, ME, token=token)
    assert "errors" not in body, body
    return str(body["data"]["me"]["email"])


async def listed(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    body = await gql(client, SESSIONS, token=token)
    assert "errors" not in body, body
    sessions: list[dict[str, Any]] = body["data"]["sessions"]
    return sessions


async def current_session_id(client: httpx.AsyncClient, token: str) -> str:
    sessions = await listed(client, token)
    (current,) = [s["id"] for s in sessions if s["current"]]
    return str(current)


async def subjects_until_marker(client: httpx.AsyncClient, smtp: SmtpSink, email: str) -> list[str]:
    """The subjects of every mail to `email`, once a sign-in code requested now has arrived:
    whatever was queued before it has had its turn."""
    marker = await mutate(client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    assert marker["__typename"] == "OtpChallenge", marker
    await smtp.wait_for(email, where=lambda m: "sign-in code" in m.subject)
    return [m.subject for m in smtp.mails(email)]


async def test_a_wrong_current_password_changes_nothing(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, mine = await signed_up(mail_client, smtp)
    other = await signed_in(mail_client, email, PASSWORD)
    for wrong in ("not the password at all", "", PASSWORD.upper()):
        answer = await change(mail_client, mine["accessToken"], wrong, NEW_PASSWORD)
        assert answer["__typename"] == "AuthError"
        assert (answer["code"], answer["field"]) == ("INVALID_CREDENTIALS", "currentPassword")
    # Both sessions live, both refresh tokens unspent, the old password still the one.
    assert await me_email(mail_client, other["accessToken"]) == email
    assert (await refresh(mail_client, mine["refreshToken"]))["__typename"] == "AuthSession"
    assert (await refresh(mail_client, other["refreshToken"]))["__typename"] == "AuthSession"
    assert (await login(mail_client, email, NEW_PASSWORD))["code"] == "INVALID_CREDENTIALS"
    await signed_in(mail_client, email, PASSWORD)
    subjects = await subjects_until_marker(mail_client, smtp, email)
    assert not [s for s in subjects if "password" in s.lower()], subjects


@pytest.mark.parametrize(
    "new",
    [PASSWORD, "password123", "Password123", "short"],
    ids=["same", "common", "cased", "short"],
)
async def test_the_new_password_must_pass_the_policy(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, new: str
) -> None:
    email, mine = await signed_up(mail_client, smtp)
    other = await signed_in(mail_client, email, PASSWORD)
    answer = await change(mail_client, mine["accessToken"], PASSWORD, new)
    assert answer["__typename"] == "AuthError"
    assert (answer["code"], answer["field"]) == ("WEAK_PASSWORD", "newPassword")
    assert answer["message"]
    assert await me_email(mail_client, other["accessToken"]) == email
    assert (await refresh(mail_client, mine["refreshToken"]))["__typename"] == "AuthSession"
    if new != PASSWORD:
        assert (await login(mail_client, email, new))["code"] == "INVALID_CREDENTIALS"
    await signed_in(mail_client, email, PASSWORD)
    subjects = await subjects_until_marker(mail_client, smtp, email)
    assert not [s for s in subjects if "password" in s.lower()], subjects


async def test_success_keeps_this_session_and_ends_every_other(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, mine = await signed_up(mail_client, smtp)
    others = [await signed_in(mail_client, email, PASSWORD) for _ in range(2)]
    stranger_email, stranger = await signed_up(mail_client, smtp)
    before = await current_session_id(mail_client, mine["accessToken"])

    answer = await change(mail_client, mine["accessToken"], PASSWORD, NEW_PASSWORD)
    assert answer["__typename"] == "AuthSession", answer
    assert answer["tokenType"] == "Bearer" and answer["expiresIn"] > 0
    assert answer["user"]["email"] == email
    assert answer["refreshToken"] not in (None, mine["refreshToken"])
    # The same session: the new access token names it, and it is the only one left.
    sessions = await listed(mail_client, answer["accessToken"])
    assert [(s["id"], s["current"]) for s in sessions] == [(before, True)]
    assert await me_email(mail_client, mine["accessToken"]) == email

    # The old refresh token is spent without counting as reuse: the session lives on.
    old = await refresh(mail_client, mine["refreshToken"])
    assert old["__typename"] == "AuthError" and old["code"] == "INVALID_TOKEN", old
    assert await me_email(mail_client, answer["accessToken"]) == email
    rotated = await refresh(mail_client, answer["refreshToken"])
    assert rotated["__typename"] == "AuthSession", rotated
    assert await current_session_id(mail_client, rotated["accessToken"]) == before

    for other in others:
        assert await unauthenticated(mail_client, other["accessToken"])
        assert (await refresh(mail_client, other["refreshToken"]))["code"] == "INVALID_TOKEN"
    # Another user's session is untouched.
    assert await me_email(mail_client, stranger["accessToken"]) == stranger_email
    assert (await refresh(mail_client, stranger["refreshToken"]))["__typename"] == "AuthSession"

    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    await signed_in(mail_client, email, NEW_PASSWORD)

    notice = await smtp.wait_for(email, where=lambda m: "password" in m.subject.lower())
    assert "password was changed" in notice.subject.lower()
    assert "Your password was changed." in notice.text()
    assert "Your password was changed." in notice.html()
    assert not CODE_LINE.search(notice.text())
    assert NEW_PASSWORD not in notice.text() + notice.html()
    # One notice, and only to the owner.
    subjects = await subjects_until_marker(mail_client, smtp, email)
    assert len([s for s in subjects if "password" in s.lower()]) == 1, subjects
    assert not [m for m in smtp.mails(stranger_email) if "password" in m.subject.lower()]


async def test_the_refreshed_tokens_of_this_session_are_spent_too(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """A session that has rotated its refresh token before: neither generation works after
    the change, and presenting either ends nothing."""
    email, first = await signed_up(mail_client, smtp)
    second = await refresh(mail_client, first["refreshToken"])
    answer = await change(mail_client, second["accessToken"], PASSWORD, NEW_PASSWORD)
    assert answer["__typename"] == "AuthSession", answer
    for spent in (first["refreshToken"], second["refreshToken"]):
        assert (await refresh(mail_client, spent))["code"] == "INVALID_TOKEN"
    assert await me_email(mail_client, answer["accessToken"]) == email
    assert (await refresh(mail_client, answer["refreshToken"]))["__typename"] == "AuthSession"


async def test_change_password_needs_a_signed_in_user(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, mine = await signed_up(mail_client, smtp)
    variables = {"i": {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}}
    for headers in ({}, {"authorization": "Bearer not-a-token"}):
        body = await gql(mail_client, CHANGE_PASSWORD, variables, headers=headers)
        assert body["data"] is None
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    # A session that has ended cannot change the password either.
    other = await signed_in(mail_client, email, PASSWORD)
    assert (await change(mail_client, other["accessToken"], PASSWORD, NEW_PASSWORD))[
        "__typename"
    ] == "AuthSession"
    body = await gql(
        mail_client,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": NEW_PASSWORD, "newPassword": PASSWORD + "!"}},
        token=mine["accessToken"],
    )
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    await signed_in(mail_client, email, NEW_PASSWORD)


async def test_changing_the_password_voids_pending_codes(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, mine = await signed_up(mail_client, smtp)
    reset = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    reset_mail = await smtp.wait_for(email, where=lambda m: "reset" in m.subject.lower())
    sign_in = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    login_mail = await smtp.wait_for(email, where=lambda m: "sign-in code" in m.subject)

    answer = await change(mail_client, mine["accessToken"], PASSWORD, NEW_PASSWORD)
    assert answer["__typename"] == "AuthSession", answer

    body = await gql(
        mail_client,
        RESET_PASSWORD,
        {
            "i": {
                "challengeToken": reset["challengeToken"],
                "code": reset_mail.code(),
                "newPassword": "yet another horse and staple",
            }
        },
    )
    assert body["data"]["resetPassword"]["code"] == "INVALID_TOKEN", body
    voided = await verify_otp(mail_client, sign_in["challengeToken"], login_mail.code())
    assert voided["code"] == "INVALID_TOKEN", voided
    # The password set by the change stands, and the session that made it lives.
    await signed_in(mail_client, email, NEW_PASSWORD)
    assert await me_email(mail_client, answer["accessToken"]) == email


async def waiting_for_locks(conn: AsyncConnection, count: int) -> None:
    """Until `count` other backends of this database wait for a row lock (5 s at most)."""
    deadline = time.monotonic() + 5
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while (await conn.execute(query)).scalar_one() < count:
        assert time.monotonic() < deadline, f"{count} requests never waited for the lock"
        await asyncio.sleep(0.01)


async def test_concurrent_changes_from_two_sessions_do_not_fail(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    """Two devices of one user change the password at the same moment: one wins, the
    other is told why (its password or its session is no longer valid); neither gets a
    server error. The test holds both sessions' rows until both requests wait for them,
    so they start their transactions together."""
    email, first = await signed_up(mail_client, smtp)
    second = await signed_in(mail_client, email, PASSWORD)
    ids = [await current_session_id(mail_client, s["accessToken"]) for s in (first, second)]
    variables = {"i": {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}}
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as holder, engine.connect() as watcher:
            held = await holder.begin()
            await holder.execute(
                text("SELECT id FROM sessions WHERE id = ANY(:ids) FOR UPDATE"),
                {"ids": [uuid.UUID(i) for i in ids]},
            )
            racing = [
                asyncio.create_task(
                    gql(mail_client, CHANGE_PASSWORD, variables, token=s["accessToken"])
                )
                for s in (first, second)
            ]
            await waiting_for_locks(watcher, 2)
            await held.rollback()
            bodies = await asyncio.gather(*racing)
    finally:
        await engine.dispose()
    assert all("errors" not in body for body in bodies), bodies
    answers = sorted(body["data"]["changePassword"]["__typename"] for body in bodies)
    assert answers == ["AuthError", "AuthSession"], bodies
    await signed_in(mail_client, email, NEW_PASSWORD)
