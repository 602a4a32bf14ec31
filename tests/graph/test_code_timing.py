"""A wrong emailed code costs the same whether or not the address has an account (issue
12): the same answer, the same rows written (a LOGIN_FAILED event, one check of the
per-account-and-client wrong-code budget) and so the same time, for verifyOtp with a
sign-in code and for resetPassword with a reset code."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from db.models import LoginThrottle, SecurityEvent
from db.services.lockout import address_digest
from db.session import Statements
from db.settings import Settings
from graph.app import create_app
from tests.conftest import MutableClock, client_for, unique_email
from tests.gql import (
    PASSWORD,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    login,
    mutate,
    signed_up,
    verify_otp,
)
from tests.smtp import SmtpSink

NEW_PASSWORD = "a new and rather long passphrase"


@pytest.fixture
async def mail_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    """conftest's mail_app, with the address's code lockout out of the way: these tests
    send more wrong codes to one address than it allows (tests/graph/test_budgets.py
    tests it), to compare their cost and what they write."""
    application = create_app(
        make_settings(
            require_email_verification=True, code_lockout_threshold=1000, **smtp.settings()
        ),
        clock=clock,
    )
    async with application.router.lifespan_context(application):
        yield application


ATTEMPTS_PER_CHALLENGE = 5  # a challenge takes five codes, right or wrong
CHECKS_PER_CLIENT = 10  # wrong codes per account and client in 15 minutes
PAIRS = 120  # timed wrong codes per address (as the request-mutation timing test)
INVALID_OTP = {
    "__typename": "AuthError",
    "code": "INVALID_OTP",
    "message": "The code is incorrect or was already used.",
    "field": "code",
    "retryAfter": None,
}

Answer = Callable[[httpx.AsyncClient, str, str], Awaitable[dict[str, Any]]]


async def wrong_sign_in_code(http: httpx.AsyncClient, token: str, code: str) -> dict[str, Any]:
    return await verify_otp(http, token, code)


async def wrong_reset_code(http: httpx.AsyncClient, token: str, code: str) -> dict[str, Any]:
    return await mutate(
        http,
        RESET_PASSWORD,
        {"i": {"challengeToken": token, "code": code, "newPassword": NEW_PASSWORD}},
    )


# (the request that opens a challenge, the mutation that takes its code, the step the
# LOGIN_FAILED event names)
FLOWS = {
    "verifyOtp": (REQUEST_LOGIN_CODE, wrong_sign_in_code, "email"),
    "resetPassword": (REQUEST_PASSWORD_RESET, wrong_reset_code, "reset"),
}


def wrong(code: str) -> str:
    """A code that is certainly not the one mailed."""
    return f"{(int(code) + 1) % 1_000_000:06d}"


class Codes:
    """Opens challenges for a registered and an unregistered address, one each at a time,
    and knows a wrong code for each: for the registered address one next to the code it
    was mailed (so a guess can never be right by chance), for the unregistered one any
    (its challenge has no code that could match)."""

    def __init__(
        self, http: httpx.AsyncClient, smtp: SmtpSink, request: str, registered: str
    ) -> None:
        self.http = http
        self.smtp = smtp
        self.request = request
        self.registered = registered
        self.mailed = len(smtp.mails(registered))

    async def open(self, unregistered: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """((token, wrong code) for the registered address, (...) for the unregistered)."""
        known = await mutate(self.http, self.request, {"i": {"email": self.registered}})
        unknown = await mutate(self.http, self.request, {"i": {"email": unregistered}})
        assert known["__typename"] == unknown["__typename"] == "OtpChallenge", (known, unknown)
        self.mailed += 1
        code = (await self.smtp.wait_for(self.registered, count=self.mailed)).code()
        return (known["challengeToken"], wrong(code)), (unknown["challengeToken"], "123456")


async def registered_account(http: httpx.AsyncClient, smtp: SmtpSink) -> tuple[str, uuid.UUID]:
    email, session = await signed_up(http, smtp)
    return email, uuid.UUID(session["user"]["id"])


async def failed_sign_ins(statements: Statements) -> list[dict[str, Any]]:
    query = select(
        SecurityEvent.user_id,
        SecurityEvent.email,
        SecurityEvent.ip,
        SecurityEvent.user_agent,
        SecurityEvent.details,
    ).where(SecurityEvent.kind == "LOGIN_FAILED")
    async with statements.connection() as conn:
        return [dict(row) for row in await conn.all(query, {})]


GUESSERS = "198.51.100."  # the clients that guess (mail_client proves the signup's code)


async def code_checks(statements: Statements) -> list[dict[str, Any]]:
    """The wrong-code budgets' rows (keyed 'otp:<account>:<client>', an unknown address's
    account as 'addr:<digest of the address>') of the guessing
    clients (the signup's right code leaves mail_client's row at zero checks)."""
    query = select(
        LoginThrottle.email, LoginThrottle.failures, LoginThrottle.last_failure_at
    ).where(LoginThrottle.email.startswith("otp:"), LoginThrottle.email.contains(GUESSERS))
    async with statements.connection() as conn:
        return [dict(row) for row in await conn.all(query, {})]


def checks_of(rows: list[dict[str, Any]], account: str) -> list[tuple[str, int, Any]]:
    """(client part of the key, checks counted, window start) of one account's rows."""
    prefix = [row for row in rows if account in row["email"]]
    return sorted(
        (row["email"].rsplit(":", 1)[-1], row["failures"], row["last_failure_at"]) for row in prefix
    )


