"""Emailed codes: sign-in by code, single use, five tries, expiry, resending, purpose
binding, digests at rest, and request mutations that reveal nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import statistics
import time
import uuid
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from db.security.tokens import token_digest
from tests.conftest import PASSWORD, TEST_SECRET, MutableClock, unique_email
from tests.gql import (
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESEND_OTP,
    RESET_PASSWORD,
    gql,
    login,
    mutate,
    signed_up,
    verify_otp,
)
from tests.smtp import SmtpSink


async def verified_user(http: httpx.AsyncClient, smtp: SmtpSink) -> str:
    email, _session = await signed_up(http, smtp)
    return email


async def login_code(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    return await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})


async def resend(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    return await mutate(http, RESEND_OTP, {"i": {"challengeToken": token}})


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def test_sign_in_by_code(mail_client: httpx.AsyncClient, smtp: SmtpSink) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    assert (challenge["method"], challenge["purpose"], challenge["expiresIn"]) == (
        "EMAIL",
        "LOGIN",
        600,
    )
    mail = await smtp.wait_for(email, count=2)
    assert "sign" in mail.subject.lower()
    session = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    assert session["user"]["email"] == email
    # Single use: the same code again is refused, the challenge is spent.
    again = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert again["code"] == "INVALID_TOKEN"
    # A verified account's password is its owner's: it keeps working.
    assert (await login(mail_client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_codes_typed_with_a_space_are_accepted(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    session = await verify_otp(mail_client, challenge["challengeToken"], f"{code[:3]} {code[3:]}")
    assert session["__typename"] == "AuthSession"


async def test_with_two_factor_a_totp_step_follows_the_emailed_code(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    session = await login(mail_client, email, PASSWORD)
    secret = await enrol_totp(mail_client, session["accessToken"], clock)
    challenge = await login_code(mail_client, email)
    mail = await smtp.wait_for(email, where=lambda m: "sign-in code" in m.subject)
    step = await verify_otp(mail_client, challenge["challengeToken"], mail.code())
    assert step["__typename"] == "OtpChallenge"
    assert (step["method"], step["purpose"]) == ("TOTP", "LOGIN")
    clock.advance(seconds=30)
    totp = pyotp.TOTP(secret).at(clock.now())
    done = await verify_otp(mail_client, step["challengeToken"], totp)
    assert done["__typename"] == "AuthSession"
    claims = decode_unverified(done["accessToken"])
    assert claims["amr"] == ["otp", "mfa"]


async def test_five_wrong_codes_kill_the_challenge(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    for _ in range(5):
        answer = await verify_otp(mail_client, challenge["challengeToken"], wrong(code))
        assert answer["code"] == "INVALID_OTP"
    dead = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert dead["code"] == "INVALID_TOKEN"


async def test_parallel_guesses_cannot_pass_five(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    token = challenge["challengeToken"]
    guesses = [f"{n:06d}" for n in range(20) if f"{n:06d}" != code][:12]
    answers = await asyncio.gather(*(verify_otp(mail_client, token, g) for g in guesses))
    codes = sorted(a["code"] for a in answers)
    assert codes.count("INVALID_OTP") == 5
    assert codes.count("INVALID_TOKEN") == 7


async def test_codes_expire_after_ten_minutes(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    clock.advance(minutes=10, seconds=1)
    answer = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert answer["code"] == "INVALID_TOKEN"


async def test_a_code_is_good_until_its_expiry(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    clock.advance(minutes=9, seconds=59)
    answer = await verify_otp(mail_client, challenge["challengeToken"], code)
    assert answer["__typename"] == "AuthSession"


async def test_resend_mails_a_new_code_and_keeps_attempts_and_expiry(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    token = challenge["challengeToken"]
    old = (await smtp.wait_for(email, count=2)).code()
    for _ in range(3):
        assert (await verify_otp(mail_client, token, wrong(old)))["code"] == "INVALID_OTP"
    # Too soon: once a minute.
    early = await resend(mail_client, token)
    assert early["code"] == "RATE_LIMITED"
    assert early["retryAfter"] == 60
    clock.advance(seconds=61)
    again = await resend(mail_client, token)
    assert again["__typename"] == "OtpChallenge"
    assert again["challengeToken"] == token
    assert (again["method"], again["purpose"]) == ("EMAIL", "LOGIN")
    assert again["expiresIn"] == 600 - 61  # the same expiry
    new = (await smtp.wait_for(email, count=3)).code()
    if new != old:  # one in a million they are equal
        assert (await verify_otp(mail_client, token, old))["code"] == "INVALID_OTP"
    else:
        assert (await verify_otp(mail_client, token, wrong(old)))["code"] == "INVALID_OTP"
    # Four attempts spent; the fifth is the last one.
    assert (await verify_otp(mail_client, token, new))["__typename"] == "AuthSession"


async def test_resend_at_most_three_times(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    token = (await login_code(mail_client, email))["challengeToken"]
    for sent in range(3, 6):  # each resend's mail arrives before the next is asked for
        clock.advance(seconds=60)
        assert (await resend(mail_client, token))["__typename"] == "OtpChallenge"
        await smtp.wait_for(email, count=sent)
    clock.advance(seconds=60)
    refused = await resend(mail_client, token)
    assert refused["code"] == "RATE_LIMITED"
    assert 0 < refused["retryAfter"] <= 600 - 240
    last = (await smtp.wait_for(email, count=5)).code()
    assert (await verify_otp(mail_client, token, last))["__typename"] == "AuthSession"


async def test_resend_keeps_the_expiry(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    token = (await login_code(mail_client, email))["challengeToken"]
    clock.advance(minutes=9)
    assert (await resend(mail_client, token))["expiresIn"] == 60
    code = (await smtp.wait_for(email, count=3)).code()
    clock.advance(seconds=61)
    assert (await verify_otp(mail_client, token, code))["code"] == "INVALID_TOKEN"
    assert (await resend(mail_client, token))["code"] == "INVALID_TOKEN"


async def test_resend_on_a_totp_challenge_is_an_invalid_token(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = await verified_user(mail_client, smtp)
    session = await login(mail_client, email, PASSWORD)
    await enrol_totp(mail_client, session["accessToken"], clock)
    challenge = await login(mail_client, email, PASSWORD)
    assert challenge["method"] == "TOTP"
    answer = await resend(mail_client, challenge["challengeToken"])
    assert (answer["code"], answer["field"]) == ("INVALID_TOKEN", "challengeToken")
    assert (await resend(mail_client, "not-a-challenge"))["code"] == "INVALID_TOKEN"


async def test_each_challenge_completes_only_its_purpose(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    email = await verified_user(mail_client, smtp)
    reset = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    reset_code = (await smtp.wait_for(email, count=2)).code()
    sign_in = await login_code(mail_client, email)
    sign_in_code = (await smtp.wait_for(email, count=3)).code()

    # verifyOtp does not take a reset code's challenge, resetPassword not a sign-in one:
    # INVALID_TOKEN, nothing consumed, no attempt counted.
    for _ in range(6):
        answer = await verify_otp(mail_client, reset["challengeToken"], reset_code)
        assert answer["code"] == "INVALID_TOKEN"
        answer = await reset_password(
            mail_client, sign_in["challengeToken"], sign_in_code, "a brand new passphrase"
        )
        assert answer["code"] == "INVALID_TOKEN"
    assert await attempts(database_url, reset["challengeToken"]) == 0
    assert await attempts(database_url, sign_in["challengeToken"]) == 0

    session = await verify_otp(mail_client, sign_in["challengeToken"], sign_in_code)
    assert session["__typename"] == "AuthSession"
    done = await reset_password(
        mail_client, reset["challengeToken"], reset_code, "a brand new passphrase"
    )
    assert done["__typename"] == "AuthSession"


async def test_codes_are_stored_as_keyed_digests_only(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    email = await verified_user(mail_client, smtp)
    challenge = await login_code(mail_client, email)
    code = (await smtp.wait_for(email, count=2)).code()
    dump = await database_text(database_url)
    assert code not in dump
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT id, code_hash FROM challenges WHERE token_hash = :d"),
                {"d": token_digest(challenge["challengeToken"])},
            )
        ).one()
    await engine.dispose()
    # HMAC-SHA-256 under a key derived (HKDF) from SECRET_KEY with the challenge id.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"strawgate:email-code:" + uuid.UUID(str(row.id)).bytes,
    ).derive(TEST_SECRET.encode())
    assert bytes(row.code_hash) == hmac.new(key, code.encode(), hashlib.sha256).digest()
    assert bytes(row.code_hash) != hashlib.sha256(code.encode()).digest()


async def test_no_plaintext_code_is_left_in_the_database(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    email = await verified_user(mail_client, smtp)
    await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    await login_code(mail_client, email)
    codes = [m.code() for m in await wait_mails(smtp, email, 3)]
    dump = await database_text(database_url)
    for code in codes:
        assert code not in dump
    # Once sent, the outbox rows hold no secrets at all.
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        sealed = (
            await conn.execute(text("SELECT count(*) FROM outbox WHERE secrets_sealed IS NOT NULL"))
        ).scalar_one()
    await engine.dispose()
    assert sealed == 0


async def test_request_mutations_reveal_nothing_about_registration(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    registered = await verified_user(mail_client, smtp)
    unknown = unique_email()
    for query in (REQUEST_LOGIN_CODE, REQUEST_PASSWORD_RESET):
        known_answer = await mutate(mail_client, query, {"i": {"email": registered}})
        unknown_answer = await mutate(mail_client, query, {"i": {"email": unknown}})
        assert known_answer.keys() == unknown_answer.keys()
        for key in ("__typename", "method", "purpose", "expiresIn"):
            assert known_answer[key] == unknown_answer[key]
        assert len(known_answer["challengeToken"]) == len(unknown_answer["challengeToken"])
        # A code for the unknown address: refused like a wrong one, and attempts count.
        guess = await verify_otp(mail_client, unknown_answer["challengeToken"], "000000")
        if query == REQUEST_LOGIN_CODE:
            assert guess["code"] == "INVALID_OTP"
        resent = await resend(mail_client, unknown_answer["challengeToken"])
        assert resent["code"] == "RATE_LIMITED"  # like a real one, within the minute
    await wait_mails(smtp, registered, 3)
    assert smtp.mails(unknown) == []


@pytest.mark.timing
async def test_request_mutations_take_the_same_time_either_way(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """The work behind the answer is the same (a decoy stands in for queueing the mail),
    and the sender's own work waits until the answer is out. Compared by the lower
    quartile: the sender's rounds (and the SMTP server in this very process) add noise to
    whichever requests they overlap, registered or not."""
    registered = await verified_user(mail_client, smtp)
    for query in (REQUEST_LOGIN_CODE, REQUEST_PASSWORD_RESET):
        known: list[float] = []
        unknown: list[float] = []
        for round_ in range(120):  # interleaved, so drift hits both alike
            for email, times in ((registered, known), (f"nobody-{round_}@example.com", unknown)):
                start = time.perf_counter()
                await mutate(mail_client, query, {"i": {"email": email}})
                times.append(time.perf_counter() - start)
        ratio = lower_quartile(known) / lower_quartile(unknown)
        assert 0.83 < ratio < 1.2, (query, ratio)


def lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0]


async def test_a_malformed_address_is_invalid_input(mail_client: httpx.AsyncClient) -> None:
    for query in (REQUEST_LOGIN_CODE, REQUEST_PASSWORD_RESET):
        answer = await mutate(mail_client, query, {"i": {"email": "not an address"}})
        assert (answer["code"], answer["field"]) == ("INVALID_INPUT", "email")


# -- helpers ---------------------------------------------------------------------------------


async def reset_password(
    http: httpx.AsyncClient, token: str, code: str, new_password: str
) -> dict[str, Any]:
    return await mutate(
        http,
        RESET_PASSWORD,
        {"i": {"challengeToken": token, "code": code, "newPassword": new_password}},
    )


async def enrol_totp(http: httpx.AsyncClient, access_token: str, clock: MutableClock) -> str:
    setup = await gql(
        http, "mutation { setupTotp { ... on TotpSetup { secret } } }", token=access_token
    )
    secret: str = setup["data"]["setupTotp"]["secret"]
    confirm = await gql(
        http,
        "mutation($i: ConfirmTotpInput!) { confirmTotp(input: $i) {"
        " __typename ... on RecoveryCodes { codes } } }",
        {"i": {"code": pyotp.TOTP(secret).at(clock.now())}},
        token=access_token,
    )
    assert confirm["data"]["confirmTotp"]["__typename"] == "RecoveryCodes"
    return secret


def decode_unverified(token: str) -> dict[str, Any]:
    from jose import jwt

    claims: dict[str, Any] = jwt.get_unverified_claims(token)
    return claims


async def attempts(database_url: str, token: str) -> int:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        found = (
            await conn.execute(
                text("SELECT attempts FROM challenges WHERE token_hash = :d"),
                {"d": token_digest(token)},
            )
        ).scalar_one()
    await engine.dispose()
    return int(found)


async def database_text(database_url: str) -> str:
    """Every text and binary column of every table, as one string (binary as hex and
    latin-1), to search for secrets."""
    engine = create_async_engine(database_url)
    parts: list[str] = []
    async with engine.connect() as conn:
        for table in ("users", "sessions", "challenges", "outbox", "refresh_tokens"):
            for row in (await conn.execute(text(f"SELECT * FROM {table}"))).all():  # noqa: S608
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        parts += [raw.hex(), raw.decode("latin-1")]
                    else:
                        parts.append(str(value))
    await engine.dispose()
    return "\n".join(parts)


async def wait_mails(smtp: SmtpSink, email: str, count: int) -> list[Any]:
    await smtp.wait_for(email, count=count)
    return smtp.mails(email)
