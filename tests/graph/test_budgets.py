"""Budgets that hold (issue 12), through the GraphQL API on PostgreSQL: a stranger's
flood keeps neither the owner's codes from arriving nor floods the address; every mail
that carries a code counts, per requesting network and per address; wrong codes count
per account and client, across challenges, and a device token buys a budget of its own
only for the account and session it was issued with; password checks sent at once stay
under the lockout's threshold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from jose import jwt
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette

from db.settings import RateLimits, Settings
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHALLENGE_FIELDS,
    REQUEST_EMAIL_VERIFICATION,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESEND_OTP,
    RESET_PASSWORD,
    REVOKE_SESSION,
    SESSION_FIELDS,
    SESSIONS,
    gql,
    login,
    logout,
    mutate,
    refresh,
    signed_up,
    signup,
    verify_otp,
)
from tests.graph.test_abuse import WRONG, CountingHashes, device_login, limits, running
from tests.graph.test_mfa import challenge, code_at, enrolled
from tests.smtp import CODE_LINE, Delivered, SmtpSink

SHIPPED = RateLimits()
NEW_PASSWORD = "a different horse, battery and staple"

VERIFY_WITH_DEVICE = (
    f"mutation($i: VerifyOtpInput!) {{ verifyOtp(input: $i) {{ {SESSION_FIELDS}"
    " ... on AuthSession { deviceToken } } }"
)
CHANGE_PASSWORD_WITH_DEVICE = (
    f"mutation($i: ChangePasswordInput!) {{ changePassword(input: $i) {{ {SESSION_FIELDS}"
    " ... on AuthSession { deviceToken } } }"
)
REFRESH_WITH_DEVICE = (
    f"mutation($i: RefreshInput!) {{ refresh(input: $i) {{ {SESSION_FIELDS}"
    " ... on AuthSession { deviceToken } } }"
)
REAUTHENTICATE = (
    f"mutation($i: ReauthenticateInput!) {{ reauthenticate(input: $i) {{ {SESSION_FIELDS} }} }}"
)
CHANGE_EMAIL = (
    f"mutation($i: ChangeEmailInput!) {{ changeEmail(input: $i) {{ {CHALLENGE_FIELDS} }} }}"
)

# The mails that carry a code (db/services/challenges.py CODE_TEMPLATES).
_CODE_MAILS = text(
    "SELECT count(*) AS queued,"
    " count(*) FILTER (WHERE next_attempt_at IS NOT NULL) AS pending,"
    " count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed"
    " FROM outbox WHERE recipient = :recipient AND template IN"
    " ('verify_email', 'login_code', 'password_reset_code', 'change_email_code',"
    " 'reauthenticate_code')"
)


def shipped_mail_budgets(**overrides: str) -> RateLimits:
    """Every limit out of the way but the two code-mail budgets, as they ship."""
    return limits(
        code_mail_client=SHIPPED.code_mail_client,
        code_mail_account=SHIPPED.code_mail_account,
        **overrides,
    )


@pytest.fixture
async def db(database_url: str, clean_db: None) -> AsyncIterator[AsyncEngine]:
    """The test's own connection to the database: to count what the outbox holds."""
    engine = create_async_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def carries_a_code(mail: Delivered) -> bool:
    return CODE_LINE.search(mail.text()) is not None


def code_mails(smtp: SmtpSink, email: str) -> list[Delivered]:
    """The mails delivered to `email` that carry a code (notices carry none)."""
    return [m for m in smtp.mails(email) if carries_a_code(m)]


async def settled_code_mails(db: AsyncEngine, smtp: SmtpSink, email: str) -> int:
    """How many code mails went to `email`, once every one queued for it is delivered:
    the outbox's count (a decoy queues nothing), checked against what the SMTP server
    received. Waits (boundedly) for delivery, never for time to pass."""
    deadline = time.monotonic() + 10.0
    while True:
        async with db.connect() as conn:
            row = (await conn.execute(_CODE_MAILS, {"recipient": email})).one()
        if row.pending == 0:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{row.pending} code mails to {email} still unsent")
        await asyncio.sleep(0.02)
    assert row.failed == 0, row
    delivered = code_mails(smtp, email)
    assert len(delivered) == row.queued, (len(delivered), row.queued)
    return int(row.queued)


def other_codes(code: str, count: int) -> list[str]:
    """`count` six-digit codes that are not `code`."""
    return [f"{(int(code) + n) % 1_000_000:06d}" for n in range(1, count + 1)]


def wrong_totp_codes(secret: str, clock: MutableClock, count: int) -> list[str]:
    """Codes no step near the server's now has."""
    near = {code_at(secret, clock, steps) for steps in range(-3, 4)}
    return [c for c in (f"{n:06d}" for n in range(100)) if c not in near][:count]


def kind(answer: dict[str, Any]) -> str:
    return str(answer.get("code") or answer["__typename"])


async def lock(app: Starlette, email: str) -> None:
    """A stranger (no password, no mailbox) guesses until the address is locked."""
    async with client_for(app, ip="198.51.100.250") as stranger:
        for _ in range(10):
            answer = await login(stranger, email, WRONG)
            if answer["code"] == "RATE_LIMITED":
                return
            assert answer["code"] == "INVALID_CREDENTIALS", answer
    raise AssertionError("ten wrong passwords did not lock the address")


# -- 1. the owner's codes still arrive; a flood to one address stays bounded -------------


