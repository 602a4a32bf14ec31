"""Email verification: the new default. Signup answers a challenge and mails a code; the
account gets no session before its address is proven."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    ME,
    REQUEST_EMAIL_VERIFICATION,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    gql,
    login,
    mutate,
    refresh,
    signed_up,
    signup,
    verify_otp,
)
from tests.smtp import SmtpSink


async def mails_nothing_more(http: httpx.AsyncClient, smtp: SmtpSink, email: str) -> None:
    """Nothing else was mailed to `email`: a sign-in code asked for afterwards is the next
    mail to arrive there (the outbox sends in order)."""
    before = len(smtp.mails(email))
    await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=before + 1)
    assert "sign-in code" in mail.subject, mail.subject
    assert len(smtp.mails(email)) == before + 1


async def test_signup_answers_a_challenge_and_mails_the_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = unique_email()
    challenge = await signup(mail_client, email, PASSWORD)
    assert challenge["__typename"] == "OtpChallenge"
    assert (challenge["method"], challenge["purpose"], challenge["expiresIn"]) == (
        "EMAIL",
        "VERIFY_EMAIL",
        600,
    )
    mail = await smtp.wait_for(email)
    assert mail.envelope_to == [email]
    assert mail.code() in mail.html()
    session = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    assert session["user"]["emailVerified"] is True
    me = await gql(mail_client, ME, token=session["accessToken"])
    assert me["data"]["me"]["emailVerified"] is True


async def test_an_unverified_account_never_gets_a_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = unique_email()
    first = await signup(mail_client, email, PASSWORD)
    first_mail = await smtp.wait_for(email)
    # The right password answers a fresh challenge of the same kind and a new code.
    again = await login(mail_client, email, PASSWORD)
    assert again["__typename"] == "OtpChallenge"
    assert (again["method"], again["purpose"]) == ("EMAIL", "VERIFY_EMAIL")
    assert again["challengeToken"] != first["challengeToken"]
    second_mail = await smtp.wait_for(email, count=2)
    # A wrong password still answers INVALID_CREDENTIALS (and mails nothing).
    wrong = await login(mail_client, email, "not the password at all")
    assert wrong["code"] == "INVALID_CREDENTIALS"
    # Either code verifies the address (each with its own challenge).
    session = await verify_otp(mail_client, again["challengeToken"], second_mail.code())
    assert session["__typename"] == "AuthSession"
    assert first_mail.code() != second_mail.code() or first_mail is not second_mail
    # Once verified, the password signs in directly.
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_email_taken_reveals_verified_registrations_only(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    verified = unique_email()
    await signed_up(mail_client, smtp, verified)
    taken = await signup(mail_client, verified, "another long passphrase")
    assert (taken["code"], taken["field"]) == ("EMAIL_TAKEN", "email")

    pending = unique_email()
    first = await signup(mail_client, pending, PASSWORD)
    await smtp.wait_for(pending)
    # A second signup while the first one's code is live looks like any signup ...
    second = await signup(mail_client, pending, "someone else's passphrase")
    assert second["__typename"] == "OtpChallenge"
    assert {k: v for k, v in second.items() if k != "challengeToken"} == {
        k: v for k, v in first.items() if k != "challengeToken"
    }
    # ... but mails nothing, and no code completes it.
    await mails_nothing_more(mail_client, smtp, pending)
    answer = await verify_otp(mail_client, second["challengeToken"], "123456")
    assert answer["code"] == "INVALID_OTP"
    # The first signup is intact: its password and code still work.
    code = smtp.mails(pending)[0].code()
    session = await verify_otp(mail_client, first["challengeToken"], code)
    assert session["__typename"] == "AuthSession"


async def test_a_signup_whose_code_expired_is_replaced(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = unique_email()
    first = await signup(mail_client, email, PASSWORD)
    await smtp.wait_for(email)
    clock.advance(minutes=11)  # the code (10 minutes) expired, unused
    second = await signup(mail_client, email, "the owner's own passphrase")
    assert second["__typename"] == "OtpChallenge"
    mail = await smtp.wait_for(email, count=2)
    session = await verify_otp(mail_client, second["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    # The abandoned signup is gone: its password and challenge are worth nothing.
    assert (await login(mail_client, email, PASSWORD))["code"] == "INVALID_CREDENTIALS"
    stale = await verify_otp(mail_client, first["challengeToken"], mail.code())
    assert stale["code"] == "INVALID_TOKEN"
    ok = await login(mail_client, email, "the owner's own passphrase")
    assert ok["__typename"] == "AuthSession"


async def test_a_sign_in_code_verifies_the_address_but_not_the_signup_password(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """Pre-hijacking: a stranger signs up with the victim's address and a password of
    their own. The victim, who never saw that signup, signs in by code: the address is
    verified, and the stranger's password is worth nothing."""
    email = unique_email()
    await signup(mail_client, email, "the stranger's passphrase")
    await smtp.wait_for(email)  # lands in the victim's mailbox, unread
    challenge = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=2)
    session = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    assert session["user"]["emailVerified"] is True
    stranger = await login(mail_client, email, "the stranger's passphrase")
    assert stranger["code"] == "INVALID_CREDENTIALS"
    # The owner sets a password of their own with a reset.
    reset = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    code = (await smtp.wait_for(email, count=3)).code()
    done = await mutate(
        mail_client,
        RESET_PASSWORD,
        {"i": {"challengeToken": reset["challengeToken"], "code": code, "newPassword": PASSWORD}},
    )
    assert done["__typename"] == "AuthSession"
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_a_sign_in_code_ends_what_an_unproven_password_opened(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    """Without required verification a stranger's signup gets sessions at once; the
    owner's first sign-in by code ends them."""
    app = create_app(
        make_settings(require_email_verification=False, **smtp.settings()), clock=clock
    )
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        stranger = await signup(http, email, "the stranger's passphrase")
        assert stranger["__typename"] == "AuthSession"
        challenge = await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        mail = await smtp.wait_for(email)
        owner = await verify_otp(http, challenge["challengeToken"], mail.code())
        assert owner["__typename"] == "AuthSession"
        body = await gql(http, ME, token=stranger["accessToken"])
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await refresh(http, stranger["refreshToken"]))["code"] == "INVALID_TOKEN"
        assert (await gql(http, ME, token=owner["accessToken"]))["data"]["me"]["email"] == email
        # A verified account's password is trusted: the next code sign-in keeps it.


