"""Step-up (stepup.graphql): credential changes need a recent sign-in on the session, and
reauthenticate renews it (password, or an emailed code, then the TOTP step)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from jose import jwt
from sqlalchemy import select
from starlette.applications import Starlette

from db.models import SecurityEvent
from db.session import Statements
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHANGE_PASSWORD,
    LOGIN,
    ME,
    REFRESH,
    SESSION_FIELDS,
    VERIFY_OTP,
    gql,
    mutate,
    signed_in,
    signed_up,
    signed_up_and_proven,
    signup,
)
from tests.gql import login as login_answer
from tests.graph.test_abuse import device_login
from tests.graph.test_lifecycle import CHANGE_EMAIL, DELETE_ACCOUNT, new_address
from tests.graph.test_mfa import CONFIRM, DISABLE, REGENERATE, SETUP, code_at, enrolled
from tests.smtp import SmtpSink

REAUTHENTICATE = (
    f"mutation($i: ReauthenticateInput!) {{ reauthenticate(input: $i) {{ {SESSION_FIELDS} }} }}"
)
ME_HAS_PASSWORD = "{ me { email hasPassword } }"
WINDOW = 10 * 60  # REAUTH_WINDOW's default, in seconds
REFRESH_WITH_DEVICE = (
    f"mutation($i: RefreshInput!) {{ refresh(input: $i) {{ {SESSION_FIELDS}"
    " ... on AuthSession { deviceToken } } }"
)


def claims_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_claims(token)  # type: ignore[no-any-return]


async def reauthenticate(client: httpx.AsyncClient, token: str, **fields: Any) -> dict[str, Any]:
    return await mutate(client, REAUTHENTICATE, {"i": fields}, token=token)


async def setup_totp(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    result: dict[str, Any] = (await gql(client, SETUP, token=token))["data"]["setupTotp"]
    return result


async def kinds(statements: Statements, user_id: str) -> list[str]:
    async with statements.connection() as conn:
        return list(
            await conn.scalars(
                select(SecurityEvent.kind)
                .where(SecurityEvent.user_id == user_id)
                .order_by(SecurityEvent.id),
                {},
            )
        )


@pytest.fixture
async def short_window_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> AsyncIterator[Starlette]:
    # "5" is seconds, as in the other duration settings.
    app = create_app(make_settings(reauth_window="5"), clock=clock)
    async with app.router.lifespan_context(app):
        yield app


# -- auth_time -----------------------------------------------------------------------------


async def test_auth_time_is_the_sign_in_and_a_refresh_does_not_renew_it(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    session = await signed_up_and_proven(client, unique_email())
    signed_in_at = claims_of(session["accessToken"])["auth_time"]
    assert signed_in_at == int(clock.now().timestamp())
    clock.advance(minutes=20)
    renewed = await mutate(client, REFRESH, {"i": {"refreshToken": session["refreshToken"]}})
    claims = claims_of(renewed["accessToken"])
    assert claims["iat"] == signed_in_at + 20 * 60
    assert claims["auth_time"] == signed_in_at  # a refresh proves no credential
    # ... and the server judges by the session, not the token: still too old.
    assert (await setup_totp(client, renewed["accessToken"]))["code"] == (
        "REAUTHENTICATION_REQUIRED"
    )


# -- what needs a recent sign-in ----------------------------------------------------------


async def test_a_thief_holding_an_old_session_cannot_turn_two_factor_on(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """The owner signed in a while ago; a thief with the session's tokens (no password,
    no mailbox) can neither start nor confirm an enrolment, nor step up."""
    email = unique_email()
    session = await signed_up_and_proven(client, email)
    token = session["accessToken"]
    pending = await setup_totp(client, token)  # the owner's own enrolment, left pending
    assert pending["__typename"] == "TotpSetup"
    clock.advance(seconds=WINDOW + 1)
    stolen = (await mutate(client, REFRESH, {"i": {"refreshToken": session["refreshToken"]}}))[
        "accessToken"
    ]
    refused = await setup_totp(client, stolen)
    assert (refused["__typename"], refused["code"]) == ("AuthError", "REAUTHENTICATION_REQUIRED")
    code = code_at(pending["secret"], clock)
    confirmed = await gql(client, CONFIRM, {"i": {"code": code}}, token=stolen)
    assert confirmed["data"]["confirmTotp"]["code"] == "REAUTHENTICATION_REQUIRED"
    me = await gql(client, "{ me { otpEnabled } }", token=stolen)
    assert me["data"]["me"]["otpEnabled"] is False
    wrong = await reauthenticate(client, stolen, password="a guess at the password")
    assert (wrong["code"], wrong["field"]) == ("INVALID_CREDENTIALS", "password")


async def test_setup_and_confirm_work_within_the_window_and_again_after_reauthenticate(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    session = await signed_up_and_proven(client, unique_email())
    token = session["accessToken"]
    clock.advance(seconds=WINDOW)  # the window's last second still counts
    assert (await setup_totp(client, token))["__typename"] == "TotpSetup"
    clock.advance(seconds=1)
    assert (await setup_totp(client, token))["code"] == "REAUTHENTICATION_REQUIRED"
    again = await reauthenticate(client, token, password=PASSWORD)
    assert again["__typename"] == "AuthSession", again
    fresh = again["accessToken"]
    setup = await setup_totp(client, fresh)
    confirmed = await gql(
        client, CONFIRM, {"i": {"code": code_at(setup["secret"], clock)}}, token=fresh
    )
    assert confirmed["data"]["confirmTotp"]["__typename"] == "RecoveryCodes"


async def test_reauth_window_takes_the_duration_forms(
    short_window_app: Starlette, clock: MutableClock
) -> None:
    async with client_for(short_window_app) as http:
        token = (await signed_up_and_proven(http, unique_email()))["accessToken"]
        clock.advance(seconds=5)
        assert (await setup_totp(http, token))["__typename"] == "TotpSetup"
        clock.advance(seconds=1)
        assert (await setup_totp(http, token))["code"] == "REAUTHENTICATION_REQUIRED"


def test_reauth_window_is_bounded(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(reauth_window="15m").reauth_window.total_seconds() == 900
    assert make_settings(reauth_window="90").reauth_window.total_seconds() == 90
    for bad in ("0", "2d", "soon"):
        with pytest.raises(ValueError, match=r"(?i)reauth_window|duration"):
            make_settings(reauth_window=bad)


async def test_regenerating_recovery_codes_needs_a_recent_sign_in(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _email, token, secret, _codes = await enrolled(client, clock)
    clock.advance(seconds=WINDOW)
    answer = await gql(client, REGENERATE, {"i": {"code": code_at(secret, clock)}}, token=token)
    assert answer["data"]["regenerateRecoveryCodes"]["code"] == "REAUTHENTICATION_REQUIRED"


@pytest.mark.parametrize("operation", ["changePassword", "changeEmail", "deleteAccount"])
async def test_the_current_password_may_be_omitted_only_within_the_window(
    client: httpx.AsyncClient, clock: MutableClock, operation: str
) -> None:
    """Within the window the operation goes through without the password; beyond it, it
    answers REAUTHENTICATION_REQUIRED without one and goes through with the right one."""
    documents = {
        "changePassword": (
            CHANGE_PASSWORD,
            {"newPassword": "a whole new passphrase"},
            "currentPassword",
        ),
        "changeEmail": (CHANGE_EMAIL, {"newEmail": ""}, "password"),
        "deleteAccount": (DELETE_ACCOUNT, {}, "password"),
    }
    document, fields, password_field = documents[operation]

    def inputs() -> dict[str, Any]:
        return {**fields, "newEmail": new_address()} if operation == "changeEmail" else fields

    for recent in (True, False):
        token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
        if not recent:
            clock.advance(seconds=WINDOW + 1)
            refused = await mutate(client, document, {"i": inputs()}, token=token)
            assert refused["code"] == "REAUTHENTICATION_REQUIRED", refused
            with_password = {**inputs(), password_field: PASSWORD}
            done = await mutate(client, document, {"i": with_password}, token=token)
        else:
            done = await mutate(client, document, {"i": inputs()}, token=token)
        assert done["__typename"] in ("AuthSession", "OtpChallenge", "DeleteAccountResult"), done


async def test_disabling_two_factor_without_the_password_needs_a_recent_sign_in(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _email, token, _secret, codes = await enrolled(client, clock)
    clock.advance(seconds=WINDOW)
    refused = await gql(client, DISABLE, {"i": {"code": codes[0]}}, token=token)
    assert refused["data"]["disableTotp"]["code"] == "REAUTHENTICATION_REQUIRED"
    done = await gql(client, DISABLE, {"i": {"code": codes[0], "password": PASSWORD}}, token=token)
    assert done["data"]["disableTotp"]["otpEnabled"] is False


async def test_a_given_password_is_always_checked(
    client: httpx.AsyncClient,
) -> None:
    """Within the window a wrong current password is still wrong (and counts)."""
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    wrong = await mutate(
        client,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": "not it", "newPassword": "a whole new passphrase"}},
        token=token,
    )
    assert (wrong["code"], wrong["field"]) == ("INVALID_CREDENTIALS", "currentPassword")


# -- two-factor on a proven address only ---------------------------------------------------


async def test_two_factor_is_refused_on_an_unproven_address(client: httpx.AsyncClient) -> None:
    """REQUIRE_EMAIL_VERIFICATION=false: whoever signed up with an address they do not
    own must not turn two-factor on and keep its owner out of every way in by code."""
    token = (await signup(client, unique_email(), PASSWORD))["accessToken"]
    refused = await setup_totp(client, token)
    assert (refused["code"], refused["message"]) == (
        "INVALID_INPUT",
        "Verify your email address before turning on two-factor sign-in.",
    )
    confirm = await gql(client, CONFIRM, {"i": {"code": "123456"}}, token=token)
    assert confirm["data"]["confirmTotp"]["code"] == "INVALID_INPUT"


# -- reauthenticate --------------------------------------------------------------------------


async def test_reauthenticate_with_the_password_renews_the_same_session(
    client: httpx.AsyncClient, clock: MutableClock, statements: Statements
) -> None:
    session = await signed_up_and_proven(client, unique_email())
    before = claims_of(session["accessToken"])
    clock.advance(seconds=WINDOW + 60)
    again = await reauthenticate(client, session["accessToken"], password=PASSWORD)
    assert again["__typename"] == "AuthSession", again
    after = claims_of(again["accessToken"])
    assert after["sid"] == before["sid"]  # the same session ...
    assert after["auth_time"] == before["auth_time"] + WINDOW + 60  # ... signed in just now
    assert again["refreshToken"] != session["refreshToken"]
    # The old refresh token stops working without ending the session.
    old = await mutate(client, REFRESH, {"i": {"refreshToken": session["refreshToken"]}})
    assert old["code"] == "INVALID_TOKEN"
    new = await mutate(client, REFRESH, {"i": {"refreshToken": again["refreshToken"]}})
    assert claims_of(new["accessToken"])["sid"] == before["sid"]
    assert "REAUTHENTICATED" in await kinds(statements, before["sub"])
    sessions = await gql(client, "{ sessions { id current } }", token=new["accessToken"])
    assert sessions["data"]["sessions"] == [{"id": before["sid"], "current": True}]


async def test_reauthenticate_wrong_passwords_count_as_a_logins_do(
    client: httpx.AsyncClient, statements: Statements
) -> None:
    email = unique_email()
    session = await signed_up_and_proven(client, email)
    for _ in range(5):
        wrong = await reauthenticate(client, session["accessToken"], password="not it")
        assert wrong["code"] == "INVALID_CREDENTIALS"
    # The address is locked out, for the step-up and the login alike.
    locked = await reauthenticate(client, session["accessToken"], password=PASSWORD)
    assert locked["code"] == "RATE_LIMITED" and locked["retryAfter"] > 1
    login = (await gql(client, LOGIN, {"i": {"email": email, "password": PASSWORD}}))["data"]
    assert login["login"]["code"] == "RATE_LIMITED"
    failed = [k for k in await kinds(statements, session["user"]["id"]) if k == "LOGIN_FAILED"]
    assert len(failed) == 5


async def test_reauthenticate_with_two_factor_on_needs_the_totp_step(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _email, token, secret, codes = await enrolled(client, clock)
    sid = claims_of(token)["sid"]
    clock.advance(seconds=WINDOW + 60)
    step = await reauthenticate(client, token, password=PASSWORD)
    assert (step["__typename"], step["method"], step["purpose"]) == (
        "OtpChallenge",
        "TOTP",
        "REAUTHENTICATE",
    )
    # The password alone renewed nothing.
    assert (await setup_totp(client, token))["code"] == "REAUTHENTICATION_REQUIRED"
    wrong = await gql(
        client, VERIFY_OTP, {"i": {"challengeToken": step["challengeToken"], "code": "000000"}}
    )
    assert wrong["data"]["verifyOtp"]["code"] == "INVALID_OTP"
    done = await gql(
        client,
        VERIFY_OTP,
        {"i": {"challengeToken": step["challengeToken"], "code": code_at(secret, clock)}},
    )
    renewed = done["data"]["verifyOtp"]
    assert renewed["__typename"] == "AuthSession", renewed
    claims = claims_of(renewed["accessToken"])
    assert claims["sid"] == sid and claims["auth_time"] == int(clock.now().timestamp())
    assert {"pwd", "otp", "mfa"} <= set(claims["amr"])
    # Recovery codes count too.
    clock.advance(seconds=WINDOW + 60)
    step = await reauthenticate(client, renewed["accessToken"], password=PASSWORD)
    by_recovery = await gql(
        client, VERIFY_OTP, {"i": {"challengeToken": step["challengeToken"], "code": codes[0]}}
    )
    assert claims_of(by_recovery["data"]["verifyOtp"]["accessToken"])["sid"] == sid


async def test_reauthenticate_by_emailed_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, session = await signed_up(mail_client, smtp)
    sid = claims_of(session["accessToken"])["sid"]
    clock.advance(seconds=WINDOW + 60)
    challenge = await reauthenticate(mail_client, session["accessToken"])
    assert (challenge["method"], challenge["purpose"]) == ("EMAIL", "REAUTHENTICATE")
    mail = await smtp.wait_for(email, where=lambda m: "confirmation code" in m.subject)
    done = await mutate(
        mail_client,
        VERIFY_OTP,
        {"i": {"challengeToken": challenge["challengeToken"], "code": mail.code()}},
    )
    assert done["__typename"] == "AuthSession", done
    claims = claims_of(done["accessToken"])
    assert claims["sid"] == sid and "otp" in claims["amr"]
    assert (await setup_totp(mail_client, done["accessToken"]))["__typename"] == "TotpSetup"


async def test_reauthenticate_without_a_password_or_a_mail_is_refused(
    client: httpx.AsyncClient,
) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    refused = await reauthenticate(client, token, emailCode=False)
    assert (refused["code"], refused["field"]) == ("INVALID_INPUT", "password")


async def test_a_step_up_code_with_two_factor_on_still_needs_the_totp_step(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    """A mailbox alone never steps up an account with two-factor on."""
    email, session = await signed_up(mail_client, smtp)
    token = session["accessToken"]
    setup = await setup_totp(mail_client, token)
    code = code_at(setup["secret"], clock)
    confirmed = await gql(mail_client, CONFIRM, {"i": {"code": code}}, token=token)
    assert confirmed["data"]["confirmTotp"]["__typename"] == "RecoveryCodes"
    clock.advance(seconds=WINDOW + 60)
    challenge = await reauthenticate(mail_client, token)
    mail = await smtp.wait_for(email, where=lambda m: "confirmation code" in m.subject)
    step = await mutate(
        mail_client,
        VERIFY_OTP,
        {"i": {"challengeToken": challenge["challengeToken"], "code": mail.code()}},
    )
    assert (step["__typename"], step["method"], step["purpose"]) == (
        "OtpChallenge",
        "TOTP",
        "REAUTHENTICATE",
    )
    # The mailed code alone renewed nothing.
    assert (await setup_totp(mail_client, token))["code"] == "REAUTHENTICATION_REQUIRED"
    done = await mutate(
        mail_client,
        VERIFY_OTP,
        {
            "i": {
                "challengeToken": step["challengeToken"],
                "code": code_at(setup["secret"], clock, 1),
            }
        },
    )
    assert done["__typename"] == "AuthSession", done


async def test_a_step_up_challenge_dies_with_its_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, session = await signed_up(mail_client, smtp)
    challenge = await reauthenticate(mail_client, session["accessToken"])
    mail = await smtp.wait_for(email, where=lambda m: "confirmation code" in m.subject)
    logout = "mutation($i: LogoutInput!) { logout(input: $i) { revoked } }"
    await gql(mail_client, logout, {"i": {"refreshToken": session["refreshToken"]}})
    late = await mutate(
        mail_client,
        VERIFY_OTP,
        {"i": {"challengeToken": challenge["challengeToken"], "code": mail.code()}},
    )
    assert late["code"] == "INVALID_TOKEN"
    # No session came of it: the code opened nothing.
    assert (await gql(mail_client, ME, token=session["accessToken"]))["errors"]


async def test_reauthenticate_renews_only_its_own_session(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    first = await signed_up_and_proven(client, email)
    second = await signed_in(client, email)
    clock.advance(seconds=WINDOW + 60)
    await reauthenticate(client, first["accessToken"], password=PASSWORD)
    assert (await setup_totp(client, second["accessToken"]))["code"] == (
        "REAUTHENTICATION_REQUIRED"
    )


async def test_reauthenticate_needs_a_signed_in_user(client: httpx.AsyncClient) -> None:
    body = await gql(client, REAUTHENTICATE, {"i": {"password": PASSWORD}})
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_step_up_renews_only_the_tokens_it_answers(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """A thief copied an access token of the session; the owner steps up on that session
    later: the thief's copy stays as old as it was (it carries its own auth_time)."""
    email = unique_email()
    session = await signed_up_and_proven(client, email)
    stolen = session["accessToken"]
    clock.advance(seconds=WINDOW + 60)
    owner = await reauthenticate(client, stolen, password=PASSWORD)
    assert owner["__typename"] == "AuthSession"
    assert (await setup_totp(client, stolen))["code"] == "REAUTHENTICATION_REQUIRED"
    taken = await mutate(
        client, CHANGE_PASSWORD, {"i": {"newPassword": "the thief's passphrase"}}, token=stolen
    )
    assert taken["code"] == "REAUTHENTICATION_REQUIRED"
    moved = await mutate(client, CHANGE_EMAIL, {"i": {"newEmail": new_address()}}, token=stolen)
    assert moved["code"] == "REAUTHENTICATION_REQUIRED"
    # The owner's own answer is recent.
    assert (await setup_totp(client, owner["accessToken"]))["__typename"] == "TotpSetup"


