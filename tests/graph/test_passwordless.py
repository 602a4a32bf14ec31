"""Accounts without a password (stepup.graphql): signup without one proves the address by
the emailed code and signs in by emailed code; changePassword sets a first one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from jose import jwt
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHANGE_PASSWORD,
    REQUEST_LOGIN_CODE,
    SIGNUP,
    gql,
    login,
    mutate,
    signed_up,
    verify_otp,
)
from tests.graph.test_abuse import CountingHashes
from tests.smtp import SmtpSink

ME = "{ me { email emailVerified hasPassword } }"
WINDOW = 10 * 60


async def passwordless(
    client: httpx.AsyncClient, smtp: SmtpSink, email: str | None = None
) -> tuple[str, dict[str, Any]]:
    """A signup without a password, its address proven by the mailed code."""
    email = email or unique_email()
    challenge = await mutate(client, SIGNUP, {"i": {"email": email}})
    assert (challenge["__typename"], challenge["purpose"]) == ("OtpChallenge", "VERIFY_EMAIL")
    mail = await smtp.wait_for(email)
    session = await verify_otp(client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession", session
    return email, session


async def me(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    result: dict[str, Any] = (await gql(client, ME, token=token))["data"]["me"]
    return result


@pytest.fixture
async def unverified_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    """REQUIRE_EMAIL_VERIFICATION=false, with mail going to `smtp`."""
    app = create_app(make_settings(**smtp.settings()), clock=clock)
    async with app.router.lifespan_context(app):
        yield app


async def test_a_signup_without_a_password_signs_in_by_the_mailed_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, session = await passwordless(mail_client, smtp)
    assert session["user"]["email"] == email
    assert jwt.get_unverified_claims(session["accessToken"])["amr"] == ["otp"]
    assert await me(mail_client, session["accessToken"]) == {
        "email": email,
        "emailVerified": True,
        "hasPassword": False,
    }
    # Later sign-ins: by emailed code.
    challenge = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=2)
    again = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert again["__typename"] == "AuthSession", again


async def test_without_a_password_the_address_is_proven_even_where_verification_is_off(
    unverified_app: Starlette, smtp: SmtpSink
) -> None:
    """No credential at all would sign anyone in as anyone: the code is the credential."""
    async with client_for(unverified_app) as http:
        _email, session = await passwordless(http, smtp)
        assert (await me(http, session["accessToken"]))["hasPassword"] is False


async def test_a_password_login_to_it_is_a_wrong_password_in_the_same_time(
    mail_client: httpx.AsyncClient, mail_app: Starlette, smtp: SmtpSink
) -> None:
    email, _session = await passwordless(mail_client, smtp)
    other, _ = await signed_up(mail_client, smtp)
    hashes = CountingHashes(mail_app)
    for password in (PASSWORD, "", "anything at all"):
        answer = await login(mail_client, email, password or "x" * 8)
        wrong = await login(mail_client, other, "not the password, but as long")
        assert (answer["code"], answer["message"]) == (wrong["code"], wrong["message"])
        assert answer["code"] == "INVALID_CREDENTIALS"
    # Each attempt cost one password check, as a wrong password does.
    assert hashes.count == 6


async def test_a_first_password_is_set_with_a_recent_sign_in(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, session = await passwordless(mail_client, smtp)
    new = "a first password of my own"
    # A current password given: there is none, so it is wrong.
    wrong = await mutate(
        mail_client,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": "a guess", "newPassword": new}},
        token=session["accessToken"],
    )
    assert (wrong["code"], wrong["field"]) == ("INVALID_CREDENTIALS", "currentPassword")
    done = await mutate(
        mail_client, CHANGE_PASSWORD, {"i": {"newPassword": new}}, token=session["accessToken"]
    )
    assert done["__typename"] == "AuthSession", done
    assert done["user"]["id"] == session["user"]["id"]
    assert (await me(mail_client, done["accessToken"]))["hasPassword"] is True
    assert (await login(mail_client, email, new))["__typename"] == "AuthSession"
    await smtp.wait_for(email, where=lambda m: "password" in m.subject.lower())


async def test_no_first_password_from_an_old_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    """A thief holding an old session of a passwordless account cannot give it a password."""
    _email, session = await passwordless(mail_client, smtp)
    clock.advance(seconds=WINDOW + 1)
    refused = await mutate(
        mail_client,
        CHANGE_PASSWORD,
        {"i": {"newPassword": "the thief's own password"}},
        token=session["accessToken"],
    )
    assert refused["code"] == "REAUTHENTICATION_REQUIRED"
    assert (await me(mail_client, session["accessToken"]))["hasPassword"] is False


async def test_accounts_with_a_password_say_so(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    _email, session = await signed_up(mail_client, smtp)
    assert (await me(mail_client, session["accessToken"]))["hasPassword"] is True


async def test_a_distrusted_password_leaves_an_account_without_one(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """Someone signed up with the owner's address and a password of their own; the owner
    signs in by code: that password stops working, and the account says it has none."""
    email = unique_email()
    pending = await mutate(mail_client, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
    assert pending["__typename"] == "OtpChallenge"
    await smtp.wait_for(email)
    challenge = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=2)
    session = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert (await me(mail_client, session["accessToken"]))["hasPassword"] is False
    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
