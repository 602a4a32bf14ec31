"""The account's lifecycle (the contract's lifecycle.graphql): changeEmail completed by
verifyOtp, exportAccount, deleteAccount; with real mail through aiosmtpd."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import func, select, text
from starlette.applications import Starlette

from db.models import Challenge, OutboxMail, SecurityEvent, User, UserSession
from db.session import Statements
from tests.conftest import LOCKS_WAITING_HERE, MutableClock
from tests.gql import (
    CHALLENGE_FIELDS,
    CHANGE_PASSWORD,
    ME,
    PASSWORD,
    REQUEST_PASSWORD_RESET,
    RESEND_OTP,
    RESET_PASSWORD,
    SESSIONS,
    gql,
    login,
    logout,
    mutate,
    refresh,
    signed_in,
    signed_up,
    signup,
    verify_otp,
)
from tests.smtp import SmtpSink

CHANGE_EMAIL = (
    f"mutation($i: ChangeEmailInput!) {{ changeEmail(input: $i) {{ {CHALLENGE_FIELDS} }} }}"
)
DELETE_ACCOUNT = """
mutation($i: DeleteAccountInput!) {
  deleteAccount(input: $i) {
    __typename
    ... on DeleteAccountResult { deleted }
    ... on AuthError { code message field retryAfter }
  }
}
"""
EXPORT = "{ exportAccount { generatedAt json } }"
EVENT_KINDS = "{ securityEvents(first: 100) { edges { node { kind } } } }"
SETUP = "mutation { setupTotp { ... on TotpSetup { secret } } }"
CONFIRM = (
    "mutation($i: ConfirmTotpInput!) { confirmTotp(input: $i) {"
    " ... on RecoveryCodes { codes } ... on AuthError { code } } }"
)


def new_address() -> str:
    """A fresh address, always with six digits in a row: mails must show it as it is."""
    return f"moved-{secrets.token_hex(4)}-123456@example.org"


async def change_email(
    client: httpx.AsyncClient, token: str, new_email: str, password: str = PASSWORD
) -> dict[str, Any]:
    return await mutate(
        client, CHANGE_EMAIL, {"i": {"newEmail": new_email, "password": password}}, token=token
    )


async def kinds(client: httpx.AsyncClient, token: str) -> list[str]:
    body = await gql(client, EVENT_KINDS, token=token)
    return [edge["node"]["kind"] for edge in body["data"]["securityEvents"]["edges"]]


async def user_count(statements: Statements, **where: Any) -> int:
    query = select(func.count()).select_from(User)
    for column, value in where.items():
        query = query.where(getattr(User, column) == value)
    async with statements.connection() as conn:
        (count,) = await conn.scalars(query, {})
    return int(count)


async def two_factor_on(
    client: httpx.AsyncClient, token: str, clock: MutableClock
) -> tuple[str, list[str]]:
    secret = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    code = pyotp.TOTP(secret).at(clock.now())
    codes = (await gql(client, CONFIRM, {"i": {"code": code}}, token=token))["data"]
    clock.advance(seconds=90)  # the confirming step is spent; the next ones are fresh
    return secret, codes["confirmTotp"]["codes"]


def owner_changes_the_password_before(
    client: httpx.AsyncClient, owner: dict[str, Any], step: Callable[[Any], Awaitable[bool]]
) -> Callable[[Any], Awaitable[bool]]:
    """`step` (a service's own step, run between its password check and its locked
    transaction), preceded by the owner's password change from another session: the
    race a thief with a stolen session loses."""

    async def meanwhile(argument: Any) -> bool:
        changed = await mutate(
            client,
            CHANGE_PASSWORD,
            {"i": {"currentPassword": PASSWORD, "newPassword": "the owner's new passphrase"}},
            token=owner["accessToken"],
        )
        assert changed["__typename"] == "AuthSession", changed
        return bool(await step(argument))

    return meanwhile


async def moved_account(
    client: httpx.AsyncClient, smtp: SmtpSink
) -> tuple[str, str, dict[str, Any]]:
    """A new account moved to another address: (old, new, the session verifyOtp answered)."""
    old, session = await signed_up(client, smtp)
    new = new_address()
    challenge = await change_email(client, session["accessToken"], new)
    moved = await verify_otp(client, challenge["challengeToken"], (await smtp.wait_for(new)).code())
    assert moved["__typename"] == "AuthSession", moved
    return old, new, moved


# -- change of address --------------------------------------------------------------------


async def test_a_change_of_address_proven_by_the_code_mailed_there(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    old, first = await signed_up(mail_client, smtp)
    second = await signed_in(mail_client, old)
    new = new_address()
    challenge = await change_email(mail_client, first["accessToken"], new)
    assert challenge["__typename"] == "OtpChallenge", challenge
    assert (challenge["method"], challenge["purpose"]) == ("EMAIL", "CHANGE_EMAIL")
    mail = await smtp.wait_for(new)
    assert mail.subject == "Confirm your new email address for Strawgate"
    # Until the code is used nothing has moved.
    me = (await gql(mail_client, ME, token=first["accessToken"]))["data"]["me"]
    assert me["email"] == old

    moved = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert moved["__typename"] == "AuthSession", moved
    assert moved["user"]["email"] == new and moved["user"]["emailVerified"] is True

    # The sessions stay, and see the new address. The asking one goes on with the tokens
    # verifyOtp answered (no new session): its old refresh token is forgotten, not reused.
    for session in (first, second, moved):
        me = (await gql(mail_client, ME, token=session["accessToken"]))["data"]["me"]
        assert (me["email"], me["emailVerified"]) == (new, True)
    assert (await refresh(mail_client, first["refreshToken"]))["code"] == "INVALID_TOKEN"
    assert (await refresh(mail_client, moved["refreshToken"]))["__typename"] == "AuthSession"
    assert (await refresh(mail_client, second["refreshToken"]))["__typename"] == "AuthSession"
    listed = (await gql(mail_client, SESSIONS, token=moved["accessToken"]))["data"]["sessions"]
    assert len(listed) == 2
    # The old address is told, with where the account went and how to get help.
    notice = await smtp.wait_for(old, where=lambda m: "changed" in m.subject)
    assert notice.subject == "Your Strawgate email address was changed"
    assert new in notice.text()
    assert "strawgate@example.com" in notice.text()  # MAIL_FROM, without SUPPORT_CONTACT
    assert "strawgate@example.com" in notice.html()
    # The account signs in at the new address only.
    assert (await login(mail_client, old, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    await signed_in(mail_client, new)
    assert "EMAIL_CHANGED" in await kinds(mail_client, moved["accessToken"])


async def test_a_wrong_password_changes_nothing_and_counts_like_a_failed_login(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    email, session = await signed_up(mail_client, smtp)
    new = new_address()
    for _ in range(5):  # the lockout's threshold
        wrong = await change_email(mail_client, session["accessToken"], new, "not the password")
        assert (wrong["__typename"], wrong["code"], wrong["field"]) == (
            "AuthError",
            "INVALID_CREDENTIALS",
            "password",
        )
    # The address is locked out now, as after five failed logins: for password
    # sign-ins, and for this (the right password included).
    assert (await login(mail_client, email, PASSWORD))["code"] == "RATE_LIMITED"
    locked = await change_email(mail_client, session["accessToken"], new, PASSWORD)
    assert locked["code"] == "RATE_LIMITED" and locked["retryAfter"] > 0
    assert smtp.mails(new) == []
    assert "LOGIN_FAILED" in await kinds(mail_client, session["accessToken"])
    async with statements.connection() as conn:
        pending = await conn.scalars(
            select(func.count()).select_from(Challenge).where(Challenge.new_email == new), {}
        )
    assert pending == [0]


async def test_the_new_address_must_be_valid_free_and_new(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, session = await signed_up(mail_client, smtp)
    taken, _other = await signed_up(mail_client, smtp)
    token = session["accessToken"]
    for new_email, code in (
        (taken.upper(), "EMAIL_TAKEN"),
        ("not an address", "INVALID_INPUT"),
        (email, "INVALID_INPUT"),
    ):
        refused = await change_email(mail_client, token, new_email)
        assert (refused["code"], refused["field"]) == (code, "newEmail"), new_email
    assert [m.subject for m in smtp.mails(taken)] == ["Confirm your email address for Strawgate"]


async def test_an_unproven_signup_on_the_new_address_yields_to_its_owner(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    _email, session = await signed_up(mail_client, smtp)
    new = new_address()
    squatter = await signup(mail_client, new, "a squatter's password")
    assert squatter["__typename"] == "OtpChallenge"
    challenge = await change_email(mail_client, session["accessToken"], new)
    assert challenge["__typename"] == "OtpChallenge", challenge
    code = (await smtp.wait_for(new, where=lambda m: "new email" in m.subject)).code()
    moved = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert moved["__typename"] == "AuthSession", moved
    assert await user_count(statements, email_normalized=new) == 1
    assert (await login(mail_client, new, "a squatter's password"))["code"] == (
        "INVALID_CREDENTIALS"
    )


async def test_the_code_goes_to_the_new_address_only_and_completes_nothing_else(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    old, session = await signed_up(mail_client, smtp)
    new = new_address()
    challenge = await change_email(mail_client, session["accessToken"], new)
    token = challenge["challengeToken"]
    first = await smtp.wait_for(new)
    # resetPassword does not take a change-of-address challenge (nor spends its code).
    reset = await mutate(
        mail_client,
        RESET_PASSWORD,
        {"i": {"challengeToken": token, "code": first.code(), "newPassword": "x" * 20}},
    )
    assert reset["code"] == "INVALID_TOKEN"
    # A new code goes to the new address too, and the old one stops working.
    clock.advance(minutes=1)
    resent = await mutate(mail_client, RESEND_OTP, {"i": {"challengeToken": token}})
    assert resent["purpose"] == "CHANGE_EMAIL"
    second = await smtp.wait_for(new, count=2)
    assert [m.subject for m in smtp.mails(old)].count(first.subject) == 0
    assert (await verify_otp(mail_client, token, first.code()))["code"] == "INVALID_OTP"
    assert (await verify_otp(mail_client, token, second.code()))["__typename"] == "AuthSession"


async def test_a_reset_code_sent_to_the_old_address_dies_with_the_change(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    old, session = await signed_up(mail_client, smtp)
    reset = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": old}})
    reset_code = (await smtp.wait_for(old, where=lambda m: "reset" in m.subject.lower())).code()
    new = new_address()
    challenge = await change_email(mail_client, session["accessToken"], new)
    await verify_otp(mail_client, challenge["challengeToken"], (await smtp.wait_for(new)).code())
    late = await mutate(
        mail_client,
        RESET_PASSWORD,
        {
            "i": {
                "challengeToken": reset["challengeToken"],
                "code": reset_code,
                "newPassword": "an entirely new passphrase",
            }
        },
    )
    assert late["code"] == "INVALID_TOKEN"


async def test_with_two_factor_on_a_session_that_proved_it_needs_no_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, first = await signed_up(mail_client, smtp)
    secret, _codes = await two_factor_on(mail_client, first["accessToken"], clock)
    step = await login(mail_client, email, PASSWORD)
    mfa_session = await verify_otp(
        mail_client, step["challengeToken"], pyotp.TOTP(secret).at(clock.now())
    )
    new = new_address()
    challenge = await change_email(mail_client, mfa_session["accessToken"], new)
    code = (await smtp.wait_for(new)).code()
    moved = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert moved["__typename"] == "AuthSession", moved
    assert moved["user"]["email"] == new


async def test_with_two_factor_on_a_session_from_before_it_needs_a_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    """A session that signed in with the password alone (before two-factor was on) and
    the password: not enough to move the address where a TOTP step guards sign-in."""
    _email, old_session = await signed_up(mail_client, smtp)
    secret, codes = await two_factor_on(mail_client, old_session["accessToken"], clock)
    token = old_session["accessToken"]
    new = new_address()
    for code in (None, "", "000000"):
        refused = await mutate(
            mail_client,
            CHANGE_EMAIL,
            {"i": {"newEmail": new, "password": PASSWORD, "code": code}},
            token=token,
        )
        assert (refused["code"], refused["field"]) == ("INVALID_OTP", "code"), code
    assert smtp.mails(new) == []
    for code in (pyotp.TOTP(secret).at(clock.now()), codes[0]):
        clock.advance(seconds=30)
        asked = await mutate(
            mail_client,
            CHANGE_EMAIL,
            {"i": {"newEmail": new, "password": PASSWORD, "code": code}},
            token=token,
        )
        assert asked["__typename"] == "OtpChallenge", asked


async def test_a_session_ended_since_the_request_cannot_complete_it(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """A stolen session and the password ask for a change; the owner signs out
    everywhere: the code mailed to the thief's address completes nothing."""
    email, owner = await signed_up(mail_client, smtp)
    stolen = await signed_in(mail_client, email)
    thief = new_address()
    challenge = await change_email(mail_client, stolen["accessToken"], thief)
    code = (await smtp.wait_for(thief)).code()
    assert await logout(mail_client, owner["refreshToken"], everywhere=True) == 2
    late = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert late["code"] == "INVALID_TOKEN", late
    fresh = await signed_in(mail_client, email)
    assert (await gql(mail_client, ME, token=fresh["accessToken"]))["data"]["me"]["email"] == email