async def test_a_token_without_auth_time_is_not_recent(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Access tokens from before auth_time existed pass as signed in, never as recent."""
    session = await signed_up_and_proven(client, unique_email())
    claims = claims_of(session["accessToken"])
    del claims["auth_time"]
    old = jwt.encode(claims, settings.secret(), algorithm="HS256", headers={"typ": "at+jwt"})
    assert (await gql(client, ME, token=old))["data"]["me"] is not None
    assert (await setup_totp(client, old))["code"] == "REAUTHENTICATION_REQUIRED"


async def test_a_sessions_own_device_token_does_not_step_it_up_past_a_lockout(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """A thief with a session's refresh token gets device tokens issued with that
    session: they prove nothing beyond it, so a step-up of it is held to the address's
    lockout (a device token's own budget would give the thief 20 guesses a minute). The
    owner's way out: a fresh sign-in with the device token (recent by being fresh)."""
    email = unique_email()
    await signed_up_and_proven(client, email)
    session = await device_login(client, email, PASSWORD)
    clock.advance(seconds=WINDOW + 60)
    for _ in range(5):  # a stranger locks the address
        await login_answer(client, email, "a stranger's guess")
    renewed = await mutate(
        client, REFRESH_WITH_DEVICE, {"i": {"refreshToken": session["refreshToken"]}}
    )
    token = renewed["accessToken"]
    assert (await reauthenticate(client, token, password=PASSWORD))["code"] == "RATE_LIMITED"
    fresh = await device_login(client, email, PASSWORD, renewed["deviceToken"])
    assert fresh["__typename"] == "AuthSession", fresh
    assert (await setup_totp(client, fresh["accessToken"]))["__typename"] == "TotpSetup"
