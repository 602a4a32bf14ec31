"""The audit trail as the app writes it: every kind of SecurityEventKind, where it happens,
with no secret in it, readable by its user only."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHANGE_PASSWORD,
    LOGOUT,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    REVOKE_SESSION,
    SESSIONS,
    gql,
    login,
    mutate,
    refresh,
    signup,
    verify_otp,
)
from tests.smtp import SmtpSink

EVENTS = "{ securityEvents(first: 100) { edges { node { kind ipAddress userAgent sessionId } } } }"
TYPED_PASSWORD = "hunter2 typed into the email field"


async def kinds(http: httpx.AsyncClient, token: str) -> list[str]:
    body = await gql(http, EVENTS, token=token)
    assert "errors" not in body, body
    return [edge["node"]["kind"] for edge in body["data"]["securityEvents"]["edges"]]


async def enrol(http: httpx.AsyncClient, token: str, clock: MutableClock) -> tuple[str, list[str]]:
    setup = await gql(http, "mutation { setupTotp { ... on TotpSetup { secret } } }", token=token)
    secret: str = setup["data"]["setupTotp"]["secret"]
    confirmed = await gql(
        http,
        "mutation($i: ConfirmTotpInput!) { confirmTotp(input: $i) {"
        " ... on RecoveryCodes { codes } } }",
        {"i": {"code": pyotp.TOTP(secret).at(clock.now())}},
        token=token,
    )
    codes: list[str] = confirmed["data"]["confirmTotp"]["codes"]
    return secret, codes


async def test_every_kind_is_recorded_where_it_happens(
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    clock: MutableClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="strawgate.security")
    http = mail_client
    email = unique_email()
    challenge = await signup(http, email, PASSWORD)  # SIGNUP
    code = (await smtp.wait_for(email)).code()
    first = await verify_otp(http, challenge["challengeToken"], code)  # EMAIL_VERIFIED, LOGIN
    token = first["accessToken"]
    assert (await login(http, email, "wrong password"))["code"] == "INVALID_CREDENTIALS"
    for _ in range(4):
        await login(http, email, "wrong password")  # ... LOCKED_OUT at the fifth
    clock.advance(seconds=31)
    second = await login(http, email, PASSWORD)
    spent = second["refreshToken"]
    await refresh(http, spent)
    clock.advance(seconds=60)
    assert (await refresh(http, spent))["code"] == "TOKEN_REUSED"  # REFRESH_REUSED
    third = await login(http, email, PASSWORD)
    body = await gql(http, SESSIONS, token=token)
    other = next(s["id"] for s in body["data"]["sessions"] if not s["current"])
    revoked = await gql(http, REVOKE_SESSION, {"i": {"id": other}}, token=token)
    assert revoked["data"]["revokeSession"]["revoked"] == 1  # SESSION_REVOKED
    _secret, recovery = await enrol(http, token, clock)  # TOTP_ENABLED
    step = await login(http, email, PASSWORD)
    used = await verify_otp(http, step["challengeToken"], recovery[0])  # RECOVERY_CODE_USED
    assert used["__typename"] == "AuthSession"
    disabled = await gql(
        http,
        "mutation($i: DisableTotpInput!) { disableTotp(input: $i) { __typename } }",
        {"i": {"password": PASSWORD, "code": recovery[1]}},
        token=token,
    )
    assert disabled["data"]["disableTotp"]["__typename"] == "User"  # TOTP_DISABLED
    changed = await mutate(
        http,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD, "newPassword": "a changed passphrase"}},
        token=token,
    )
    assert changed["__typename"] == "AuthSession"  # PASSWORD_CHANGED
    token = changed["accessToken"]
    logged_out = await gql(http, LOGOUT, {"i": {"refreshToken": third["refreshToken"]}})
    assert logged_out["data"]["logout"]["revoked"] == 0  # ended by the change already
    reset = await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    code = (await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset"))).code()
    done = await mutate(
        http,
        RESET_PASSWORD,
        {"i": {"challengeToken": reset["challengeToken"], "code": code, "newPassword": PASSWORD}},
    )
    assert done["__typename"] == "AuthSession"  # PASSWORD_RESET
    ended = await gql(http, LOGOUT, {"i": {"refreshToken": done["refreshToken"]}})
    assert ended["data"]["logout"]["revoked"] == 1  # LOGOUT
    final = await login(http, email, PASSWORD)

    seen = await kinds(http, final["accessToken"])
    expected = {
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
    }
    assert set(seen) == expected
    assert seen[-1] == "SIGNUP" and seen[0] == "LOGIN_SUCCEEDED"  # newest first
    # Every event is a JSON log line too, and nothing secret is in the table or the log.
    lines = [r.__dict__["security_event"] for r in caplog.records if r.name == "strawgate.security"]
    assert {line["event"] for line in lines} >= expected
    dump = await table_text(database_url)
    log_text = "\n".join(r.getMessage() for r in caplog.records) + json.dumps(lines)
    for secret in (PASSWORD, "a changed passphrase", code, recovery[0], token, spent):
        assert secret not in dump
        assert secret not in log_text


async def test_a_failed_login_keeps_the_email_only_when_it_is_one(
    client: httpx.AsyncClient, database_url: str
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    await login(client, email, "wrong password")
    await login(client, TYPED_PASSWORD, PASSWORD)  # the password typed into the email field
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT email FROM security_events WHERE kind = 'LOGIN_FAILED' ORDER BY id")
            )
        ).all()
    await engine.dispose()
    assert [row.email for row in rows] == [email, None]
    assert TYPED_PASSWORD not in await table_text(database_url)


async def test_users_read_only_their_own_events(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    mine = await signup(client, unique_email(), PASSWORD)
    theirs_email = unique_email()
    await signup(client, theirs_email, PASSWORD)
    await login(client, theirs_email, "wrong password")
    assert await kinds(client, mine["accessToken"]) == ["LOGIN_SUCCEEDED", "SIGNUP"]
    async with client_for(client._transport.app, ip="198.51.100.4") as http:  # type: ignore[attr-defined]
        body = await gql(http, EVENTS)
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def table_text(database_url: str) -> str:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        rows: list[Any] = list((await conn.execute(text("SELECT * FROM security_events"))).all())
    await engine.dispose()
    return "\n".join(str(value) for row in rows for value in row)
