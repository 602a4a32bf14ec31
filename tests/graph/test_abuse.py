"""Abuse resistance as clients and attackers meet it: limits decided before any hash and
counted per operation, the lockout's steps and every way out of it, device tokens, mail
caps, refresh budgets, and a flood that stops neither the owner nor the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from db.settings import RateLimits, Settings
from graph.app import create_app
from tests.conftest import PASSWORD, UNLIMITED, MutableClock, client_for, unique_email
from tests.gql import (
    LOGOUT,
    REQUEST_LOGIN_CODE,
    SESSION_FIELDS,
    gql,
    login,
    mutate,
    refresh,
    signup,
    verify_otp,
)
from tests.smtp import SmtpSink

WRONG = "not the password at all"
LOGIN_WITH_DEVICE = (
    f"mutation($i: LoginInput!) {{ login(input: $i) {{ {SESSION_FIELDS}"
    " ... on AuthSession { deviceToken } } }"
)


def limits(**overrides: str) -> RateLimits:
    return UNLIMITED.model_copy(update=overrides)


@asynccontextmanager
async def running(settings: Settings, clock: MutableClock) -> AsyncIterator[Starlette]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


class CountingHashes:
    """Counts the password checks the app's hasher runs (verify, dummy verify, hash)."""

    def __init__(self, app: Starlette) -> None:
        self.count = 0
        hasher = app.state.services.auth.hasher
        for name in ("verify", "verify_dummy", "hash"):
            original = getattr(hasher, name)

            def counted(*args: Any, _original: Any = original) -> Any:
                self.count += 1
                return _original(*args)

            setattr(hasher, name, counted)


async def device_login(
    http: httpx.AsyncClient, email: str, password: str, device_token: str | None = None
) -> dict[str, Any]:
    variables: dict[str, Any] = {"email": email, "password": password}
    if device_token is not None:
        variables["deviceToken"] = device_token
    body = await gql(http, LOGIN_WITH_DEVICE, {"i": variables})
    result: dict[str, Any] = body["data"]["login"]
    return result


# -- limits, counted per operation and before any hash -----------------------------------


async def test_over_the_limit_is_rate_limited_before_any_hash(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    store: dict[str, Any],
) -> None:
    settings = make_settings(rate_limits=limits(login_ip="3/minute"), **store)
    async with running(settings, clock) as app, client_for(app) as http:
        email = unique_email()
        await signup(http, email, PASSWORD)
        hashes = CountingHashes(app)
        for _ in range(3):
            assert (await login(http, email, WRONG))["code"] == "INVALID_CREDENTIALS"
        refused = await login(http, email, PASSWORD)
        assert refused["code"] == "RATE_LIMITED"
        assert 1 <= refused["retryAfter"] <= 60
        assert hashes.count == 3
        # Another address has a budget of its own.
        async with client_for(app, ip="198.51.100.9") as other:
            assert (await login(other, email, PASSWORD))["__typename"] == "AuthSession"


async def test_aliased_fields_each_count(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    store: dict[str, Any],
) -> None:
    """60 aliased logins in one document: as many password checks as the budget allows,
    the rest RATE_LIMITED; the same through fragments."""
    settings = make_settings(
        rate_limits=limits(login_ip="10/minute"),
        max_aliases=100,
        lockout_threshold=100,
        **store,
    )
    async with running(settings, clock) as app, client_for(app) as http:
        email = unique_email()
        await signup(http, email, PASSWORD)
        hashes = CountingHashes(app)
        fields = " ".join(
            f'l{n}: login(input: {{email: "{email}", password: "guess {n}"}})'
            " { ... on AuthError { code } }"
            for n in range(60)
        )
        body = await gql(http, f"mutation {{ {fields} }}")
        codes = [answer["code"] for answer in body["data"].values()]
        assert codes.count("INVALID_CREDENTIALS") == 10
        assert codes.count("RATE_LIMITED") == 50
        assert hashes.count == 10

        spread = (
            "mutation { ...A ...B } "
            f'fragment A on Mutation {{ a: login(input: {{email: "{email}", password: "x1"}})'
            " { ... on AuthError { code } } }"
            f' fragment B on Mutation {{ b: login(input: {{email: "{email}", password: "x2"}})'
            " { ... on AuthError { code } } }"
        )
        body = await gql(http, spread)
        assert [a["code"] for a in body["data"].values()] == ["RATE_LIMITED", "RATE_LIMITED"]
        assert hashes.count == 10


