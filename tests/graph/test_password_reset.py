"""Password reset by an emailed code; with two-factor on, a TOTP step before anything
changes."""

from __future__ import annotations

from typing import Any

import httpx
import pyotp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import (
    ME,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    gql,
    login,
    mutate,
    refresh,
    signup,
    verify_otp,
)
from tests.graph.test_emailed_codes import enrol_totp, reset_password, verified_user, wrong
from tests.smtp import SmtpSink

NEW_PASSWORD = "a brand new passphrase"


async def request_reset(http: httpx.AsyncClient, smtp: SmtpSink, email: str) -> tuple[str, str]:
    """The reset challenge's token and the code from the mail."""
    challenge = await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    assert (challenge["method"], challenge["purpose"], challenge["expiresIn"]) == (
        "EMAIL",
        "RESET_PASSWORD",
        600,
    )
    mail = await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset your"))
    return challenge["challengeToken"], mail.code()


async def test_reset_sets_the_password_and_ends_every_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    other = await login(mail_client, email, PASSWORD)
    token, code = await request_reset(mail_client, smtp, email)
    session = await reset_password(mail_client, token, code, NEW_PASSWORD)
    assert session["__typename"] == "AuthSession"
    # Every earlier session ended at once; the new one works.
    body = await gql(mail_client, ME, token=other["accessToken"])
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await refresh(mail_client, other["refreshToken"]))["code"] == "INVALID_TOKEN"
    me = await gql(mail_client, ME, token=session["accessToken"])
    assert me["data"]["me"]["email"] == email
    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    assert (await login(mail_client, email, NEW_PASSWORD))["__typename"] == "AuthSession"
    notice = await smtp.wait_for(email, where=lambda m: "was reset" in m.subject)
    assert "reset" in notice.text().lower()
    # The code was single-use.
    again = await reset_password(mail_client, token, code, "yet another passphrase")
    assert again["code"] == "INVALID_TOKEN"


async def test_reset_verifies_an_unverified_address(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = unique_email()
    await signup(mail_client, email, PASSWORD)
    await smtp.wait_for(email)
    token, code = await request_reset(mail_client, smtp, email)
    session = await reset_password(mail_client, token, code, NEW_PASSWORD)
    assert session["user"]["emailVerified"] is True
    assert (await login(mail_client, email, NEW_PASSWORD))["__typename"] == "AuthSession"


async def test_a_weak_new_password_costs_no_attempt(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    token, code = await request_reset(mail_client, smtp, email)
    for weak in ("short", "password123", "x" * 300):
        for _ in range(3):
            answer = await reset_password(mail_client, token, code, weak)
            assert (answer["code"], answer["field"]) == ("WEAK_PASSWORD", "newPassword")
    assert (await reset_password(mail_client, token, code, NEW_PASSWORD))[
        "__typename"
    ] == "AuthSession"


async def test_wrong_reset_codes(mail_client: httpx.AsyncClient, smtp: SmtpSink) -> None:
    email = await verified_user(mail_client, smtp)
    token, code = await request_reset(mail_client, smtp, email)
    for _ in range(5):
        answer = await reset_password(mail_client, token, wrong(code), NEW_PASSWORD)
        assert (answer["code"], answer["field"]) == ("INVALID_OTP", "code")
    assert (await reset_password(mail_client, token, code, NEW_PASSWORD))["code"] == "INVALID_TOKEN"
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_a_reset_voids_every_pending_step(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    sign_in = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    sign_in_code = (await smtp.wait_for(email, count=2)).code()
    first_token, first_code = await request_reset(mail_client, smtp, email)
    second = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    await smtp.wait_for(email, count=4)
    assert (await reset_password(mail_client, first_token, first_code, NEW_PASSWORD))[
        "__typename"
    ] == "AuthSession"
    stale = await verify_otp(mail_client, sign_in["challengeToken"], sign_in_code)
    assert stale["code"] == "INVALID_TOKEN"
    second_code = smtp.mails(email)[3].code()
    stale = await reset_password(mail_client, second["challengeToken"], second_code, "x" * 20)
    assert stale["code"] == "INVALID_TOKEN"


async def test_with_two_factor_the_mailbox_alone_changes_nothing(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    session = await login(mail_client, email, PASSWORD)
    secret = await enrol_totp(mail_client, session["accessToken"], clock)
    token, code = await request_reset(mail_client, smtp, email)
    step = await reset_password(mail_client, token, code, NEW_PASSWORD)
    assert step["__typename"] == "OtpChallenge"
    assert (step["method"], step["purpose"], step["expiresIn"]) == ("TOTP", "RESET_PASSWORD", 300)
    # Nothing changed yet: the old password, the old session.
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "OtpChallenge"
    me = await gql(mail_client, ME, token=session["accessToken"])
    assert me["data"]["me"]["email"] == email
    # resetPassword does not complete the TOTP step; a wrong TOTP code changes nothing.
    refused = await reset_password(mail_client, step["challengeToken"], code, NEW_PASSWORD)
    assert refused["code"] == "INVALID_TOKEN"
    clock.advance(seconds=30)
    current = pyotp.TOTP(secret).at(clock.now())
    assert (await verify_otp(mail_client, step["challengeToken"], wrong(current)))[
        "code"
    ] == "INVALID_OTP"
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "OtpChallenge"

    done = await verify_otp(mail_client, step["challengeToken"], current)
    assert done["__typename"] == "AuthSession"
    body = await gql(mail_client, ME, token=session["accessToken"])
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    assert (await login(mail_client, email, NEW_PASSWORD))["__typename"] == "OtpChallenge"
    await smtp.wait_for(email, where=lambda m: "was reset" in m.subject)


async def test_no_reset_mail_for_a_disabled_account(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    email = await verified_user(mail_client, smtp)
    await set_active(database_url, email, active=False)
    answer = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    assert answer["__typename"] == "OtpChallenge"
    await set_active(database_url, email, active=True)
    await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=2)
    assert "sign-in code" in mail.subject  # the reset request mailed nothing


async def set_active(database_url: str, email: str, *, active: bool) -> Any:
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE users SET is_active = :a WHERE email = :e"), {"a": active, "e": email}
        )
    await engine.dispose()