def addressed(events: list[dict[str, Any]], address: str) -> list[dict[str, Any]]:
    return [event for event in events if event["email"] == address]


# -- the same answer and the same rows ---------------------------------------------------------


@pytest.mark.parametrize("flow", list(FLOWS))
async def test_a_wrong_code_answers_and_writes_the_same_either_way(
    flow: str,
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    statements: Statements,
) -> None:
    """Per wrong code, for a registered and an unregistered address alike: the same
    INVALID_OTP, one LOGIN_FAILED event naming the address, one check of the account's
    budget for this client; the eleventh wrong code from one client is refused alike,
    while another client still has its own budget."""
    request, answer, step = FLOWS[flow]
    registered, user_id = await registered_account(mail_client, smtp)
    unregistered = unique_email()
    codes = Codes(mail_client, smtp, request, registered)
    ip = f"{GUESSERS}20"
    async with client_for(mail_app, ip=ip) as guesser:
        (known, known_code), (unknown, unknown_code) = await codes.open(unregistered)
        first = await answer(guesser, known, known_code)
        second = await answer(guesser, unknown, unknown_code)
        assert first == second == INVALID_OTP

        events = await failed_sign_ins(statements)
        details = f'{{"step":"{step}"}}'
        assert addressed(events, registered) == [
            {
                "user_id": user_id,
                "email": registered,
                "ip": ip,
                "user_agent": "pytest",
                "details": details,
            }
        ]
        assert addressed(events, unregistered) == [
            {
                "user_id": None,
                "email": unregistered,
                "ip": ip,
                "user_agent": "pytest",
                "details": details,
            }
        ]
        checks = await code_checks(statements)
        assert len(checks) == 2, checks
        assert checks_of(checks, str(user_id)) == checks_of(checks, address_digest(unregistered))
        assert [
            count for _client, count, _since in checks_of(checks, address_digest(unregistered))
        ] == [1]

        # Nine more each (a new challenge every five codes): ten wrong codes from this
        # client, then the account's budget for this client is spent, alike.
        tokens = [(known, known_code, unknown, unknown_code)]
        for guess in range(1, CHECKS_PER_CLIENT + 1):
            if guess % ATTEMPTS_PER_CHALLENGE == 0:
                (k, kc), (u, uc) = await codes.open(unregistered)
                tokens.append((k, kc, u, uc))
            k, kc, u, uc = tokens[-1]
            known_answer = await answer(guesser, k, kc)
            unknown_answer = await answer(guesser, u, uc)
            if guess < CHECKS_PER_CLIENT:
                assert known_answer == unknown_answer == INVALID_OTP, guess
            else:
                assert known_answer == unknown_answer, (known_answer, unknown_answer)
                assert known_answer["code"] == "RATE_LIMITED", known_answer
                assert known_answer["retryAfter"] == 15 * 60, known_answer

    events = await failed_sign_ins(statements)
    assert len(addressed(events, registered)) == len(addressed(events, unregistered))
    assert len(addressed(events, unregistered)) == CHECKS_PER_CLIENT
    checks = await code_checks(statements)
    assert checks_of(checks, str(user_id)) == checks_of(checks, address_digest(unregistered))
    assert [count for _c, count, _s in checks_of(checks, address_digest(unregistered))] == [
        CHECKS_PER_CLIENT
    ]

    # Another client's guesses never spent this one's budget (nor its own): for both.
    k, kc, u, uc = tokens[-1]
    async with client_for(mail_app, ip=f"{GUESSERS}21") as other:
        assert await answer(other, k, kc) == await answer(other, u, uc) == INVALID_OTP
    checks = await code_checks(statements)
    assert checks_of(checks, str(user_id)) == checks_of(checks, address_digest(unregistered))
    assert len(checks) == 4, checks

    # Nothing went to the unregistered address; the registered password still works.
    assert (await login(mail_client, registered, PASSWORD))["__typename"] == "AuthSession"
    assert smtp.mails(unregistered) == []