async def test_too_many_aliases_refuse_the_document_whole(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    async with running(make_settings(), clock) as app, client_for(app) as http:
        hashes = CountingHashes(app)
        fields = " ".join(
            f'l{n}: login(input: {{email: "a@example.com", password: "p{n}"}}) {{ __typename }}'
            for n in range(60)
        )
        response = await http.post("/graphql", json={"query": f"mutation {{ {fields} }}"})
        assert response.status_code in (200, 400)
        assert response.json()["errors"]
        assert hashes.count == 0


# -- the lockout -------------------------------------------------------------------------------


async def test_the_lockout_steps_up_and_a_success_clears_it(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    for _ in range(5):
        assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    # The fifth failure locked the address for 30 s: even the right password waits.
    locked = await login(client, email, PASSWORD)
    assert (locked["code"], locked["retryAfter"]) == ("RATE_LIMITED", 30)
    clock.advance(seconds=30)
    assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, PASSWORD))["retryAfter"] == 60  # doubled
    clock.advance(seconds=60)
    assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, PASSWORD))["retryAfter"] == 120
    clock.advance(seconds=120)
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"
    # The success cleared the count: one wrong password locks nothing now.
    assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_the_lockout_is_capped_and_forgotten_after_a_quiet_period(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    for _ in range(5):
        await login(client, email, WRONG)
    steps = []
    for _ in range(7):
        locked = await login(client, email, PASSWORD)
        assert locked["code"] == "RATE_LIMITED"
        steps.append(locked["retryAfter"])
        clock.advance(seconds=locked["retryAfter"])
        assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert steps == [30, 60, 120, 240, 480, 900, 900]  # doubling, capped at 15 minutes
    clock.advance(seconds=3600)  # an hour without a failure
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_the_lockout_says_nothing_about_registration(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    registered, unknown = unique_email(), unique_email()
    await signup(client, registered, PASSWORD)
    answers: dict[str, list[Any]] = {registered: [], unknown: []}
    for email, seen in answers.items():
        for _ in range(6):
            answer = await login(client, email, WRONG)
            seen.append((answer["code"], answer["retryAfter"]))
    assert answers[registered] == answers[unknown]
    assert answers[unknown][-1] == ("RATE_LIMITED", 30)


async def test_a_device_token_keeps_its_own_budget_through_a_lockout(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    first = await device_login(client, email, PASSWORD)
    device = first["deviceToken"]
    assert device
    other = unique_email()
    await signup(client, other, PASSWORD)
    foreign = (await device_login(client, other, PASSWORD))["deviceToken"]
    async with client_for(client._transport.app, ip="192.0.2.66") as stranger:  # type: ignore[attr-defined]
        for _ in range(8):
            await login(stranger, email, WRONG)
        assert (await login(stranger, email, PASSWORD))["code"] == "RATE_LIMITED"
    # A token of another account, or a forged one, is worth nothing here.
    assert (await device_login(client, email, PASSWORD, foreign))["code"] == "RATE_LIMITED"
    forged = device[:-4] + ("AAAA" if not device.endswith("AAAA") else "BBBB")
    assert (await device_login(client, email, PASSWORD, forged))["code"] == "RATE_LIMITED"
    # The owner's client, with its device token, is not held up (and its success clears
    # the count, as any success does).
    again = await device_login(client, email, PASSWORD, device)
    assert again["__typename"] == "AuthSession"
    assert again["deviceToken"]


async def test_logout_everywhere_and_a_reset_end_device_tokens(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    session = await device_login(client, email, PASSWORD)
    device = session["deviceToken"]
    body = await gql(
        client, LOGOUT, {"i": {"refreshToken": session["refreshToken"], "everywhere": True}}
    )
    assert body["data"]["logout"]["revoked"] >= 1
    for _ in range(5):
        await login(client, email, WRONG)
    assert (await device_login(client, email, PASSWORD, device))["code"] == "RATE_LIMITED"


async def test_device_tokens_expire_after_ninety_days(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    device = (await device_login(client, email, PASSWORD))["deviceToken"]
    clock.advance(days=91)
    for _ in range(5):
        await login(client, email, WRONG)
    assert (await device_login(client, email, PASSWORD, device))["code"] == "RATE_LIMITED"


async def test_an_emailed_code_reaches_the_owner_during_a_lockout(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email = unique_email()
    challenge = await signup(mail_client, email, PASSWORD)
    code = (await smtp.wait_for(email)).code()
    await verify_otp(mail_client, challenge["challengeToken"], code)
    for _ in range(6):
        await login(mail_client, email, WRONG)
    assert (await login(mail_client, email, PASSWORD))["code"] == "RATE_LIMITED"
    sign_in = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    code = (await smtp.wait_for(email, count=2)).code()
    session = await verify_otp(mail_client, sign_in["challengeToken"], code)
    assert session["__typename"] == "AuthSession"


# -- mail caps, refresh budgets ---------------------------------------------------------------


async def test_code_mails_are_capped_but_the_answers_are_not(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    settings = make_settings(rate_limits=limits(code_mail_account="2/hour"), **smtp.settings())
    async with (
        running(settings, clock) as _app,
        client_for(_app) as http,
        # Not the account's own network (that one is not held to the ceiling).
        client_for(_app, ip="198.51.100.60") as stranger,
    ):
        email = unique_email()
        await signup(http, email, PASSWORD)
        answers = [
            await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}}) for _ in range(4)
        ]
        assert {a["__typename"] for a in answers} == {"OtpChallenge"}
        assert {a["expiresIn"] for a in answers} == {600}
        await smtp.wait_for(email, count=2)
        await asyncio.sleep(0.3)  # the other two would be out by now (delivery is < 0.2 s)
        assert len(smtp.mails(email)) == 2


async def test_refresh_leaves_room_for_real_clients(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    store: dict[str, Any],
) -> None:
    settings = make_settings(rate_limits=limits(refresh_session="30/minute"), **store)
    async with running(settings, clock) as app, client_for(app) as http:
        session = await signup(http, unique_email(), PASSWORD)
        token = session["refreshToken"]
        for _ in range(30):
            rotated = await refresh(http, token)
            assert rotated["__typename"] == "AuthSession"
            # A retry of the spent token inside the reuse interval is answered again and
            # does not count.
            assert (await refresh(http, token))["refreshToken"] == rotated["refreshToken"]
            token = rotated["refreshToken"]
        over = await refresh(http, token)
        assert over["code"] == "RATE_LIMITED" and over["retryAfter"] >= 1


# -- a flood ------------------------------------------------------------------------------------


async def test_a_flood_of_failed_logins_stops_neither_the_owner_nor_the_server(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    email = unique_email()
    await signup(client, email, PASSWORD)
    device = (await device_login(client, email, PASSWORD))["deviceToken"]
    hashes = CountingHashes(app)
    attackers = [client_for(app, ip=f"10.{n // 250}.{n % 250}.1") for n in range(100)]
    answers: list[dict[str, Any]] = []
    try:
        for wave in range(10):  # 10 waves of 100 at once, each from 100 addresses
            answers += await asyncio.gather(
                *(login(attackers[n], email, f"guess {wave}-{n}") for n in range(100))
            )
    finally:
        for attacker in attackers:
            await attacker.aclose()
    codes = [answer["code"] for answer in answers]
    assert set(codes) <= {"INVALID_CREDENTIALS", "RATE_LIMITED"}
    # The lockout refuses before any hash: once the first wave has locked the address,
    # the other nine cost no hash at all (within the first, the hasher's queue bounds it).
    assert codes.count("RATE_LIMITED") >= 900
    assert hashes.count <= 100
    assert (await client.get("/healthz")).status_code == 200
    owner = await device_login(client, email, PASSWORD, device)
    assert owner["__typename"] == "AuthSession"


async def test_without_redis_the_limits_degrade_to_memory_not_to_failure(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    """A configured Redis that is away: sign-ins still work (and are still limited, per
    process), /readyz says so."""
    import socket as sockets

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = make_settings(
        rate_limits=limits(login_ip="2/minute"), redis_url=f"redis://127.0.0.1:{dead_port}/0"
    )
    async with running(settings, clock) as app, client_for(app) as http:
        email = unique_email()
        await signup(http, email, PASSWORD)
        assert (await login(http, email, PASSWORD))["__typename"] == "AuthSession"
        assert (await login(http, email, PASSWORD))["__typename"] == "AuthSession"
        assert (await login(http, email, PASSWORD))["code"] == "RATE_LIMITED"
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready (degraded)",
            "rate_limits": "memory (redis unreachable)",
            "mail": "ok",
        }


# -- wrong codes per client, batches, device cookies, pruning ------------------------------


async def test_another_clients_wrong_codes_never_refuse_the_owners_right_one(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """Someone with the password (a phished one, say) guesses TOTP codes from elsewhere
    until refused; the owner's right code on the owner's challenge still signs in."""
    from tests.graph.test_mfa import challenge, code_at, enrolled

    email, _token, secret, _codes = await enrolled(client, clock)
    app = client._transport.app  # type: ignore[attr-defined]
    async with client_for(app, ip="192.0.2.200") as intruder:
        answers = []
        for n in range(12):
            token = await challenge(intruder, email)
            answers.append((await verify_otp(intruder, token, f"{n:06d}"))["code"])
        assert answers.count("RATE_LIMITED") >= 1, answers  # that client is refused
    mine = await challenge(client, email)
    session = await verify_otp(client, mine, code_at(secret, clock))
    assert session["__typename"] == "AuthSession"


async def test_each_operation_of_a_batch_counts(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(rate_limits=limits(login_ip="2/minute"), batching=True)
    async with running(settings, clock) as app, client_for(app) as http:
        email = unique_email()
        await signup(http, email, PASSWORD)
        one = {
            "query": "mutation($i: LoginInput!) { login(input: $i) {"
            " __typename ... on AuthError { code } } }",
            "variables": {"i": {"email": email, "password": PASSWORD}},
        }
        response = await http.post("/graphql", json=[one, one, one])
        assert response.status_code == 200, response.text
        kinds = [a["data"]["login"].get("code") or "AuthSession" for a in response.json()]
        assert kinds == ["AuthSession", "AuthSession", "RATE_LIMITED"]


async def test_browsers_keep_the_device_token_in_an_httponly_cookie(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(device_token_transport="cookie")
    async with running(settings, clock) as app, client_for(app) as browser:
        email = unique_email()
        await signup(browser, email, PASSWORD)
        response = await browser.post(
            "/graphql",
            json={
                "query": LOGIN_WITH_DEVICE,
                "variables": {"i": {"email": email, "password": PASSWORD}},
            },
        )
        answer = response.json()["data"]["login"]
        assert answer["__typename"] == "AuthSession"
        assert answer["deviceToken"] is None  # never reaches JavaScript
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("strawgate_device=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/graphql" in cookie
        async with client_for(app, ip="192.0.2.77") as stranger:
            for _ in range(6):
                await login(stranger, email, WRONG)
        # The browser sends its cookie back by itself: not held up by the lockout.
        assert (await login(browser, email, PASSWORD))["__typename"] == "AuthSession"


async def test_housekeeping_prunes_old_events_and_ended_sessions(
    app: Starlette, client: httpx.AsyncClient, clock: MutableClock, database_url: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    email = unique_email()
    session = await signup(client, email, PASSWORD)
    await gql(client, LOGOUT, {"i": {"refreshToken": session["refreshToken"]}})

    async def count(table: str) -> int:
        engine = create_async_engine(database_url)
        async with engine.connect() as conn:
            found = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()  # noqa: S608
        await engine.dispose()
        return int(found)

    assert await count("security_events") >= 3 and await count("sessions") == 1
    # The app's own pass (it runs one as it starts) holds the one-process lock while it
    # lasts: stopped, so that the passes below are the test's.
    await app.state.housekeeper.stop()
    clock.advance(days=31)
    pruned = await app.state.housekeeper.run_once()
    assert pruned.ended_sessions == 1 and await count("sessions") == 0
    assert await count("security_events") >= 3  # kept a year
    clock.advance(days=366)
    pruned = await app.state.housekeeper.run_once()
    assert pruned.security_events >= 3 and await count("security_events") == 0


async def test_metrics_show_where_the_limits_count_to_operators_only(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    import socket as sockets

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = make_settings(
        rate_limits=limits(login_ip="1/minute"),
        redis_url=f"redis://127.0.0.1:{dead_port}/0",
        metrics_token="operator-token-0123456789",
    )
    async with running(settings, clock) as app:
        async with client_for(app, ip="127.0.0.1") as local:
            email = unique_email()
            await signup(local, email, PASSWORD)
            await login(local, email, PASSWORD)
            assert (await login(local, email, PASSWORD))["code"] == "RATE_LIMITED"
            text = (await local.get("/metrics")).text
            assert 'strawgate_rate_limit_store{store="memory (redis unreachable)"} 1.0' in text
            assert "strawgate_rate_limit_degraded 1.0" in text
            assert 'strawgate_rate_limited_total{limit="login_ip"} 1.0' in text
        async with client_for(app, ip="203.0.113.50") as outsider:
            assert (await outsider.get("/metrics")).status_code == 404
            with_token = await outsider.get(
                "/metrics", headers={"authorization": "Bearer operator-token-0123456789"}
            )
            assert with_token.status_code == 200
            wrong = await outsider.get("/metrics", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 404


# Each limited mutation refuses its second call in a minute when its address limit is 1.
PER_ADDRESS = {
    "signup_ip": ("signup", 'signup(input: {email: "EMAIL", password: "PW"})'),
    "login_ip": ("login", 'login(input: {email: "EMAIL", password: "PW"})'),
    "verify_otp_ip": ("verifyOtp", 'verifyOtp(input: {challengeToken: "x", code: "123456"})'),
    "refresh_ip": ("refresh", 'refresh(input: {refreshToken: "x"})'),
    "request_login_code_ip": ("requestLoginCode", 'requestLoginCode(input: {email: "EMAIL"})'),
    "request_password_reset_ip": (
        "requestPasswordReset",
        'requestPasswordReset(input: {email: "EMAIL"})',
    ),
    "resend_otp_ip": ("resendOtp", 'resendOtp(input: {challengeToken: "x"})'),
    "reset_password_ip": (
        "resetPassword",
        'resetPassword(input: {challengeToken: "x", code: "123456", newPassword: "NEWPW"})',
    ),
    "request_email_verification_ip": ("requestEmailVerification", "requestEmailVerification"),
    "change_password_ip": (
        "changePassword",
        'changePassword(input: {currentPassword: "PW", newPassword: "NEWPW"})',
    ),
    "confirm_totp_ip": ("confirmTotp", 'confirmTotp(input: {code: "123456"})'),
    "disable_totp_ip": ("disableTotp", 'disableTotp(input: {password: "PW", code: "123456"})'),
    "regenerate_recovery_codes_ip": (
        "regenerateRecoveryCodes",
        'regenerateRecoveryCodes(input: {code: "123456"})',
    ),
}


@pytest.mark.parametrize("limit", sorted(PER_ADDRESS))
async def test_every_limited_mutation_counts_per_address(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, limit: str
) -> None:
    field, call = PER_ADDRESS[limit]
    settings = make_settings(rate_limits=limits(**{limit: "1/minute"}))
    async with running(settings, clock) as app, client_for(app) as http:
        email = unique_email()
        token = (await signup(http, email, PASSWORD))["accessToken"]
        document = (
            "mutation { "
            + call.replace("EMAIL", email)
            .replace("NEWPW", "another long passphrase")
            .replace("PW", PASSWORD)
            + " { __typename ... on AuthError { code retryAfter } } }"
        )
        if field == "signup":  # the signup above spent the budget already
            document = document.replace(email, unique_email())
        else:
            first = await gql(http, document, token=token)
            assert first["data"][field].get("code") != "RATE_LIMITED", first
        second = await gql(http, document, token=token)
        answer = second["data"][field]
        assert answer["code"] == "RATE_LIMITED", (limit, second)
        assert 1 <= answer["retryAfter"] <= 60
        async with client_for(app, ip="198.51.100.23") as elsewhere:
            other = await gql(elsewhere, document.replace(email, unique_email()), token=token)
            assert other["data"][field].get("code") != "RATE_LIMITED", other


async def test_a_password_reset_ends_device_tokens(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    from tests.gql import REQUEST_PASSWORD_RESET, RESET_PASSWORD

    email = unique_email()
    challenge = await signup(mail_client, email, PASSWORD)
    code = (await smtp.wait_for(email)).code()
    await verify_otp(mail_client, challenge["challengeToken"], code)
    device = (await device_login(mail_client, email, PASSWORD))["deviceToken"]
    reset = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    code = (await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset"))).code()
    new_password = "the owner's new passphrase"
    done = await mutate(
        mail_client,
        RESET_PASSWORD,
        {
            "i": {
                "challengeToken": reset["challengeToken"],
                "code": code,
                "newPassword": new_password,
            }
        },
    )
    assert done["__typename"] == "AuthSession"
    for _ in range(5):
        await login(mail_client, email, WRONG)
    # The token from before the reset is worth nothing now.
    stale = await device_login(mail_client, email, new_password, device)
    assert stale["code"] == "RATE_LIMITED"