async def spend_a_network(
    app: Starlette, clock: MutableClock, addresses: list[str], email: str
) -> list[dict[str, Any]]:
    """From one network, as many code mails to `email` as it can ask for: two sign-in
    codes and two reset codes from its first address, then (a minute on, the resend
    interval) a new code for each of those challenges from its last address."""
    answers: list[dict[str, Any]] = []
    async with client_for(app, ip=addresses[0]) as http:
        for query in (REQUEST_LOGIN_CODE, REQUEST_PASSWORD_RESET) * 2:
            answers.append(await mutate(http, query, {"i": {"email": email}}))
    clock.advance(seconds=61)
    async with client_for(app, ip=addresses[-1]) as http:
        for token in [a["challengeToken"] for a in answers]:
            answers.append(await mutate(http, RESEND_OTP, {"i": {"challengeToken": token}}))
    return answers


# Ten networks a stranger asks from: eight /24s, a /24 from two of its addresses, and an
# IPv6 /64 from two of its addresses (a network's budget is shared by all of them).
STRANGER_NETWORKS = [
    *([f"198.51.{n}.7"] for n in range(1, 9)),
    ["198.51.9.7", "198.51.9.200"],
    ["2001:db8:5:6::1", "2001:db8:5:6:ffff:ffff:ffff:fffe"],
]


