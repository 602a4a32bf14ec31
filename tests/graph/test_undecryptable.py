"""A secret sealed under a key this process lacks (a key rotation that has not reached
every process): the client is told to try again, the operator what to do."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import httpx
import pyotp
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from starlette.applications import Starlette

from db.mail.outbox import Outbox
from db.security.box import SecretBox
from db.session import Statements
from graph.metrics import MAIL_FAILURES
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import VERIFY_OTP, gql, login, post, signed_up_and_proven
from tests.graph.test_metrics import sample

SETUP = "mutation { setupTotp { __typename ... on TotpSetup { secret } } }"
CONFIRM = """mutation($i: ConfirmTotpInput!) { confirmTotp(input: $i) { __typename
    ... on RecoveryCodes { codes } } }"""
DISABLE = """mutation($i: DisableTotpInput!) { disableTotp(input: $i) { __typename
    ... on User { id otpEnabled } ... on AuthError { code message } } }"""
RESEAL = text(
    "UPDATE totp_credentials SET secret_sealed = :sealed"
    " WHERE user_id = (SELECT id FROM users WHERE email = :email)"
)


def code_at(secret: str, clock: MutableClock) -> str:
    return pyotp.TOTP(secret).at(clock.now())


def statements_of(app: Starlette) -> Statements:
    statements: Statements = app.state.services.auth.statements
    return statements


async def enrolled_elsewhere(
    app: Starlette, client: httpx.AsyncClient, clock: MutableClock, key: str
) -> tuple[str, str, str]:
    """A user with two-factor on whose secret was then sealed under `key`, one this app
    does not hold: (email, access token, secret)."""
    email = unique_email()
    token = (await signed_up_and_proven(client, email))["accessToken"]
    secret = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    confirmed = await gql(client, CONFIRM, {"i": {"code": code_at(secret, clock)}}, token=token)
    assert confirmed["data"]["confirmTotp"]["__typename"] == "RecoveryCodes"
    clock.advance(seconds=90)  # past the confirming step
    async with statements_of(app).engine.begin() as conn:
        resealed = await conn.execute(
            RESEAL, {"sealed": SecretBox([key]).seal(secret), "email": email}
        )
    assert resealed.rowcount == 1
    return email, token, secret


def assert_unavailable(response: httpx.Response, *secrets: str) -> None:
    assert response.status_code == 200
    (error,) = response.json()["errors"]
    assert error["message"] == "The service is temporarily unavailable; try again shortly."
    assert error["extensions"] == {
        "code": "SERVICE_UNAVAILABLE",
        "requestId": response.headers["x-request-id"],
    }
    for word in ("Traceback", "ENCRYPTION_KEYS", "decrypt", "Fernet", "InvalidToken", *secrets):
        assert word not in response.text


def assert_logged(caplog: pytest.LogCaptureFixture, request_id: str, *secrets: str) -> None:
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert record.name == "strawgate.errors" and record.levelno == logging.ERROR
    message = record.getMessage()
    assert "cannot be decrypted with ENCRYPTION_KEYS" in message
    assert "deploy the key list that encrypted it to every process" in message
    assert "strawgate rotate-keys" in message
    assert record.exc_info is None  # no traceback, which could quote the sealed text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert secret not in logged


async def test_a_totp_sign_in_answers_service_unavailable_without_the_key(
    app: Starlette,
    client: httpx.AsyncClient,
    clock: MutableClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = Fernet.generate_key().decode()
    email, token, secret = await enrolled_elsewhere(app, client, clock, other)
    sign_in = await login(client, email, PASSWORD)
    assert sign_in["__typename"] == "OtpChallenge"
    totp = code_at(secret, clock)

    with caplog.at_level(logging.INFO, logger="strawgate"):
        verified = await post(
            client,
            VERIFY_OTP,
            {"i": {"challengeToken": sign_in["challengeToken"], "code": totp}},
        )
        disabled = await post(
            client, DISABLE, {"i": {"password": PASSWORD, "code": totp}}, token=token
        )

    for response in (verified, disabled):
        assert_unavailable(response, secret, totp, other)
        assert_logged(caplog, response.headers["x-request-id"], secret, totp, other)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


async def test_undecryptable_mails_are_counted_on_metrics(
    app: Starlette, clock: MutableClock
) -> None:
    lost_key = Outbox(box=SecretBox([Fernet.generate_key().decode()]), clock=clock, postgres=True)
    async with client_for(app, ip="127.0.0.1") as local:

        async def metrics() -> str:
            return (await local.get("/metrics")).text

        before = await metrics()
        for reason in MAIL_FAILURES:
            assert sample(before, "strawgate_mail_failures_total", reason=reason) == 0
        async with statements_of(app).transaction() as tx:
            await lost_key.enqueue(
                tx,
                user_id=None,
                recipient=unique_email(),
                template="login_code",
                context={"minutes": 10},
                secrets={"code": "123456"},
                secrets_expire_at=clock.now() + timedelta(minutes=10),
            )
        app.state.services.auth.outbox.wake()  # the app's own sender takes it

        deadline = time.monotonic() + 3.0
        while sample(await metrics(), "strawgate_mail_failures_total", reason="undecryptable") < 1:
            assert time.monotonic() < deadline, "the sender did not count the mail"
            await asyncio.sleep(0.02)
        after = await metrics()
    # Retried after a backoff on the test clock, which stands still: counted once.
    assert sample(after, "strawgate_mail_failures_total", reason="undecryptable") == 1
    assert sample(after, "strawgate_mail_failures_total", reason="unrenderable") == 0
    assert "123456" not in after