async def test_without_verification_signup_signs_in_and_verification_comes_later(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    settings = make_settings(require_email_verification=False, **smtp.settings())
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        session = await signup(http, email, PASSWORD)
        assert session["__typename"] == "AuthSession"
        assert session["user"]["emailVerified"] is False
        token = session["accessToken"]
        assert (await gql(http, ME, token=token))["data"]["me"]["emailVerified"] is False

        challenge = await mutate(http, REQUEST_EMAIL_VERIFICATION, token=token)
        assert (challenge["method"], challenge["purpose"]) == ("EMAIL", "VERIFY_EMAIL")
        mail = await smtp.wait_for(email)
        verified = await verify_otp(http, challenge["challengeToken"], mail.code())
        assert verified["__typename"] == "AuthSession"
        assert (await gql(http, ME, token=token))["data"]["me"]["emailVerified"] is True

        again = await mutate(http, REQUEST_EMAIL_VERIFICATION, token=token)
        assert again["code"] == "INVALID_INPUT"


async def test_request_email_verification_needs_a_signed_in_user(
    mail_client: httpx.AsyncClient,
) -> None:
    body = await gql(mail_client, REQUEST_EMAIL_VERIFICATION)
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert body["data"] is None


async def test_unverified_accounts_are_deleted_after_seven_days(
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    clock: MutableClock,
    database_url: str,
) -> None:
    abandoned, verified = unique_email(), unique_email()
    await signup(mail_client, abandoned, PASSWORD)
    await signed_up(mail_client, smtp, verified)
    housekeeper = mail_app.state.housekeeper
    # Its own pass as the app starts holds the one-process lock while it lasts: stopped, so
    # that the passes below are the test's (run_once answers None while another holds it).
    await housekeeper.stop()
    clock.advance(days=6, hours=23)
    await housekeeper.run_once()
    assert await emails_in_database(database_url) == {abandoned, verified}
    clock.advance(hours=2)
    pruned = await housekeeper.run_once()
    assert pruned.unverified_users == 1
    assert await emails_in_database(database_url) == {verified}


async def test_an_unverified_account_cannot_refresh_its_way_in(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = unique_email()
    challenge = await signup(mail_client, email, PASSWORD)
    assert "refreshToken" not in challenge
    # Nothing a client holds after signup is a refresh token.
    answer = await refresh(mail_client, challenge["challengeToken"])
    assert answer["code"] == "INVALID_TOKEN"


async def emails_in_database(database_url: str) -> set[str]:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT email FROM users"))).scalars().all()
    await engine.dispose()
    return set(rows)
