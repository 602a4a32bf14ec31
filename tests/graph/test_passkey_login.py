"""Signing in with a passkey (startPasskeyLogin, finishPasskeyLogin), a passkey as the
second step of a password login, and as a step-up (OtpChallenge.passkeyOptionsJson),
against the software authenticator (tests/webauthn_authenticator.py), real PostgreSQL and
a real SMTP server, on the injected clock."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt
from sqlalchemy import delete, func, insert, select, text, update
from starlette.applications import Starlette

from db.models import User, UserRole, UserSession
from db.services.signin import passkey as passkey_signin
from db.session import Statements
from db.settings import Settings
from graph.app import create_app
from tests.conftest import (
    LOCKS_WAITING_HERE,
    PASSWORD,
    UNLIMITED,
    MutableClock,
    client_for,
    unique_email,
)
from tests.gql import VERIFY_OTP, gql, mutate, signed_up_and_proven
from tests.graph.test_mfa import code_at, enrolled
from tests.graph.test_passkeys import finish as finish_registration
from tests.graph.test_passkeys import kinds, my_passkeys, register, rows
from tests.graph.test_passkeys import start as start_registration
from tests.servers import running_many
from tests.smtp import SmtpSink
from tests.test_servers import ok, production_env
from tests.test_servers import signed_up as signed_up_at
from tests.webauthn_authenticator import SoftAuthenticator, b64url, from_b64url

RP_ID = "example.com"
ORIGIN = "https://example.com"
WINDOW = 10 * 60  # REAUTH_WINDOW's default, in seconds

ERROR = "... on AuthError { code message field retryAfter }"
START = f"""mutation($i: StartPasskeyLoginInput!) {{ startPasskeyLogin(input: $i) {{
    __typename ... on PasskeyCeremony {{ challengeToken optionsJson expiresIn }} {ERROR} }} }}"""
RESULT = f"""__typename
    ... on AuthSession {{ accessToken refreshToken user {{ id email }} }}
    ... on OtpChallenge {{ challengeToken method purpose passkeyOptionsJson }}
    {ERROR}"""
FINISH = f"""mutation($i: FinishPasskeyLoginInput!) {{
    finishPasskeyLogin(input: $i) {{ {RESULT} }} }}"""
LOGIN = f"mutation($i: LoginInput!) {{ login(input: $i) {{ {RESULT} }} }}"
REAUTHENTICATE = (
    f"mutation($i: ReauthenticateInput!) {{ reauthenticate(input: $i) {{ {RESULT} }} }}"
)
FINISH_REGISTRATION = f"""mutation($i: FinishPasskeyRegistrationInput!) {{
  finishPasskeyRegistration(input: $i) {{ __typename ... on Passkey {{ id }} {ERROR} }} }}"""
START_REGISTRATION = f"""mutation($i: StartPasskeyRegistrationInput!) {{
  startPasskeyRegistration(input: $i) {{ __typename
    ... on PasskeyCeremony {{ challengeToken optionsJson }} {ERROR} }} }}"""
EMAIL_LOGIN = f"""mutation($i: EmailInput!) {{ requestLoginCode(input: $i) {{
    __typename ... on OtpChallenge {{ challengeToken passkeyOptionsJson }} {ERROR} }} }}"""
VERIFY_OTP_WITH_OPTIONS = f"mutation($i: VerifyOtpInput!) {{ verifyOtp(input: $i) {{ {RESULT} }} }}"


@pytest.fixture
async def passkey_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    settings = make_settings(webauthn_rp_id=RP_ID, webauthn_origins=ORIGIN, **smtp.settings())
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(passkey_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(passkey_app) as http:
        yield http


def claims_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_claims(token)  # type: ignore[no-any-return]


async def with_passkey(
    client: httpx.AsyncClient, authenticator: SoftAuthenticator | None = None
) -> tuple[str, str, SoftAuthenticator]:
    """A new account holding one passkey: (email, access token, its authenticator)."""
    authenticator = authenticator or SoftAuthenticator()
    email = unique_email()
    token = str((await signed_up_and_proven(client, email))["accessToken"])
    await register(client, token, authenticator)
    return email, token, authenticator


async def start(client: httpx.AsyncClient, email: str | None = None) -> dict[str, Any]:
    fields = {"email": email} if email is not None else {}
    ceremony = await mutate(client, START, {"i": fields})
    assert ceremony["__typename"] == "PasskeyCeremony", ceremony
    return ceremony


async def finish(
    client: httpx.AsyncClient,
    challenge_token: str,
    credential: str,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    variables = {"i": {"challengeToken": challenge_token, "credentialJson": credential}}
    return await mutate(client, FINISH, variables, token=token)


async def sign_in(
    client: httpx.AsyncClient, authenticator: SoftAuthenticator, email: str | None = None
) -> dict[str, Any]:
    ceremony = await start(client, email)
    return await finish(
        client, ceremony["challengeToken"], authenticator.assertion(ceremony["optionsJson"])
    )


def refused(answer: dict[str, Any]) -> None:
    assert answer["__typename"] == "AuthError", answer
    assert answer["code"] == "INVALID_CREDENTIALS", answer


def allowed(options_json: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(options_json)["allowCredentials"]
    return found


# -- signing in -----------------------------------------------------------------------------


async def test_a_discoverable_passkey_signs_in_without_an_address_as_synced(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, authenticator = await with_passkey(client)
    ceremony = await start(client)
    options = json.loads(ceremony["optionsJson"])
    assert ceremony["expiresIn"] == 300
    assert options["allowCredentials"] == []
    assert (options["userVerification"], options["rpId"]) == ("required", RP_ID)
    clock.advance(seconds=5)
    session = await finish(
        client, ceremony["challengeToken"], authenticator.assertion(ceremony["optionsJson"])
    )
    assert session["__typename"] == "AuthSession", session
    assert session["user"]["email"] == email
    claims = claims_of(session["accessToken"])
    assert claims["amr"] == ["swk", "user", "mfa"]
    assert claims["sid"] != claims_of(token)["sid"]
    assert claims["auth_time"] == int(clock.now().timestamp())
    (passkey,) = await my_passkeys(client, session["accessToken"])
    assert passkey["lastUsedAt"] is not None


async def test_a_role_taken_away_while_a_sign_in_waits_is_not_in_its_token(
    client: httpx.AsyncClient, statements: Statements
) -> None:
    """An operator's change holds the account's lock (as `strawgate users roles remove`
    does) while a passkey sign-in waits for it: the sign-in's token has the roles the
    change left. (A statement that waits for a row lock sees the other tables as they were
    when it started: the account's row, with its roles, is read after the lock, not with
    it.)"""
    email, _token, authenticator = await with_passkey(client)
    async with statements.connection() as conn:
        user = await conn.first(select(User.id).where(User.email == email), {})
    assert user is not None
    now = datetime.now(UTC)
    async with statements.transaction() as tx:
        await tx.execute(
            insert(UserRole).values(
                user_id=user["id"], role="admin", granted_at=now, granted_by="test"
            ),
            {},
        )
    ceremony = await start(client)
    credential = authenticator.assertion(ceremony["optionsJson"])
    signing_in: asyncio.Task[dict[str, Any]] | None = None
    async with statements.transaction() as change:
        await change.first(select(User.id).where(User.id == user["id"]).with_for_update(), {})
        await change.execute(delete(UserRole).where(UserRole.user_id == user["id"]), {})
        signing_in = asyncio.create_task(finish(client, ceremony["challengeToken"], credential))
        async with asyncio.timeout(10):  # until PostgreSQL shows the sign-in waiting
            while True:
                async with statements.connection() as conn:
                    if (await conn.scalars(text(LOCKS_WAITING_HERE), {}))[0]:
                        break
                await asyncio.sleep(0.01)
    session = await asyncio.wait_for(signing_in, 10)
    assert session["__typename"] == "AuthSession", session
    assert claims_of(session["accessToken"])["roles"] == []


async def test_an_address_lists_its_passkeys_and_a_device_bound_one_is_hwk(
    client: httpx.AsyncClient,
) -> None:
    device_bound = SoftAuthenticator(backup_eligible=False, backed_up=False, transports=["usb"])
    email, _token, _ = await with_passkey(client, device_bound)
    ceremony = await start(client, email.upper())
    assert allowed(ceremony["optionsJson"]) == [
        {"id": b64url(device_bound.credential_id), "type": "public-key", "transports": ["usb"]}
    ]
    session = await finish(
        client, ceremony["challengeToken"], device_bound.assertion(ceremony["optionsJson"])
    )
    assert session["__typename"] == "AuthSession", session
    assert claims_of(session["accessToken"])["amr"] == ["hwk", "user", "mfa"]


async def test_a_passkey_needs_no_second_step_where_two_factor_is_on(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, _secret, _codes = await enrolled(client, clock)
    authenticator = SoftAuthenticator()
    await register(client, token, authenticator)
    session = await sign_in(client, authenticator, email)
    assert session["__typename"] == "AuthSession", session
    assert claims_of(session["accessToken"])["amr"] == ["swk", "user", "mfa"]


async def test_decoys_for_an_unknown_address_and_an_account_without_passkeys(
    client: httpx.AsyncClient,
) -> None:
    _email, _token, real = await with_passkey(client)
    without = unique_email()
    await signed_up_and_proven(client, without)
    unknown = unique_email()
    for address in (without, unknown):
        first, second = await start(client, address), await start(client, address)
        assert first["challengeToken"] != second["challengeToken"]
        one, two = allowed(first["optionsJson"]), allowed(second["optionsJson"])
        assert one == two  # stable across calls
        assert 1 <= len(one) <= 3
        for descriptor in one:
            assert set(descriptor) == {"id", "type", "transports"}
            assert descriptor["type"] == "public-key"
            assert descriptor["transports"] == ["hybrid", "internal"]
            assert 32 <= len(from_b64url(descriptor["id"])) <= 64
        # The rest of the options is what a real account's look like.
        shown = json.loads(first["optionsJson"])
        assert set(shown) == set(json.loads((await start(client, _email))["optionsJson"]))
    assert allowed((await start(client, without))["optionsJson"]) != allowed(
        (await start(client, unknown))["optionsJson"]
    )
    # Nobody's passkey answers a ceremony started with an address it does not belong to,
    # and an answer made with a decoy's ID is refused like any other.
    ceremony = await start(client, unknown)
    refused(
        await finish(client, ceremony["challengeToken"], real.assertion(ceremony["optionsJson"]))
    )
    ceremony = await start(client, unknown)
    forged = SoftAuthenticator(credential_id=from_b64url(allowed(ceremony["optionsJson"])[0]["id"]))
    refused(
        await finish(client, ceremony["challengeToken"], forged.assertion(ceremony["optionsJson"]))
    )


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "unknown credential",
        "wrong origin",
        "wrong rp id",
        "no user verification",
        "bad signature",
        "not json",
    ],
)
async def test_every_refused_passkey_answers_invalid_credentials_and_is_recorded(
    client: httpx.AsyncClient, bad: str
) -> None:
    email, token, authenticator = await with_passkey(client)
    ceremony = await start(client, email)
    options = ceremony["optionsJson"]
    if bad == "unknown credential":
        answer = SoftAuthenticator().assertion(options)
    elif bad == "wrong origin":
        answer = authenticator.assertion(options, origin="https://evil.example")
    elif bad == "wrong rp id":
        answer = authenticator.assertion(options, rp_id="evil.example")
    elif bad == "no user verification":
        answer = authenticator.assertion(options, flags=authenticator.flags(uv=False))
    elif bad == "bad signature":
        answer = json.loads(authenticator.assertion(options))
        answer["response"]["signature"] = b64url(b"\x30\x06\x02\x01\x01\x02\x01\x01")
        answer = json.dumps(answer)
    else:
        answer = "{not json"
    refused(await finish(client, ceremony["challengeToken"], answer))
    assert "LOGIN_FAILED" in await kinds(client, token)


async def test_five_refused_passkeys_lock_the_address_like_wrong_passwords(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, authenticator = await with_passkey(client)
    for _ in range(5):
        ceremony = await start(client, email)
        answer = authenticator.assertion(ceremony["optionsJson"], origin="https://evil.example")
        refused(await finish(client, ceremony["challengeToken"], answer))
    # A sixth refused answer is held back by the lock, as a sixth wrong password is.
    ceremony = await start(client, email)
    answer = authenticator.assertion(ceremony["optionsJson"], origin="https://evil.example")
    locked = await finish(client, ceremony["challengeToken"], answer)
    assert locked["code"] == "RATE_LIMITED" and locked["retryAfter"] > 0, locked
    # One budget with passwords: the password answers the same while the lock holds.
    by_password = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    assert by_password["code"] == "RATE_LIMITED"
    events = await kinds(client, token)
    assert events.count("LOGIN_FAILED") == 5 and "LOCKED_OUT" in events
    # The owner's passkey cannot be guessed: the lock does not hold it back.
    assert (await sign_in(client, authenticator, email))["__typename"] == "AuthSession"
    assert (await sign_in(client, authenticator))["__typename"] == "AuthSession"


@pytest.mark.parametrize("by", ["wrong passwords", "refused passkeys"])
async def test_a_stranger_locking_the_address_does_not_keep_its_passkey_out(
    client: httpx.AsyncClient, by: str
) -> None:
    email, _token, authenticator = await with_passkey(client)
    stranger = SoftAuthenticator(credential_id=authenticator.credential_id)
    for _ in range(6):
        if by == "wrong passwords":
            await mutate(client, LOGIN, {"i": {"email": email, "password": "not-the-password"}})
        else:
            ceremony = await start(client, email)
            await finish(
                client, ceremony["challengeToken"], stranger.assertion(ceremony["optionsJson"])
            )
    by_password = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    assert by_password["code"] == "RATE_LIMITED", by_password
    assert (await sign_in(client, authenticator, email))["__typename"] == "AuthSession"
    assert (await sign_in(client, authenticator))["__typename"] == "AuthSession"


async def test_refusals_cannot_tell_a_registered_credential_id_from_a_decoy(
    client: httpx.AsyncClient,
) -> None:
    """A stranger lists an address's credential IDs and answers address-less ceremonies
    with them, signed by another key: a registered ID and a decoy answer alike, the
    address locked by wrong passwords or not."""
    email, _token, _authenticator = await with_passkey(client)
    real = from_b64url(allowed((await start(client, email))["optionsJson"])[0]["id"])
    decoy = from_b64url(allowed((await start(client, unique_email()))["optionsJson"])[0]["id"])
    for _ in range(5):
        await mutate(client, LOGIN, {"i": {"email": email, "password": "not-the-password"}})

    async def answers(credential_id: bytes) -> list[str]:
        forged = SoftAuthenticator(credential_id=credential_id)
        found = []
        for _ in range(7):
            ceremony = await start(client)
            answer = await finish(
                client, ceremony["challengeToken"], forged.assertion(ceremony["optionsJson"])
            )
            found.append(answer["code"])
        return found

    for_real, for_decoy = await answers(real), await answers(decoy)
    assert for_real == for_decoy, (for_real, for_decoy)
    assert for_real == ["INVALID_CREDENTIALS"] * 5 + ["RATE_LIMITED"] * 2


async def test_a_user_handle_that_is_not_the_owners_is_refused(
    client: httpx.AsyncClient,
) -> None:
    email, token, authenticator = await with_passkey(client)
    assert authenticator.user_handle is not None
    own = authenticator.user_handle
    authenticator.user_handle = bytes(64 - len(own)) + b"\x01" * len(own)
    refused(await sign_in(client, authenticator))
    refused(await sign_in(client, authenticator, email))
    assert "LOGIN_FAILED" in await kinds(client, token)
    authenticator.user_handle = None  # not said: nothing to compare
    assert (await sign_in(client, authenticator))["__typename"] == "AuthSession"
    authenticator.user_handle = own
    assert (await sign_in(client, authenticator))["__typename"] == "AuthSession"


async def test_a_passkey_sign_in_asks_an_unverified_address_to_be_proven(
    client: httpx.AsyncClient,
    passkey_app: Starlette,
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
) -> None:
    """A passkey registered while verification was off, on an address never proven: once
    verification is required, a passkey sign-in asks for the address first, as a
    password login does."""
    email, _token, authenticator = await with_passkey(client)
    async with passkey_app.state.services.auth.statements.transaction() as tx:
        await tx.execute(
            update(User).where(User.email_normalized == email).values(email_verified_at=None), {}
        )
    settings = make_settings(
        webauthn_rp_id=RP_ID,
        webauthn_origins=ORIGIN,
        require_email_verification=True,
        **smtp.settings(),
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as http:
        by_password = await mutate(http, LOGIN, {"i": {"email": email, "password": PASSWORD}})
        assert by_password["purpose"] == "VERIFY_EMAIL", by_password
        for address in (email, None):
            by_passkey = await sign_in(http, authenticator, address)
            assert by_passkey["__typename"] == "OtpChallenge", by_passkey
            assert by_passkey["purpose"] == "VERIFY_EMAIL", by_passkey


async def test_a_used_ceremony_cannot_be_replayed(client: httpx.AsyncClient) -> None:
    _email, _token, authenticator = await with_passkey(client)
    ceremony = await start(client)
    answer = authenticator.assertion(ceremony["optionsJson"])
    assert (await finish(client, ceremony["challengeToken"], answer))["__typename"] == (
        "AuthSession"
    )
    refused(await finish(client, ceremony["challengeToken"], answer))
    fresh = authenticator.assertion(ceremony["optionsJson"])
    refused(await finish(client, ceremony["challengeToken"], fresh))


async def test_registration_and_sign_in_ceremonies_do_not_answer_each_other(
    client: httpx.AsyncClient,
) -> None:
    _email, token, authenticator = await with_passkey(client)
    registration = await start_registration(client, token)
    options = json.loads(registration["optionsJson"])
    as_sign_in = authenticator.assertion({"challenge": options["challenge"], "rpId": RP_ID})
    refused(await finish(client, registration["challengeToken"], as_sign_in))
    sign_in_ceremony = await start(client)
    other = SoftAuthenticator()
    created = other.register(
        {**options, "challenge": json.loads(sign_in_ceremony["optionsJson"])["challenge"]}
    )
    answer = await mutate(
        client,
        FINISH_REGISTRATION,
        {"i": {"challengeToken": sign_in_ceremony["challengeToken"], "credentialJson": created}},
        token=token,
    )
    assert (answer["__typename"], answer["code"]) == ("AuthError", "INVALID_TOKEN"), answer


async def test_a_ceremony_started_with_one_address_refuses_another_accounts_passkey(
    client: httpx.AsyncClient,
) -> None:
    first, _token, _ = await with_passkey(client)
    _second, _token_b, theirs = await with_passkey(client)
    ceremony = await start(client, first)
    refused(
        await finish(client, ceremony["challengeToken"], theirs.assertion(ceremony["optionsJson"]))
    )


async def test_a_ceremony_expires_after_five_minutes(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _email, _token, authenticator = await with_passkey(client)
    ceremony = await start(client)
    clock.advance(minutes=5, seconds=1)
    refused(
        await finish(
            client, ceremony["challengeToken"], authenticator.assertion(ceremony["optionsJson"])
        )
    )


async def test_a_count_going_backwards_is_refused_and_recorded_as_a_clone(
    client: httpx.AsyncClient,
) -> None:
    counting = SoftAuthenticator(backup_eligible=False, backed_up=False)
    email, token, _ = await with_passkey(client, counting)
    assert (await sign_in(client, counting, email))["__typename"] == "AuthSession"  # count 1
    ceremony = await start(client, email)
    clone = counting.assertion(ceremony["optionsJson"], count=1)
    refused(await finish(client, ceremony["challengeToken"], clone))
    assert "PASSKEY_CLONE_SUSPECTED" in await kinds(client, token)
    # The genuine authenticator, counting on, still signs in.
    counting.sign_count = 1
    assert (await sign_in(client, counting, email))["__typename"] == "AuthSession"


async def test_synced_passkeys_counting_zero_sign_in_again_and_again(
    client: httpx.AsyncClient,
) -> None:
    _email, token, synced = await with_passkey(client)
    for _ in range(3):
        ceremony = await start(client)
        answer = synced.assertion(ceremony["optionsJson"], count=0)
        assert (await finish(client, ceremony["challengeToken"], answer))["__typename"] == (
            "AuthSession"
        )
    assert "PASSKEY_CLONE_SUSPECTED" not in await kinds(client, token)


async def test_two_finishes_at_once_open_exactly_one_session(
    client: httpx.AsyncClient, database_url: str
) -> None:
    _email, token, authenticator = await with_passkey(client)
    ceremony = await start(client)
    answer = authenticator.assertion(ceremony["optionsJson"])
    answers = await asyncio.gather(
        *(finish(client, ceremony["challengeToken"], answer) for _ in range(2))
    )
    assert sorted(a["__typename"] for a in answers) == ["AuthError", "AuthSession"]
    user_id = claims_of(token)["sub"]
    (count,) = await rows(
        database_url,
        select(func.count(UserSession.id)).where(UserSession.user_id == user_id),
    )
    assert count[0] == 2  # the signup's and one passkey sign-in


async def test_a_disabled_account_is_told_so_after_a_proven_passkey(
    client: httpx.AsyncClient, passkey_app: Starlette
) -> None:
    email, _token, authenticator = await with_passkey(client)
    services = passkey_app.state.services

    async with services.auth.statements.transaction() as tx:
        await tx.execute(
            update(User).where(User.email_normalized == email).values(is_active=False), {}
        )
    by_password = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    by_passkey = await sign_in(client, authenticator)
    assert by_passkey["code"] == by_password["code"] == "ACCOUNT_DISABLED"


# -- the second step and step-up -----------------------------------------------------------


async def test_a_passkey_completes_the_totp_step_of_a_password_login(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, secret, _codes = await enrolled(client, clock)
    authenticator = SoftAuthenticator()
    await register(client, token, authenticator)
    step = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    assert (step["__typename"], step["method"]) == ("OtpChallenge", "TOTP"), step
    assert allowed(step["passkeyOptionsJson"]) == [
        {
            "id": b64url(authenticator.credential_id),
            "type": "public-key",
            "transports": ["hybrid", "internal"],
        }
    ]
    session = await finish(
        client, step["challengeToken"], authenticator.assertion(step["passkeyOptionsJson"])
    )
    assert session["__typename"] == "AuthSession", session
    assert claims_of(session["accessToken"])["amr"] == ["pwd", "swk", "user", "mfa"]
    # Whichever answers first spends the challenge.
    late = await gql(
        client,
        VERIFY_OTP,
        {"i": {"challengeToken": step["challengeToken"], "code": code_at(secret, clock)}},
    )
    assert late["data"]["verifyOtp"]["code"] == "INVALID_TOKEN"
    # And the code still answers a challenge that offers a passkey.
    step = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    clock.advance(seconds=30)
    by_code = await gql(
        client,
        VERIFY_OTP,
        {"i": {"challengeToken": step["challengeToken"], "code": code_at(secret, clock)}},
    )
    assert by_code["data"]["verifyOtp"]["__typename"] == "AuthSession"
    refused(
        await finish(
            client, step["challengeToken"], authenticator.assertion(step["passkeyOptionsJson"])
        )
    )


async def test_a_totp_step_is_answered_only_by_its_users_passkey(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, _secret, _codes = await enrolled(client, clock)
    await register(client, token, SoftAuthenticator())
    _other, _token, theirs = await with_passkey(client)
    step = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    refused(
        await finish(client, step["challengeToken"], theirs.assertion(step["passkeyOptionsJson"]))
    )


async def test_challenges_offer_passkeys_only_to_a_proven_party_that_has_them(
    client: httpx.AsyncClient, clock: MutableClock, smtp: SmtpSink
) -> None:
    email, _token, _secret, _codes = await enrolled(client, clock)
    step = await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    assert step["__typename"] == "OtpChallenge" and step["passkeyOptionsJson"] is None
    with_keys, _t, _a = await with_passkey(client)
    by_mail = await mutate(client, EMAIL_LOGIN, {"i": {"email": with_keys}})
    assert by_mail["__typename"] == "OtpChallenge" and by_mail["passkeyOptionsJson"] is None
    # The TOTP step after an emailed code alone offers none either (only a password's
    # TOTP step and step-ups do).
    await register(client, _token, SoftAuthenticator())
    code_login = await mutate(client, EMAIL_LOGIN, {"i": {"email": email}})
    mail = await smtp.wait_for(email, where=lambda m: "sign-in code" in m.subject.lower())
    step = await mutate(
        client,
        VERIFY_OTP_WITH_OPTIONS,
        {"i": {"challengeToken": code_login["challengeToken"], "code": mail.code()}},
    )
    assert (step["__typename"], step["method"]) == ("OtpChallenge", "TOTP"), step
    assert step["passkeyOptionsJson"] is None


async def test_reauthenticate_by_passkey_renews_the_same_session(
    client: httpx.AsyncClient, clock: MutableClock, smtp: SmtpSink
) -> None:
    email, token, authenticator = await with_passkey(client)
    other = str(
        (await mutate(client, LOGIN, {"i": {"email": email, "password": PASSWORD}}))["accessToken"]
    )
    clock.advance(seconds=WINDOW + 60)
    step = await mutate(client, REAUTHENTICATE, {"i": {}}, token=token)
    assert (step["method"], step["purpose"]) == ("EMAIL", "REAUTHENTICATE"), step
    options = step["passkeyOptionsJson"]
    assert allowed(options)[0]["id"] == b64url(authenticator.credential_id)
    # Without the session's bearer token, or with another session's: refused.
    refused(await finish(client, step["challengeToken"], authenticator.assertion(options)))
    refused(
        await finish(client, step["challengeToken"], authenticator.assertion(options), token=other)
    )
    clock.advance(seconds=3)
    renewed = await finish(
        client, step["challengeToken"], authenticator.assertion(options), token=token
    )
    assert renewed["__typename"] == "AuthSession", renewed
    claims = claims_of(renewed["accessToken"])
    assert claims["sid"] == claims_of(token)["sid"]
    assert claims["auth_time"] == int(clock.now().timestamp())
    assert {"swk", "user", "mfa"} <= set(claims["amr"])
    # The emailed code went out too, and is spent with the challenge.
    mail = await smtp.wait_for(email, where=lambda m: "confirmation code" in m.subject)
    late = await gql(
        client, VERIFY_OTP, {"i": {"challengeToken": step["challengeToken"], "code": mail.code()}}
    )
    assert late["data"]["verifyOtp"]["code"] == "INVALID_TOKEN"


async def test_reauthenticate_without_a_mail_is_answered_only_by_a_passkey(
    client: httpx.AsyncClient, clock: MutableClock, smtp: SmtpSink
) -> None:
    email, token, authenticator = await with_passkey(client)
    clock.advance(seconds=WINDOW + 60)
    step = await mutate(client, REAUTHENTICATE, {"i": {"emailCode": False}}, token=token)
    assert step["__typename"] == "OtpChallenge" and step["passkeyOptionsJson"], step
    by_code = await gql(
        client, VERIFY_OTP, {"i": {"challengeToken": step["challengeToken"], "code": "123456"}}
    )
    assert by_code["data"]["verifyOtp"]["code"] == "INVALID_TOKEN"
    renewed = await finish(
        client,
        step["challengeToken"],
        authenticator.assertion(step["passkeyOptionsJson"]),
        token=token,
    )
    assert claims_of(renewed["accessToken"])["sid"] == claims_of(token)["sid"]
    # No code was mailed: the next mail to the address is the one asked for now.
    await mutate(client, REAUTHENTICATE, {"i": {}}, token=renewed["accessToken"])
    await smtp.wait_for(email, where=lambda m: "confirmation code" in m.subject)
    assert len([m for m in smtp.mails(email) if "confirmation code" in m.subject]) == 1


@pytest.mark.slow
async def test_two_processes_racing_one_ceremony_open_exactly_one_session(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """One answer sent at once to two server processes sharing PostgreSQL: the ceremony
    is spent by the transaction that concludes, so exactly one of them signs in."""
    env = production_env(database_url, WEBAUTHN_RP_ID=RP_ID, WEBAUTHN_ORIGINS=ORIGIN)
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            session = await signed_up_at(one, unique_email())
            token = session["accessToken"]
            authenticator = SoftAuthenticator()
            created = await ok(one, START_REGISTRATION, {"i": {}}, token=token)
            ceremony = created["startPasskeyRegistration"]
            answer = authenticator.register(ceremony["optionsJson"])
            added = await ok(
                one,
                FINISH_REGISTRATION,
                {"i": {"challengeToken": ceremony["challengeToken"], "credentialJson": answer}},
                token=token,
            )
            assert added["finishPasskeyRegistration"]["__typename"] == "Passkey", added
            for _round in range(3):
                started = (await ok(one, START, {"i": {}}))["startPasskeyLogin"]
                variables = {
                    "i": {
                        "challengeToken": started["challengeToken"],
                        "credentialJson": authenticator.assertion(started["optionsJson"]),
                    }
                }
                answers = await asyncio.gather(
                    ok(one, FINISH, variables), ok(two, FINISH, variables)
                )
                kinds_seen = sorted(a["finishPasskeyLogin"]["__typename"] for a in answers)
                assert kinds_seen == ["AuthError", "AuthSession"], answers


async def test_sign_in_works_on_the_embedded_database(
    make_settings: Callable[..., Settings], clock: MutableClock, tmp_path: Path
) -> None:
    """SQLite runs the same statements (and orders writers by BEGIN IMMEDIATE): a sign-in,
    two finishes racing (one session), a refusal counted, the TOTP step by passkey."""
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/strawgate.db", webauthn_rp_id=RP_ID
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as http:
        email, token, authenticator = await with_passkey(http)
        assert (await sign_in(http, authenticator, email))["__typename"] == "AuthSession"
        ceremony = await start(http)
        answer = authenticator.assertion(ceremony["optionsJson"])
        raced = await asyncio.gather(
            *(finish(http, ceremony["challengeToken"], answer) for _ in range(2))
        )
        assert sorted(r["__typename"] for r in raced) == ["AuthError", "AuthSession"]
        ceremony = await start(http, email)
        wrong = authenticator.assertion(ceremony["optionsJson"], origin="https://evil.example")
        refused(await finish(http, ceremony["challengeToken"], wrong))
        assert "LOGIN_FAILED" in await kinds(http, token)
        totp_email, totp_token, _secret, _codes = await enrolled(http, clock)
        second = SoftAuthenticator()
        await register(http, totp_token, second)
        step = await mutate(http, LOGIN, {"i": {"email": totp_email, "password": PASSWORD}})
        done = await finish(
            http, step["challengeToken"], second.assertion(step["passkeyOptionsJson"])
        )
        assert done["__typename"] == "AuthSession", done


# -- enumeration through registration, step-up ceremonies in bulk ---------------------------


async def test_registering_a_listed_decoy_answers_as_registering_a_real_passkey(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """A stranger registers, on their own account, the IDs an address lists: a decoy is
    refused exactly as a registered ID is, and neither is added."""
    victim, _token, _authenticator = await with_passkey(client)
    real = from_b64url(allowed((await start(client, victim))["optionsJson"])[0]["id"])
    decoys = [
        from_b64url(descriptor["id"])
        for address in (unique_email(), unique_email(), unique_email())
        for descriptor in allowed((await start(client, address))["optionsJson"])
    ][:3]  # a refused registration leaves its ceremony waiting: at most five wait
    token = str((await signed_up_and_proven(client, unique_email()))["accessToken"])

    async def registering(credential_id: bytes) -> dict[str, Any]:
        ceremony = await start_registration(client, token)
        answer = SoftAuthenticator(credential_id=credential_id).register(ceremony["optionsJson"])
        return await finish_registration(client, token, ceremony["challengeToken"], answer)

    for_real = await registering(real)
    assert for_real["code"] == "INVALID_INPUT", for_real
    for decoy in decoys:
        assert 32 <= len(decoy) <= 64
        assert await registering(decoy) == for_real
    assert await my_passkeys(client, token) == []
    # Any other ID of those lengths registers.
    assert (await registering(os.urandom(32)))["__typename"] == "Passkey"


async def test_passkey_step_ups_are_rate_limited_and_capped_per_session(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    settings = make_settings(
        webauthn_rp_id=RP_ID,
        webauthn_origins=ORIGIN,
        rate_limits=UNLIMITED.model_copy(update={"start_passkey_login_ip": "8/minute"}),
        **smtp.settings(),
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as http:
        _email, token, authenticator = await with_passkey(http)
        steps = [
            await mutate(http, REAUTHENTICATE, {"i": {"emailCode": False}}, token=token)
            for _ in range(6)
        ]
        assert [step["__typename"] for step in steps[:5]] == ["OtpChallenge"] * 5, steps
        assert steps[5]["code"] == "RATE_LIMITED" and steps[5]["retryAfter"] > 0, steps[5]
        # Answering one makes room for another.
        renewed = await finish(
            http,
            steps[0]["challengeToken"],
            authenticator.assertion(steps[0]["passkeyOptionsJson"]),
            token=token,
        )
        assert renewed["__typename"] == "AuthSession", renewed
        again = await mutate(http, REAUTHENTICATE, {"i": {"emailCode": False}}, token=token)
        assert again["__typename"] == "OtpChallenge", again
        # The client's ceremony starts are one budget with startPasskeyLogin's (8 a
        # minute): seven spent, one left.
        assert (await mutate(http, START, {"i": {}}))["__typename"] == "PasskeyCeremony"
        limited = await mutate(http, START, {"i": {}})
        assert limited["code"] == "RATE_LIMITED", limited


async def test_an_unknown_credential_id_costs_the_signature_check_a_registered_one_does(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time of a refusal must not tell a registered ID from a decoy: each is refused
    after one signature check."""
    email, _token, _authenticator = await with_passkey(client)
    real = from_b64url(allowed((await start(client, email))["optionsJson"])[0]["id"])
    decoy = from_b64url(allowed((await start(client, unique_email()))["optionsJson"])[0]["id"])
    checks: list[bytes] = []
    check = passkey_signin._check_signature

    def counted(rp: Any, token: str, credential: Any, public_key: bytes) -> Any:
        checks.append(bytes(credential.raw_id))
        return check(rp, token, credential, public_key)

    monkeypatch.setattr(passkey_signin, "_check_signature", counted)
    for credential_id in (real, decoy, os.urandom(32)):
        ceremony = await start(client)
        forged = SoftAuthenticator(credential_id=credential_id)
        refused(
            await finish(
                client, ceremony["challengeToken"], forged.assertion(ceremony["optionsJson"])
            )
        )
    assert len(checks) == 3 and checks[:2] == [real, decoy]