async def test_wrong_codes_of_both_mutations_spend_one_budget_alike(
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    statements: Statements,
) -> None:
    """The budget is the account's and the client's, across challenges and mutations:
    five wrong sign-in codes and five wrong reset codes spend it, for an unregistered
    address as for a registered one."""
    registered, user_id = await registered_account(mail_client, smtp)
    unregistered = unique_email()
    async with client_for(mail_app, ip=f"{GUESSERS}30") as guesser:
        for request, answer, _step in FLOWS.values():
            codes = Codes(mail_client, smtp, request, registered)
            (known, known_code), (unknown, unknown_code) = await codes.open(unregistered)
            for _ in range(ATTEMPTS_PER_CHALLENGE):
                assert await answer(guesser, known, known_code) == INVALID_OTP
                assert await answer(guesser, unknown, unknown_code) == INVALID_OTP
        # Ten wrong codes, five sign-in and five reset: the eleventh is refused, alike.
        (known, known_code), (unknown, unknown_code) = await codes.open(unregistered)
        last = [
            await answer(guesser, known, known_code),
            await answer(guesser, unknown, unknown_code),
        ]
    assert last[0] == last[1], last
    assert last[0]["code"] == "RATE_LIMITED", last
    events = await failed_sign_ins(statements)
    assert len(addressed(events, registered)) == len(addressed(events, unregistered)) == 10
    checks = await code_checks(statements)
    assert checks_of(checks, str(user_id)) == checks_of(checks, address_digest(unregistered))
    assert len(checks) == 2, checks


# -- the same time ---------------------------------------------------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("flow", list(FLOWS))
async def test_a_wrong_code_takes_the_same_time_either_way(
    flow: str,
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    statements: Statements,
) -> None:
    """120 wrong codes for each address, interleaved (drift hits both alike; which goes
    first alternates), each from a client whose budget for the account is not yet spent
    (ten per client). Every challenge is opened, and its mail delivered, before the
    clock starts, so the sender's rounds and the SMTP server in this process do not
    overlap the requests timed. Compared pair by pair (the median of the pairs' ratios)
    and by the lower quartiles. (Before the fix a wrong reset code wrote nothing either
    way, so its times matched already: there the rows are what told the two apart.)"""
    request, answer, _step = FLOWS[flow]
    registered, user_id = await registered_account(mail_client, smtp)
    unregistered = unique_email()
    codes = Codes(mail_client, smtp, request, registered)
    opened = [await codes.open(unregistered) for _ in range(PAIRS // ATTEMPTS_PER_CHALLENGE)]

    known_times: list[float] = []
    unknown_times: list[float] = []
    answers: list[dict[str, Any]] = []
    for client_number in range(PAIRS // CHECKS_PER_CLIENT):
        async with client_for(mail_app, ip=f"{GUESSERS}{100 + client_number}") as guesser:
            for guess in range(CHECKS_PER_CLIENT):
                pair = client_number * CHECKS_PER_CLIENT + guess
                known, unknown = opened[pair // ATTEMPTS_PER_CHALLENGE]
                timed = [(known, known_times), (unknown, unknown_times)]
                for (token, code), times in timed if pair % 2 == 0 else timed[::-1]:
                    start = time.perf_counter()
                    answers.append(await answer(guesser, token, code))
                    times.append(time.perf_counter() - start)

    assert all(given == INVALID_OTP for given in answers), {str(a) for a in answers}
    # Each registered time over the unregistered one timed beside it: drift and load
    # hit a pair alike, so the median of the pairs' ratios is the tightest measure (the
    # old code's extra event write made it about 1.4; here it stays within 0.97-1.04,
    # with a CPU-bound process beside the test too).
    paired = statistics.median(k / u for k, u in zip(known_times, unknown_times, strict=True))
    # The lower quartiles, as the request-mutation timing test compares them: what the
    # work costs when nothing else interferes, with that test's margin for a noisy host.
    lower = lower_quartile(known_times) / lower_quartile(unknown_times)
    middle = statistics.median(known_times) / statistics.median(unknown_times)
    measured = f"{flow}: pairs {paired:.3f}, lower quartiles {lower:.3f}, medians {middle:.3f}"
    print(measured)
    assert 0.9 < paired < 1.1, measured
    assert 0.83 < lower < 1.2, measured

    # The same rows behind every answer.
    events = await failed_sign_ins(statements)
    assert len(addressed(events, registered)) == len(addressed(events, unregistered)) == PAIRS
    checks = await code_checks(statements)
    assert checks_of(checks, str(user_id)) == checks_of(checks, address_digest(unregistered))
    assert len(checks) == 2 * PAIRS // CHECKS_PER_CLIENT


def lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0]