async def test_a_password_change_racing_the_request_wins(
    mail_client: httpx.AsyncClient,
    mail_app: Starlette,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The owner changes the password while the thief's request is between its password
    check and its challenge: the request is refused, no code goes out."""
    email, owner = await signed_up(mail_client, smtp)
    stolen = await signed_in(mail_client, email)
    two_factor = mail_app.state.services.auth.two_factor
    meanwhile = owner_changes_the_password_before(mail_client, owner, two_factor.is_on)
    monkeypatch.setattr(two_factor, "is_on", meanwhile)
    thief = new_address()
    refused = await change_email(mail_client, stolen["accessToken"], thief)
    assert refused["__typename"] == "AuthError"
    assert refused["code"] in ("INVALID_TOKEN", "INVALID_CREDENTIALS"), refused
    assert smtp.mails(thief) == []


async def test_the_lifecycle_needs_a_signed_in_user(client: httpx.AsyncClient) -> None:
    for query, variables in (
        (CHANGE_EMAIL, {"i": {"newEmail": "a@example.com", "password": PASSWORD}}),
        (DELETE_ACCOUNT, {"i": {"password": PASSWORD}}),
        (EXPORT, None),
    ):
        body = await gql(client, query, variables)
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", body


# -- export ---------------------------------------------------------------------------------


async def test_the_export_holds_everything_about_the_user_and_no_secret(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, first = await signed_up(mail_client, smtp)
    secret, recovery_codes = await two_factor_on(mail_client, first["accessToken"], clock)
    step = await login(mail_client, email, PASSWORD)
    second = await verify_otp(
        mail_client, step["challengeToken"], pyotp.TOTP(secret).at(clock.now())
    )
    new = new_address()
    pending = await change_email(mail_client, second["accessToken"], new)
    emailed_code = (await smtp.wait_for(new)).code()

    body = await gql(mail_client, EXPORT, token=second["accessToken"])
    assert "errors" not in body, body
    answer = body["data"]
    exported = answer["exportAccount"]
    document = json.loads(exported["json"])
    assert document["format"] == "strawgate-account-export/1"
    assert document["generatedAt"] == exported["generatedAt"].replace("+00:00", "Z")
    assert document["profile"]["email"] == email
    assert document["profile"]["emailVerifiedAt"] is not None
    assert document["twoFactor"]["enabled"] is True
    assert document["twoFactor"]["recoveryCodes"] == {"total": 10, "used": 0}
    sessions = document["sessions"]
    assert len(sessions) == 2
    assert [s["current"] for s in sessions] == [True, False]
    assert sessions[0]["authenticationMethods"] == ["pwd", "otp", "mfa"]
    events = [event["kind"] for event in document["securityEvents"]]
    assert {"SIGNUP", "EMAIL_VERIFIED", "TOTP_ENABLED", "LOGIN_SUCCEEDED"} <= set(events)
    purposes = {c["purpose"] for c in document["challenges"]}
    assert purposes == {"VERIFY_EMAIL", "LOGIN", "CHANGE_EMAIL"}
    assert {m["kind"] for m in document["mail"]} >= {"verify_email", "totp_enabled"}

    text = exported["json"]
    for secret_value in (
        secret,
        *recovery_codes,
        first["accessToken"],
        first["refreshToken"],
        second["accessToken"],
        second["refreshToken"],
        pending["challengeToken"],
        emailed_code,
        PASSWORD,
    ):
        assert secret_value not in text
    assert "$argon2" not in text and "password_hash" not in text.lower()
    assert "passwordHash" not in text and "tokenHash" not in text and "codeHash" not in text


# -- deletion -------------------------------------------------------------------------------


async def delete_account(
    client: httpx.AsyncClient, token: str, password: str = PASSWORD, code: str | None = None
) -> dict[str, Any]:
    return await mutate(
        client, DELETE_ACCOUNT, {"i": {"password": password, "code": code}}, token=token
    )


async def test_deleting_an_account(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    email, first = await signed_up(mail_client, smtp)
    second = await signed_in(mail_client, email)
    user_id = uuid.UUID(first["user"]["id"])

    wrong = await delete_account(mail_client, first["accessToken"], "not the password")
    assert (wrong["code"], wrong["field"]) == ("INVALID_CREDENTIALS", "password")
    assert (await gql(mail_client, ME, token=first["accessToken"]))["data"]["me"]["email"] == email

    assert await delete_account(mail_client, first["accessToken"]) == {
        "__typename": "DeleteAccountResult",
        "deleted": True,
    }
    # Every session ended with it; the account is gone.
    for session in (first, second):
        body = await gql(mail_client, ME, token=session["accessToken"])
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await refresh(mail_client, session["refreshToken"]))["code"] == "INVALID_TOKEN"
    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    assert await user_count(statements, id=user_id) == 0
    async with statements.connection() as conn:
        sessions = await conn.scalars(
            select(func.count()).select_from(UserSession).where(UserSession.user_id == user_id),
            {},
        )
        trail = await conn.all(
            select(
                SecurityEvent.kind, SecurityEvent.ip, SecurityEvent.user_agent, SecurityEvent.email
            ).where(SecurityEvent.user_id == user_id),
            {},
        )
    assert sessions == [0]
    # The audit trail stays, anonymised: nothing in it names or locates the person.
    assert "SIGNUP" in {row["kind"] for row in trail}
    assert "ACCOUNT_DELETED" in {row["kind"] for row in trail}
    assert all(row["ip"] is None and row["user_agent"] is None for row in trail)
    assert all(row["email"] is None for row in trail)
    # A last notice went out, and the address is free for a new signup.
    goodbye = await smtp.wait_for(email, where=lambda m: "deleted" in m.subject)
    assert goodbye.subject == "Your Strawgate account was deleted"
    assert (await signup(mail_client, email, PASSWORD))["__typename"] == "OtpChallenge"


async def test_deleting_with_two_factor_on_needs_a_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock, statements: Statements
) -> None:
    _email, session = await signed_up(mail_client, smtp)
    token = session["accessToken"]
    secret, _codes = await two_factor_on(mail_client, token, clock)
    for code in (None, "", "000000"):
        refused = await delete_account(mail_client, token, code=code)
        assert refused["code"] == "INVALID_OTP", code
    assert (await gql(mail_client, ME, token=token))["data"]["me"]["otpEnabled"] is True
    deleted = await delete_account(mail_client, token, code=pyotp.TOTP(secret).at(clock.now()))
    assert deleted["__typename"] == "DeleteAccountResult", deleted
    assert await user_count(statements, id=uuid.UUID(session["user"]["id"])) == 0


async def test_a_recovery_code_also_deletes(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock, statements: Statements
) -> None:
    _email, session = await signed_up(mail_client, smtp)
    token = session["accessToken"]
    _secret, codes = await two_factor_on(mail_client, token, clock)
    deleted = await delete_account(mail_client, token, code=codes[0])
    assert deleted["__typename"] == "DeleteAccountResult", deleted
    assert await user_count(statements, id=uuid.UUID(session["user"]["id"])) == 0


async def test_deleting_after_a_change_of_address_leaves_nothing_under_the_old_one(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    old, new, moved = await moved_account(mail_client, smtp)
    await smtp.wait_for(old, where=lambda m: "changed" in m.subject)
    exported = (await gql(mail_client, EXPORT, token=moved["accessToken"]))["data"]
    document = json.loads(exported["exportAccount"]["json"])
    assert document["profile"]["previousEmails"] == [old]
    assert {(m["to"], m["kind"]) for m in document["mail"]} >= {
        (old, "verify_email"),
        (old, "email_changed"),
        (new, "change_email_code"),
    }
    assert (await delete_account(mail_client, moved["accessToken"]))["deleted"] is True
    async with statements.connection() as conn:
        held = await conn.all(select(OutboxMail.recipient, OutboxMail.template), {})
        details = await conn.all(select(SecurityEvent.kind, SecurityEvent.details), {})
    # Only the goodbye to the current address is left, until the outbox prunes it.
    assert [(row["recipient"], row["template"]) for row in held] == [(new, "account_deleted")]
    assert not any(old in (row["details"] or "") for row in details)


async def test_a_password_change_racing_a_deletion_wins(
    mail_client: httpx.AsyncClient,
    mail_app: Starlette,
    smtp: SmtpSink,
    statements: Statements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    email, owner = await signed_up(mail_client, smtp)
    stolen = await signed_in(mail_client, email)
    two_factor = mail_app.state.services.auth.two_factor
    meanwhile = owner_changes_the_password_before(mail_client, owner, two_factor.is_on)
    monkeypatch.setattr(two_factor, "is_on", meanwhile)
    refused = await delete_account(mail_client, stolen["accessToken"])
    assert refused["code"] in ("INVALID_TOKEN", "INVALID_CREDENTIALS"), refused
    assert await user_count(statements, id=uuid.UUID(owner["user"]["id"])) == 1


async def test_a_refresh_racing_the_completion_waits_for_it(
    mail_client: httpx.AsyncClient,
    mail_app: Starlette,
    smtp: SmtpSink,
    statements: Statements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The asking session refreshes while verifyOtp re-issues it: the completion waits
    for the rotation's lock, then replaces the tokens it made (no EMAIL_TAKEN)."""
    _email, session = await signed_up(mail_client, smtp)
    new = new_address()
    challenge = await change_email(mail_client, session["accessToken"], new)
    code = (await smtp.wait_for(new)).code()
    limiter = mail_app.state.services.auth.limiter
    hit = limiter.hit
    rotating, release = asyncio.Event(), asyncio.Event()

    async def held_rotation(name: str, key: str, **options: Any) -> None:
        if name == "refresh_session":  # inside refresh's transaction, its locks held
            rotating.set()
            await release.wait()
        await hit(name, key, **options)

    monkeypatch.setattr(limiter, "hit", held_rotation)
    rotation = asyncio.create_task(refresh(mail_client, session["refreshToken"]))
    await asyncio.wait_for(rotating.wait(), 5)
    completion = asyncio.create_task(verify_otp(mail_client, challenge["challengeToken"], code))
    try:
        async with asyncio.timeout(10):  # until PostgreSQL shows the completion waiting
            while True:
                async with statements.connection() as conn:
                    waiting = await conn.scalars(text(LOCKS_WAITING_HERE), {})
                if waiting[0]:
                    break
                await asyncio.sleep(0.01)
    finally:
        # Also when that wait fails: a rotation held for ever keeps its transaction open,
        # and the app's teardown would wait for its connection for ever (a hung suite).
        release.set()
    rotated, moved = await asyncio.gather(rotation, completion)
    assert rotated["__typename"] == "AuthSession", rotated
    assert moved["__typename"] == "AuthSession", moved
    assert moved["user"]["email"] == new
    assert (await refresh(mail_client, moved["refreshToken"]))["__typename"] == "AuthSession"


async def test_a_change_asked_before_two_factor_came_on_completes_nothing(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, owner = await signed_up(mail_client, smtp)
    stolen = await signed_in(mail_client, email)
    thief = new_address()
    asked = await change_email(mail_client, stolen["accessToken"], thief)
    await two_factor_on(mail_client, owner["accessToken"], clock)
    late = await verify_otp(
        mail_client, asked["challengeToken"], (await smtp.wait_for(thief)).code()
    )
    assert late["code"] == "INVALID_TOKEN", late
    me = (await gql(mail_client, ME, token=owner["accessToken"]))["data"]["me"]
    assert me["email"] == email


async def test_deletion_also_erases_what_an_old_or_abandoned_address_left(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    old, new, moved = await moved_account(mail_client, smtp)
    # Someone tries the old address after the move; and a second move is never completed.
    assert (await login(mail_client, old, "guessing at the old address"))["code"] == (
        "INVALID_CREDENTIALS"
    )
    abandoned = new_address()
    await change_email(mail_client, moved["accessToken"], abandoned)
    await smtp.wait_for(abandoned)
    exported = (await gql(mail_client, EXPORT, token=moved["accessToken"]))["data"]
    sent_to = {m["to"] for m in json.loads(exported["exportAccount"]["json"])["mail"]}
    assert sent_to == {old, new, abandoned}
    assert (await delete_account(mail_client, moved["accessToken"]))["deleted"] is True
    async with statements.connection() as conn:
        held = await conn.scalars(select(OutboxMail.recipient), {})
        trail = await conn.all(
            select(SecurityEvent.email, SecurityEvent.ip, SecurityEvent.details), {}
        )
    assert held == [new]  # the goodbye, until the outbox prunes it
    assert all(row["email"] is None and row["ip"] is None for row in trail)
    assert not any(old in (row["details"] or "") for row in trail)