# -- accounts without a password -------------------------------------------------------------


async def test_an_account_without_a_password_adds_signs_in_with_and_deletes_its_last_passkey(
    client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """Signed up without a password (the address proven by its code, which is a recent
    sign-in), the account adds a passkey and signs in with it; deleting its only passkey
    is allowed, because the emailed code still signs it in."""
    from tests.gql import REQUEST_LOGIN_CODE, verify_otp
    from tests.graph.test_passkeys import DELETE
    from tests.graph.test_passwordless import passwordless

    email, session = await passwordless(client, smtp)
    token = str(session["accessToken"])
    authenticator = SoftAuthenticator()
    passkey = await register(client, token, authenticator)
    signed_in = await sign_in(client, authenticator)
    assert signed_in["__typename"] == "AuthSession", signed_in
    assert signed_in["user"]["email"] == email
    assert "mfa" in claims_of(signed_in["accessToken"])["amr"]

    fresh = str(signed_in["accessToken"])  # the passkey was just proven: recent
    left = await mutate(client, DELETE, {"i": {"id": passkey["id"]}}, token=fresh)
    assert left["__typename"] == "User" and left["passkeys"] == [], left
    refused(await sign_in(client, authenticator))
    # The way in that remains: the emailed code (after the code, the added and the
    # removed notices, the fourth mail).
    challenge = await mutate(client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=4)
    again = await verify_otp(client, challenge["challengeToken"], mail.code())
    assert again["__typename"] == "AuthSession", again