async def test_the_owners_code_arrives_through_a_strangers_flood(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
    db: AsyncEngine,
    store: dict[str, Any],
) -> None:
    """A stranger without the password or the mailbox locks the password sign-in and asks
    for codes from ten networks, as many as each allows; the owner, from an eleventh
    network, still gets a sign-in code mailed and signs in with it."""
    settings = make_settings(
        require_email_verification=True,
        rate_limits=shipped_mail_budgets(),
        **smtp.settings(),
        **store,
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, _session = await signed_up(home, smtp)
        assert await settled_code_mails(db, smtp, email) == 1
        await lock(app, email)
        assert (await login(home, email, PASSWORD))["code"] == "RATE_LIMITED"

        mailed = 1
        for network in STRANGER_NETWORKS:
            answers = await spend_a_network(app, clock, network, email)
            assert {(a["__typename"], a["method"]) for a in answers} == {("OtpChallenge", "EMAIL")}
            now_mailed = await settled_code_mails(db, smtp, email)
            # Eight asked for, five mailed: the network's share (shared by its addresses).
            assert now_mailed - mailed == 5, (network, now_mailed - mailed)
            mailed = now_mailed
        assert mailed == 51

        # Still locked (the clock moved on: a guess locks it again) ...
        await lock(app, email)
        async with client_for(app, ip="192.0.2.11") as owner:
            assert (await login(owner, email, PASSWORD))["code"] == "RATE_LIMITED"
            # ... and yet the owner's sign-in code is mailed, and signs in.
            asked = await mutate(owner, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            assert await settled_code_mails(db, smtp, email) == 52
            code = code_mails(smtp, email)[-1].code()
            session = await verify_otp(owner, asked["challengeToken"], code)
            assert session["__typename"] == "AuthSession", session


async def test_a_mail_flood_to_one_address_stays_bounded(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
    db: AsyncEngine,
    store: dict[str, Any],
) -> None:
    """Twenty networks asking as fast as they are allowed, within the hour: no network
    gets more than its five mails to the address, and the address gets at most sixty
    in all (the one it signed up with included); every answer looks the same."""
    settings = make_settings(
        require_email_verification=True,
        rate_limits=shipped_mail_budgets(),
        **smtp.settings(),
        **store,
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, _session = await signed_up(home, smtp)
        mailed = await settled_code_mails(db, smtp, email)
        assert mailed == 1
        per_network = []
        for n in range(1, 21):
            async with client_for(app, ip=f"198.51.{n}.7") as http:
                answers = await asyncio.gather(
                    *(
                        mutate(http, query, {"i": {"email": email}})
                        for query in (REQUEST_LOGIN_CODE, REQUEST_PASSWORD_RESET) * 4
                    )
                )
            assert {(a["__typename"], a["expiresIn"]) for a in answers} == {("OtpChallenge", 600)}
            now_mailed = await settled_code_mails(db, smtp, email)
            per_network.append(now_mailed - mailed)
            mailed = now_mailed
        assert per_network == [5] * 11 + [4] + [0] * 8, per_network
        assert mailed == 60


# -- 2. every code mail counts --------------------------------------------------------------

ASKING = "198.51.100.77"  # the network every ask comes from


class CodeMailOperation:
    """One way to ask for a mail with a code, set up from home: the account's address,
    the address its mails go to, and the (method, purpose) every ask is answered with."""

    def __init__(self, name: str, clock: MutableClock) -> None:
        self.name = name
        self.clock = clock
        self.email = unique_email()
        self.recipient = unique_email() if name == "change_email" else self.email
        self.token = ""
        self.shape = {
            "login_unverified": ("EMAIL", "VERIFY_EMAIL"),
            "signup_again": ("EMAIL", "VERIFY_EMAIL"),
            "request_login_code": ("EMAIL", "LOGIN"),
            "request_password_reset": ("EMAIL", "RESET_PASSWORD"),
            "request_email_verification": ("EMAIL", "VERIFY_EMAIL"),
            "reauthenticate": ("EMAIL", "REAUTHENTICATE"),
            "change_email": ("EMAIL", "CHANGE_EMAIL"),
        }[name]

    @property
    def verification(self) -> bool:
        """Whether the app requires a proven address (then the account stays unproven)."""
        return self.name in ("login_unverified", "signup_again")

    async def set_up(self, home: httpx.AsyncClient) -> None:
        answer = await signup(home, self.email, PASSWORD)
        if self.verification:
            assert answer["__typename"] == "OtpChallenge", answer
        else:
            assert answer["__typename"] == "AuthSession", answer
            self.token = answer["accessToken"]

    async def ask(self, http: httpx.AsyncClient) -> dict[str, Any]:
        if self.name == "login_unverified":  # the right password, an unproven address
            return await login(http, self.email, PASSWORD)
        if self.name == "signup_again":
            # The pending signup's code has expired: it is made again, and mailed.
            self.clock.advance(minutes=11)
            return await signup(http, self.email, PASSWORD)
        if self.name == "request_login_code":
            return await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": self.email}})
        if self.name == "request_password_reset":
            return await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": self.email}})
        if self.name == "request_email_verification":
            return await mutate(http, REQUEST_EMAIL_VERIFICATION, token=self.token)
        if self.name == "reauthenticate":
            return await mutate(http, REAUTHENTICATE, {"i": {"emailCode": True}}, token=self.token)
        assert self.name == "change_email"
        return await mutate(
            http, CHANGE_EMAIL, {"i": {"newEmail": self.recipient}}, token=self.token
        )


CODE_MAIL_OPERATIONS = [
    "login_unverified",
    "signup_again",
    "request_login_code",
    "request_password_reset",
    "request_email_verification",
    "reauthenticate",
    "change_email",
]


@pytest.mark.parametrize("operation", CODE_MAIL_OPERATIONS)
async def test_every_code_mail_counts_per_network(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
    db: AsyncEngine,
    operation: str,
) -> None:
    """Twenty asks from one network for a mail with a code: five mails, twenty answers
    alike. Code mails from another network (home) spend that network's share, not this
    one's; and a third network still has a share of its own."""
    op = CodeMailOperation(operation, clock)
    settings = make_settings(
        require_email_verification=op.verification,
        rate_limits=shipped_mail_budgets(),
        **smtp.settings(),
    )
    async with AsyncExitStack() as stack:
        app = await stack.enter_async_context(running(settings, clock))
        home = await stack.enter_async_context(client_for(app))
        await op.set_up(home)
        for _ in range(2):  # two sign-in codes to the account's address, from home
            await mutate(home, REQUEST_LOGIN_CODE, {"i": {"email": op.email}})
        before = await settled_code_mails(db, smtp, op.recipient)

        http = await stack.enter_async_context(client_for(app, ip=ASKING))
        answers = []
        for _ in range(20):
            answers.append(await op.ask(http))
            if operation == "signup_again":  # delivered before the clock moves on again
                await settled_code_mails(db, smtp, op.recipient)
        assert {(a["__typename"], a["method"], a["purpose"]) for a in answers} == {
            ("OtpChallenge", *op.shape)
        }, answers
        assert {a["expiresIn"] for a in answers} == {600}
        assert await settled_code_mails(db, smtp, op.recipient) - before == 5

        elsewhere = await stack.enter_async_context(client_for(app, ip="192.0.2.99"))
        assert kind(await op.ask(elsewhere)) == "OtpChallenge"
        assert await settled_code_mails(db, smtp, op.recipient) - before == 6


async def test_resent_codes_count_per_network(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
    db: AsyncEngine,
) -> None:
    """resendOtp from another network than the request's: that network's five mails,
    then answers alike and no mail."""
    settings = make_settings(rate_limits=shipped_mail_budgets(), **smtp.settings())
    async with running(settings, clock) as app, client_for(app) as home:
        email = unique_email()
        assert (await signup(home, email, PASSWORD))["__typename"] == "AuthSession"
        tokens = [
            (await mutate(home, REQUEST_LOGIN_CODE, {"i": {"email": email}}))["challengeToken"]
            for _ in range(3)
        ]
        assert await settled_code_mails(db, smtp, email) == 3
        answers = []
        async with client_for(app, ip=ASKING) as http:
            for _round in range(3):  # each challenge takes three resends, a minute apart
                clock.advance(seconds=61)
                for token in tokens:
                    answers.append(await mutate(http, RESEND_OTP, {"i": {"challengeToken": token}}))
        assert {(a["__typename"], a["purpose"]) for a in answers} == {("OtpChallenge", "LOGIN")}
        assert await settled_code_mails(db, smtp, email) == 3 + 5


# -- 3. wrong emailed codes count per account and client ------------------------------------


async def mailed_challenge(http: httpx.AsyncClient, smtp: SmtpSink, email: str) -> tuple[str, str]:
    """A sign-in code asked for from `http`: its challenge token and the code mailed (the
    requests are one at a time, so the next code mail is this one's)."""
    count = len(code_mails(smtp, email))
    asked = await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=count + 1, where=carries_a_code)
    return str(asked["challengeToken"]), mail.code()


async def test_wrong_emailed_codes_count_per_account_and_client(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> None:
    """Ten wrong codes from one client in fifteen minutes, on fresh challenges (five each):
    the next check is refused, on a fresh challenge too and even with the right code.
    Another client has its own budget, the owner signs in from another address, and
    fifteen minutes later the client's budget is back. (The address's code lockout, which
    counts all clients together, is set out of the way: test_the_code_lockout_* below.)"""
    settings = make_settings(
        require_email_verification=True, code_lockout_threshold=1000, **smtp.settings()
    )
    async with (
        running(settings, clock) as app,
        client_for(app) as owner,
        client_for(app, ip="198.51.100.66") as guesser,
        client_for(app, ip="192.0.2.44") as other,
    ):
        email, _session = await signed_up(owner, smtp)
        answers = []
        for _ in range(2):
            token, code = await mailed_challenge(guesser, smtp, email)
            for wrong in other_codes(code, 5):
                answers.append(kind(await verify_otp(guesser, token, wrong)))
        assert answers == ["INVALID_OTP"] * 10

        token, code = await mailed_challenge(guesser, smtp, email)
        refused = await verify_otp(guesser, token, other_codes(code, 1)[0])
        assert refused["code"] == "RATE_LIMITED", refused
        assert 1 <= refused["retryAfter"] <= 15 * 60
        assert (await verify_otp(guesser, token, code))["code"] == "RATE_LIMITED"

        # Another client's budget is its own; the owner's right code works.
        token, code = await mailed_challenge(other, smtp, email)
        assert kind(await verify_otp(other, token, other_codes(code, 1)[0])) == "INVALID_OTP"
        token, code = await mailed_challenge(owner, smtp, email)
        assert kind(await verify_otp(owner, token, code)) == "AuthSession"

        clock.advance(minutes=15)
        token, code = await mailed_challenge(guesser, smtp, email)
        assert kind(await verify_otp(guesser, token, other_codes(code, 1)[0])) == "INVALID_OTP"
        assert kind(await verify_otp(guesser, token, code)) == "AuthSession"


async def test_wrong_codes_for_an_unknown_address_count_alike(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> None:
    """Sign-in codes asked for an address without an account are checked and counted as
    a registered one's: the eleventh wrong code answers RATE_LIMITED for both."""
    settings = make_settings(require_email_verification=True, **smtp.settings())
    async with (
        running(settings, clock) as app,
        client_for(app) as home,
        client_for(app, ip="198.51.100.66") as guesser,
    ):
        registered, _session = await signed_up(home, smtp)
        unknown = unique_email()
        answers: dict[str, list[str]] = {registered: [], unknown: []}
        for _ in range(3):
            token, code = await mailed_challenge(guesser, smtp, registered)
            for wrong in other_codes(code, 5 if len(answers[registered]) < 10 else 1):
                answers[registered].append(kind(await verify_otp(guesser, token, wrong)))
            asked = await mutate(guesser, REQUEST_LOGIN_CODE, {"i": {"email": unknown}})
            assert asked["__typename"] == "OtpChallenge"
            for wrong in other_codes(code, 5 if len(answers[unknown]) < 10 else 1):
                answers[unknown].append(
                    kind(await verify_otp(guesser, asked["challengeToken"], wrong))
                )
        assert answers[registered] == ["INVALID_OTP"] * 10 + ["RATE_LIMITED"]
        assert answers[unknown] == answers[registered]


# -- 4. a device token is only as good as its owner ---------------------------------------


async def verify_with_device(
    http: httpx.AsyncClient, token: str, code: str, device_token: str | None
) -> dict[str, Any]:
    variables: dict[str, Any] = {"challengeToken": token, "code": code}
    if device_token is not None:
        variables["deviceToken"] = device_token
    body = await gql(http, VERIFY_WITH_DEVICE, {"i": variables})
    result: dict[str, Any] = body["data"]["verifyOtp"]
    return result


async def test_a_device_token_of_another_account_buys_no_wrong_code_budget(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """Someone with the victim's password guesses TOTP codes from one address until
    refused; the device token of their own account changes nothing there. The victim's
    own device token, from that same address, has a budget of its own."""
    app = client._transport.app  # type: ignore[attr-defined]
    victim, _token, secret, _codes = await enrolled(client, clock)
    first = await verify_with_device(
        client, await challenge(client, victim), code_at(secret, clock), None
    )
    assert first["__typename"] == "AuthSession", first
    victims_device = first["deviceToken"]
    assert victims_device
    clock.advance(seconds=30)  # the next step: the one used above is spent

    address = "192.0.2.200"
    async with client_for(app, ip=address) as attacker:
        own = unique_email()
        assert (await signup(attacker, own, PASSWORD))["__typename"] == "AuthSession"
        attackers_device = (await device_login(attacker, own, PASSWORD))["deviceToken"]
        assert attackers_device

        answers = []
        for _ in range(2):
            token = await challenge(attacker, victim)
            for wrong in wrong_totp_codes(secret, clock, 5):
                answers.append(kind(await verify_otp(attacker, token, wrong)))
        assert answers == ["INVALID_OTP"] * 10
        token = await challenge(attacker, victim)
        (wrong,) = wrong_totp_codes(secret, clock, 1)
        assert kind(await verify_otp(attacker, token, wrong)) == "RATE_LIMITED"
        for code in (wrong, code_at(secret, clock)):
            refused = await verify_with_device(attacker, token, code, attackers_device)
            assert kind(refused) == "RATE_LIMITED", refused

    async with client_for(app, ip=address) as victims_client:
        token = await challenge(victims_client, victim)
        wrong_answer = await verify_with_device(victims_client, token, wrong, victims_device)
        assert kind(wrong_answer) == "INVALID_OTP"
        signed_in = await verify_with_device(
            victims_client, token, code_at(secret, clock), victims_device
        )
        assert signed_in["__typename"] == "AuthSession", signed_in


# -- 5. the lockout holds against guesses sent at once ---------------------------------------


async def test_guesses_sent_at_once_get_at_most_the_threshold_of_checks(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """Twenty wrong passwords at once, from twenty addresses: at most five (the lockout
    threshold) are checked, the rest answer RATE_LIMITED without a hash; once the lock
    has run out, twenty at once again get exactly one check."""
    app = client._transport.app  # type: ignore[attr-defined]
    email = unique_email()
    await signup(client, email, PASSWORD)
    hashes = CountingHashes(app)
    async with AsyncExitStack() as stack:
        guessers = [
            await stack.enter_async_context(client_for(app, ip=f"10.1.{n}.1")) for n in range(20)
        ]
        answers = await asyncio.gather(
            *(login(http, email, f"guess {n}") for n, http in enumerate(guessers))
        )
        codes = [a["code"] for a in answers]
        assert set(codes) <= {"INVALID_CREDENTIALS", "RATE_LIMITED"}, answers
        assert 1 <= hashes.count <= 5
        assert codes.count("INVALID_CREDENTIALS") == hashes.count
        # "At once": a second; "locked": the lock's own time.
        assert {a["retryAfter"] for a in answers if a["code"] == "RATE_LIMITED"} <= {1, 30}
        # The guesses locked the address: the owner's right password waits too.
        locked = await login(client, email, PASSWORD)
        assert (locked["code"], locked["retryAfter"]) == ("RATE_LIMITED", 30)
        assert hashes.count == 5

        clock.advance(seconds=30)
        answers = await asyncio.gather(
            *(login(http, email, f"again {n}") for n, http in enumerate(guessers))
        )
        codes = [a["code"] for a in answers]
        assert codes.count("INVALID_CREDENTIALS") == 1, answers
        assert codes.count("RATE_LIMITED") == 19
        assert hashes.count == 6


async def test_right_passwords_sent_at_once_never_lock_the_owner_out(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """Forty sign-ins of the owner at once: each signs in or is asked to retry in a
    second; none locks the address, and the next one signs in."""
    email = unique_email()
    await signup(client, email, PASSWORD)
    answers = await asyncio.gather(*(login(client, email, PASSWORD) for _ in range(40)))
    outcomes = {(a["__typename"], a.get("code"), a.get("retryAfter")) for a in answers}
    assert outcomes <= {("AuthSession", None, None), ("AuthError", "RATE_LIMITED", 1)}, answers
    assert any(a["__typename"] == "AuthSession" for a in answers)
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


# -- 6. ending a session ends its device token ---------------------------------------------

THIEF = "192.0.2.66"


async def sessions_of(http: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    body = await gql(http, SESSIONS, token=token)
    assert "errors" not in body, body
    sessions: list[dict[str, Any]] = body["data"]["sessions"]
    return sessions


async def end_by(
    ending: str,
    *,
    owner: httpx.AsyncClient,
    mine: dict[str, Any],
    thief: httpx.AsyncClient,
    stolen: dict[str, Any],
    email: str,
    smtp: SmtpSink,
    clock: MutableClock,
) -> str:
    """Ends the thief's session `ending`'s way; the password that holds afterwards."""
    if ending == "change_password":
        changed = await mutate(
            owner,
            CHANGE_PASSWORD_WITH_DEVICE,
            {"i": {"currentPassword": None, "newPassword": NEW_PASSWORD}},
            token=mine["accessToken"],
        )
        assert changed["__typename"] == "AuthSession", changed
        return NEW_PASSWORD
    if ending == "revoke_session":
        (theirs,) = [
            s for s in await sessions_of(owner, mine["accessToken"]) if s["ipAddress"] == THIEF
        ]
        revoked = await mutate(
            owner, REVOKE_SESSION, {"i": {"id": theirs["id"]}}, token=mine["accessToken"]
        )
        assert revoked["revoked"] == 1
        return PASSWORD
    if ending == "logout_everywhere":
        assert await logout(owner, mine["refreshToken"], everywhere=True) >= 2
        return PASSWORD
    if ending == "reset_password":
        count = len(code_mails(smtp, email))
        asked = await mutate(owner, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
        mail = await smtp.wait_for(email, count=count + 1, where=carries_a_code)
        reset = await mutate(
            owner,
            RESET_PASSWORD,
            {
                "i": {
                    "challengeToken": asked["challengeToken"],
                    "code": mail.code(),
                    "newPassword": NEW_PASSWORD,
                }
            },
        )
        assert reset["__typename"] == "AuthSession", reset
        return NEW_PASSWORD
    if ending == "refresh_reuse":
        rotated = await refresh(thief, stolen["refreshToken"])
        assert rotated["__typename"] == "AuthSession"
        clock.advance(seconds=11)  # past the reuse interval: the spent token is reuse
        assert (await refresh(thief, stolen["refreshToken"]))["code"] == "TOKEN_REUSED"
        return PASSWORD
    assert ending == "logout"  # the session's own ordinary logout
    assert await logout(thief, stolen["refreshToken"]) == 1
    return PASSWORD


@pytest.mark.parametrize(
    "ending",
    [
        "change_password",
        "revoke_session",
        "logout_everywhere",
        "reset_password",
        "refresh_reuse",
        "logout",
    ],
)
async def test_ending_a_session_ends_its_device_token(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
    ending: str,
) -> None:
    """A thief signed in with the password on a client of their own keeps its device
    token, which lets them past a lockout. Whatever ends that session by revocation ends
    the token: past the lock, a wrong password answers RATE_LIMITED as a stranger's does.
    The session's own ordinary logout leaves it good."""
    async with (
        running(make_settings(**smtp.settings()), clock) as app,
        client_for(app) as owner,
        client_for(app, ip=THIEF) as thief,
    ):
        email = unique_email()
        mine = await signup(owner, email, PASSWORD)
        assert mine["__typename"] == "AuthSession"
        stolen = await device_login(thief, email, PASSWORD)
        device = stolen["deviceToken"]
        assert device

        await lock(app, email)
        assert kind(await device_login(thief, email, WRONG, device)) == "INVALID_CREDENTIALS"

        password = await end_by(
            ending,
            owner=owner,
            mine=mine,
            thief=thief,
            stolen=stolen,
            email=email,
            smtp=smtp,
            clock=clock,
        )
        await lock(app, email)
        after = await device_login(thief, email, WRONG, device)
        if ending == "logout":
            assert kind(after) == "INVALID_CREDENTIALS", after
            assert kind(await device_login(thief, email, password, device)) == "AuthSession"
        else:
            assert kind(after) == "RATE_LIMITED", after
            assert kind(await device_login(thief, email, password, device)) == "RATE_LIMITED"


async def test_a_password_change_hands_the_changing_session_a_working_device_token(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    async with running(make_settings(), clock) as app, client_for(app) as owner:
        email = unique_email()
        mine = await signup(owner, email, PASSWORD)
        changed = await mutate(
            owner,
            CHANGE_PASSWORD_WITH_DEVICE,
            {"i": {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}},
            token=mine["accessToken"],
        )
        assert changed["__typename"] == "AuthSession", changed
        fresh = changed["deviceToken"]
        assert fresh
        await lock(app, email)
        assert kind(await device_login(owner, email, WRONG, fresh)) == "INVALID_CREDENTIALS"
        assert kind(await device_login(owner, email, NEW_PASSWORD, fresh)) == "AuthSession"


async def test_a_token_kept_past_its_sessions_logout_ends_with_a_password_change(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    """A thief who logged out first (a logout keeps the device token good) loses the
    token all the same when the owner changes the password."""
    async with (
        running(make_settings(), clock) as app,
        client_for(app) as owner,
        client_for(app, ip=THIEF) as thief,
    ):
        email = unique_email()
        mine = await signup(owner, email, PASSWORD)
        stolen = await device_login(thief, email, PASSWORD)
        device = stolen["deviceToken"]
        assert await logout(thief, stolen["refreshToken"]) == 1
        await lock(app, email)
        assert kind(await device_login(thief, email, WRONG, device)) == "INVALID_CREDENTIALS"

        changed = await mutate(
            owner,
            CHANGE_PASSWORD_WITH_DEVICE,
            {"i": {"currentPassword": None, "newPassword": NEW_PASSWORD}},
            token=mine["accessToken"],
        )
        assert changed["__typename"] == "AuthSession", changed
        await lock(app, email)
        assert kind(await device_login(thief, email, WRONG, device)) == "RATE_LIMITED"
        assert kind(await device_login(thief, email, NEW_PASSWORD, device)) == "RATE_LIMITED"


# -- the review's findings: beyond the ceiling, guessing from many networks -------------------


async def test_strangers_on_many_networks_cannot_keep_the_owners_own_clients_from_codes(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    smtp: SmtpSink,
    db: AsyncEngine,
) -> None:
    """Twelve IPv6 /64s spend the address's whole ceiling (60 an hour). A brand-new
    network of the owner's gets nothing (the bound on a flood holds), but the owner's own
    clients are not held to the ceiling: a network the account signed in from lately,
    and a client holding a device token good for the account."""
    settings = make_settings(
        require_email_verification=True,
        rate_limits=shipped_mail_budgets(),
        device_token_transport="cookie",
        **smtp.settings(),
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, _session = await signed_up(home, smtp)
        async with client_for(app, ip="192.0.2.80") as travelling:
            device = await device_login(travelling, email, PASSWORD)
            assert device["__typename"] == "AuthSession"
            cookie = travelling.cookies.get("strawgate_device")
            assert cookie
        for n in range(12):
            async with client_for(app, ip=f"2001:db8:aaaa:{n:x}::1") as stranger:
                for _ in range(5):
                    await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        mailed = await settled_code_mails(db, smtp, email)
        assert mailed == 60, mailed  # the signup's code, and 59 of the strangers'
        async with client_for(app, ip="198.18.0.9") as new_network:
            await mutate(new_network, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        assert await settled_code_mails(db, smtp, email) == 60
        # The owner's home network signed in before: its own budget only.
        token, code = await mailed_challenge(home, smtp, email)
        assert kind(await verify_otp(home, token, code)) == "AuthSession"
        # A device token good for the account, from yet another network.
        async with client_for(app, ip="198.18.5.9") as elsewhere:
            elsewhere.cookies.set("strawgate_device", cookie, path="/graphql")
            token, code = await mailed_challenge(elsewhere, smtp, email)
            assert kind(await verify_otp(elsewhere, token, code)) == "AuthSession"


async def test_a_code_nobody_was_sent_never_signs_in(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the address's budget the challenge is made but mailed nowhere: its code must
    not be guessable either (the number of challenges a stranger can guess at is bounded
    by the mails the address gets)."""
    import db.services.challenges as challenges_module

    settings = make_settings(
        require_email_verification=True,
        rate_limits=limits(code_mail_client="1/hour"),
        **smtp.settings(),
    )
    monkeypatch.setattr(challenges_module, "new_email_code", lambda: "424242")
    async with running(settings, clock) as app, client_for(app) as home:
        email, _session = await signed_up(home, smtp)
        async with client_for(app, ip="198.51.100.90") as stranger:
            mailed = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            unmailed = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            refused = await verify_otp(stranger, unmailed["challengeToken"], "424242")
            assert refused["code"] == "INVALID_OTP", refused
            # The mailed one's code works (the same code here): only the mailed one.
            opened = await verify_otp(stranger, mailed["challengeToken"], "424242")
            assert opened["__typename"] == "AuthSession", opened


@pytest.mark.parametrize("registered", [True, False])
async def test_guesses_from_many_networks_stop_at_the_code_lockout(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    db: AsyncEngine,
    smtp: SmtpSink,
    registered: bool,
) -> None:
    """Wrong emailed codes for one address count across every client without a device
    token for the account: a stranger spreading guesses over many networks (each well
    within its own budget) gets CODE_LOCKOUT_THRESHOLD (10) of them, then every code
    check for the address is refused for a lock step, the right code too; an unknown
    address alike. The owner's device token is not held up; a right code clears it."""
    settings = make_settings(require_email_verification=True, **smtp.settings())
    async with running(settings, clock) as app, client_for(app) as home:
        if registered:
            email, _ = await signed_up(home, smtp)
            session = await device_login(home, email, PASSWORD)
            device_token = session["deviceToken"]
        else:
            email = unique_email()
        answers = []
        for n in range(6):  # six networks, two wrong codes each
            async with client_for(app, ip=f"198.51.{100 + n}.7") as stranger:
                asked = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
                for guess in ("000000", "000001"):
                    answers.append(kind(await verify_otp(stranger, asked["challengeToken"], guess)))
        assert answers[:10] == ["INVALID_OTP"] * 10, answers
        assert answers[10:] == ["RATE_LIMITED"] * 2, answers
        async with client_for(app, ip="198.18.7.7") as another:
            asked = await mutate(another, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            refused = await verify_otp(another, asked["challengeToken"], "000002")
            assert (refused["code"], refused["message"]) == (
                "RATE_LIMITED",
                "Too many wrong codes for this address; try again later.",
            )
            assert 1 <= refused["retryAfter"] <= 30
        if not registered:
            return
        await settled_code_mails(db, smtp, email)  # the strangers' codes are all out
        # The owner's device token has its own budget: its right code signs in at once.
        token, code = await mailed_challenge(home, smtp, email)
        held = await mutate(
            home,
            VERIFY_WITH_DEVICE,
            {"i": {"challengeToken": token, "code": code, "deviceToken": device_token}},
        )
        assert held["__typename"] == "AuthSession", held
        # Past the lock step a right code from anywhere works, and clears the count.
        clock.advance(seconds=31)
        async with client_for(app, ip="198.18.8.8") as owner:
            token, code = await mailed_challenge(owner, smtp, email)
            assert kind(await verify_otp(owner, token, code)) == "AuthSession"
            asked = await mutate(owner, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            for _ in range(5):
                wrong = await verify_otp(owner, asked["challengeToken"], "000003")
                assert wrong["code"] == "INVALID_OTP", wrong


# -- the second review's findings --------------------------------------------------------------


async def test_a_refresh_token_thief_guesses_no_faster_than_a_stranger(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> None:
    """Every refresh answer carries a device token issued with that session. Stepping up
    the same session, it counts as no device: the thief is held to the address's lockout
    (which a stranger has shut). Signing in anew with it, the device has a lockout of its
    own (five, then the lock steps), not only its 20 a minute. (Cookie transport: the
    token goes with every request, step-ups included.)"""
    settings = make_settings(
        require_email_verification=True, device_token_transport="cookie", **smtp.settings()
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, session = await signed_up(home, smtp)
        clock.advance(seconds=700)
        await lock(app, email)
        async with client_for(app, ip="2001:db8:5::1") as thief:
            got = await mutate(
                thief, REFRESH_WITH_DEVICE, {"i": {"refreshToken": session["refreshToken"]}}
            )
            assert thief.cookies.get("strawgate_device")  # the session's device token
            token = got["accessToken"]
            step_up = await mutate(thief, REAUTHENTICATE, {"i": {"password": "guess"}}, token=token)
            assert step_up["code"] == "RATE_LIMITED", step_up
            logins = [kind(await device_login(thief, email, f"guess {n}")) for n in range(8)]
            assert logins[:5] == ["INVALID_CREDENTIALS"] * 5, logins
            assert set(logins[5:]) == {"RATE_LIMITED"}, logins


async def test_an_address_asked_for_is_held_to_its_ceiling_whoever_asks(
    make_settings: Callable[..., Settings], clock: MutableClock, smtp: SmtpSink, db: AsyncEngine
) -> None:
    """changeEmail mails the address asked for: no client is that address's own, so the
    ceiling holds however the asking account signed in."""
    settings = make_settings(
        require_email_verification=True,
        rate_limits=limits(code_mail_client=SHIPPED.code_mail_client, code_mail_account="3/hour"),
        **smtp.settings(),
    )
    target = unique_email()
    async with running(settings, clock) as app, client_for(app) as home:
        sessions = [(await signed_up(home, smtp))[1] for _ in range(3)]
        for session in sessions:  # from the accounts' own (known) network
            for _ in range(2):
                asked = await mutate(
                    home,
                    CHANGE_EMAIL,
                    {"i": {"newEmail": target, "password": PASSWORD}},
                    token=session["accessToken"],
                )
                assert asked["__typename"] == "OtpChallenge", asked
        assert await settled_code_mails(db, smtp, target) == 3


async def test_a_revoked_sessions_network_is_not_the_owners(
    make_settings: Callable[..., Settings], clock: MutableClock, smtp: SmtpSink, db: AsyncEngine
) -> None:
    """A thief's session, revoked by the owner, makes no network the owner's: its /48
    is held to the ceiling like any stranger's. A network of the owner's own counts as
    one budget however many /64s ask from it."""
    settings = make_settings(
        require_email_verification=True,
        rate_limits=limits(code_mail_client=SHIPPED.code_mail_client, code_mail_account="10/hour"),
        **smtp.settings(),
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, mine = await signed_up(home, smtp)
        async with client_for(app, ip="2001:db8:66:1::1") as thief:
            stolen = await login(thief, email, PASSWORD)
            assert stolen["__typename"] == "AuthSession"
        sid = jwt.get_unverified_claims(stolen["accessToken"])["sid"]
        revoked = await mutate(home, REVOKE_SESSION, {"i": {"id": sid}}, token=mine["accessToken"])
        assert revoked["revoked"] == 1
        before = await settled_code_mails(db, smtp, email)
        for n in range(2, 8):  # six /64s of the thief's /48, five asks each
            async with client_for(app, ip=f"2001:db8:66:{n:x}::1") as http:
                for _ in range(5):
                    await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        assert await settled_code_mails(db, smtp, email) - before == 10 - before
        # The owner's network (IPv4 /24 here): its own budget of five (the signup's code
        # was one of them), past the spent ceiling.
        async with client_for(app, ip="203.0.113.99") as also_home:
            for _ in range(7):
                await mutate(also_home, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        assert await settled_code_mails(db, smtp, email) == 10 + 4


async def test_a_stranger_cannot_hold_the_owners_own_clients_out_of_code_sign_in(
    make_settings: Callable[..., Settings], clock: MutableClock, smtp: SmtpSink, db: AsyncEngine
) -> None:
    """A stranger keeps the address's code lockout shut; a code the owner's own client
    (a network the account signed in from) asked for is held only to that network's
    lockout, so the owner signs in by code, and resets a password, meanwhile. Strangers
    elsewhere stay locked; and an hour's pause does not buy them fresh guesses."""
    settings = make_settings(require_email_verification=True, **smtp.settings())
    async with running(settings, clock) as app, client_for(app) as home:
        email, _ = await signed_up(home, smtp)
        for n in range(10):
            async with client_for(app, ip=f"2001:db8:98:{n:x}::1") as stranger:
                asked = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
                assert kind(await verify_otp(stranger, asked["challengeToken"], "000000")) == (
                    "INVALID_OTP"
                )
        await settled_code_mails(db, smtp, email)
        token, code = await mailed_challenge(home, smtp, email)
        assert kind(await verify_otp(home, token, code)) == "AuthSession"
        count = len(code_mails(smtp, email))
        asked = await mutate(home, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
        mail = await smtp.wait_for(email, count=count + 1, where=carries_a_code)
        reset = await mutate(
            home,
            RESET_PASSWORD,
            {
                "i": {
                    "challengeToken": asked["challengeToken"],
                    "code": mail.code(),
                    "newPassword": NEW_PASSWORD,
                }
            },
        )
        assert reset["__typename"] == "AuthSession", reset
        # A right code of the owner's own client clears only its own network's count:
        # strangers elsewhere are still locked, an hour on too.
        clock.advance(minutes=61)
        async with client_for(app, ip="2001:db8:97::1") as stranger:
            asked = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            first = kind(await verify_otp(stranger, asked["challengeToken"], "000000"))
            second = kind(await verify_otp(stranger, asked["challengeToken"], "000001"))
        assert (first, second) == ("INVALID_OTP", "RATE_LIMITED")


async def test_a_resend_past_the_budget_leaves_the_mailed_code_working(
    make_settings: Callable[..., Settings], clock: MutableClock, smtp: SmtpSink, db: AsyncEngine
) -> None:
    settings = make_settings(
        require_email_verification=True,
        rate_limits=limits(code_mail_client="1/hour", code_mail_account=SHIPPED.code_mail_account),
        **smtp.settings(),
    )
    async with running(settings, clock) as app, client_for(app) as home:
        email, _ = await signed_up(home, smtp)
        async with client_for(app, ip="198.18.0.9") as travelling:
            token, code = await mailed_challenge(travelling, smtp, email)
            clock.advance(seconds=61)
            resent = await mutate(travelling, RESEND_OTP, {"i": {"challengeToken": token}})
            assert resent["__typename"] == "OtpChallenge"
            assert await settled_code_mails(db, smtp, email) == 2  # the resend was not mailed
            assert kind(await verify_otp(travelling, token, code)) == "AuthSession"
