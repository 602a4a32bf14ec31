"""The embedded default: the same code path on SQLite, with its write lock and UTC times."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import RefreshToken, User
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHANGE_PASSWORD,
    ME,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    SESSIONS,
    gql,
    login,
    mutate,
    refresh,
    signup,
    verify_otp,
)
from tests.smtp import SmtpSink

SIGNUP_WITHOUT_PASSWORD = (
    "mutation($i: SignupInput!) { signup(input: $i) {"
    " __typename ... on OtpChallenge { challengeToken } ... on AuthError { code } } }"
)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"


@pytest.fixture
async def sqlite_client(
    make_settings: Callable[..., Settings], sqlite_url: str, clock: MutableClock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url=sqlite_url), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http


async def test_the_whole_flow_runs_on_sqlite(sqlite_client: httpx.AsyncClient) -> None:
    first = await signup(sqlite_client, unique_email(), PASSWORD)
    assert first["__typename"] == "AuthSession"
    assert (await gql(sqlite_client, ME, token=first["accessToken"]))["data"]["me"]
    second = await refresh(sqlite_client, first["refreshToken"])
    assert second["__typename"] == "AuthSession"


async def test_concurrent_refreshes_do_not_lose_updates_on_sqlite(
    sqlite_client: httpx.AsyncClient, sqlite_url: str
) -> None:
    """SQLite ignores FOR UPDATE; BEGIN IMMEDIATE is what serialises these."""
    first = await signup(sqlite_client, unique_email(), PASSWORD)
    results = await asyncio.gather(
        *(refresh(sqlite_client, first["refreshToken"]) for _ in range(8))
    )
    assert {r["__typename"] for r in results} == {"AuthSession"}
    assert len({r["refreshToken"] for r in results}) == 1
    engine = create_async_engine(sqlite_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(RefreshToken))).all()
    await engine.dispose()
    assert len(rows) == 2


async def test_timestamps_are_utc_on_sqlite(
    sqlite_client: httpx.AsyncClient, sqlite_url: str, clock: MutableClock
) -> None:
    result = await signup(sqlite_client, unique_email(), PASSWORD)
    assert result["user"]["createdAt"].endswith("+00:00")
    engine = create_async_engine(sqlite_url)
    async with engine.connect() as conn:
        created = (await conn.execute(select(User.created_at))).scalar_one()
    await engine.dispose()
    assert created.tzinfo is not None and created.utcoffset() == UTC.utcoffset(None)
    assert created == clock.now()


async def test_sqlite_connection_settings(
    make_settings: Callable[..., Settings], sqlite_url: str
) -> None:
    from sqlalchemy import text

    from db.session import create_engine

    engine = create_engine(make_settings(database_url=sqlite_url, db_timeout=3))
    try:
        async with engine.connect() as conn:
            pragmas = {
                name: (await conn.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
    finally:
        await engine.dispose()
    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 3000}


async def test_sqlite_reads_do_not_wait_for_writers(
    make_settings: Callable[..., Settings], sqlite_url: str
) -> None:
    """A write transaction holds SQLite's write lock (BEGIN IMMEDIATE); the session check of
    other requests reads on through it instead of queueing behind it."""
    import time

    from db.migrate import upgrade_head
    from db.session import Statements, create_engine

    await asyncio.to_thread(upgrade_head, sqlite_url)
    engine = create_engine(make_settings(database_url=sqlite_url, db_timeout=2))
    statements = Statements(engine)
    await statements.start()
    try:
        async with statements.transaction() as writer:
            await writer.execute(
                User.__table__.delete().where(User.email == "nobody"),  # type: ignore[attr-defined]
                {},
            )
            start = time.perf_counter()
            async with statements.connection() as reader:
                assert await reader.first(select(User.id), {}) is None
            assert time.perf_counter() - start < 1
    finally:
        await statements.close()
        await engine.dispose()


async def test_two_factor_and_logout_everywhere_on_sqlite(
    sqlite_client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """Every statement of the two-factor and logout paths runs on SQLite too."""
    from tests.gql import logout, signed_up_and_proven
    from tests.graph.test_mfa import (
        CONFIRM,
        DISABLE,
        REGENERATE,
        SETUP,
        challenge,
        code_at,
        verify,
    )

    email = unique_email()
    first = await signed_up_and_proven(sqlite_client, email)
    token = first["accessToken"]
    secret = (await gql(sqlite_client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    confirmed = await gql(
        sqlite_client, CONFIRM, {"i": {"code": code_at(secret, clock)}}, token=token
    )
    codes = confirmed["data"]["confirmTotp"]["codes"]
    clock.advance(seconds=90)
    assert (await verify(sqlite_client, await challenge(sqlite_client, email), "000000"))[
        "code"
    ] == "INVALID_OTP"
    session = await verify(
        sqlite_client, await challenge(sqlite_client, email), code_at(secret, clock)
    )
    assert session["__typename"] == "AuthSession"
    recovered = await verify(sqlite_client, await challenge(sqlite_client, email), codes[0])
    assert recovered["__typename"] == "AuthSession"
    clock.advance(seconds=30)
    regenerated = await gql(
        sqlite_client, REGENERATE, {"i": {"code": code_at(secret, clock)}}, token=token
    )
    new_codes = regenerated["data"]["regenerateRecoveryCodes"]["codes"]
    disabled = await gql(
        sqlite_client, DISABLE, {"i": {"password": PASSWORD, "code": new_codes[0]}}, token=token
    )
    assert disabled["data"]["disableTotp"]["otpEnabled"] is False
    assert await logout(sqlite_client, session["refreshToken"], everywhere=True) == 3


async def test_the_email_flows_run_on_sqlite(
    make_settings: Callable[..., Settings],
    sqlite_url: str,
    clock: MutableClock,
    smtp: SmtpSink,
) -> None:
    """Verification, sign-in by code, reset and change, sessions, with real mail."""
    settings = make_settings(
        database_url=sqlite_url, require_email_verification=True, **smtp.settings()
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        challenge = await signup(http, email, PASSWORD)
        code = (await smtp.wait_for(email)).code()
        session = await verify_otp(http, challenge["challengeToken"], code)
        assert session["user"]["emailVerified"] is True

        clock.advance(seconds=1)  # sessions are listed newest first
        sign_in = await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        code = (await smtp.wait_for(email, count=2)).code()
        second = await verify_otp(http, sign_in["challengeToken"], code)
        assert second["__typename"] == "AuthSession"

        listed = await gql(http, SESSIONS, token=second["accessToken"])
        assert [s["current"] for s in listed["data"]["sessions"]] == [True, False]

        changed = await mutate(
            http,
            CHANGE_PASSWORD,
            {"i": {"currentPassword": PASSWORD, "newPassword": "another long passphrase"}},
            token=second["accessToken"],
        )
        assert changed["__typename"] == "AuthSession"
        body = await gql(http, ME, token=session["accessToken"])
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"

        reset = await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
        code = (
            await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset your"))
        ).code()
        done = await mutate(
            http,
            RESET_PASSWORD,
            {
                "i": {
                    "challengeToken": reset["challengeToken"],
                    "code": code,
                    "newPassword": "a third long passphrase",
                }
            },
        )
        assert done["__typename"] == "AuthSession"
        assert (await login(http, email, "a third long passphrase"))["__typename"] == (
            "AuthSession"
        )
        await app.state.housekeeper.run_once()


async def test_the_lifecycle_runs_on_sqlite(
    make_settings: Callable[..., Settings],
    sqlite_url: str,
    clock: MutableClock,
    smtp: SmtpSink,
) -> None:
    """Change of address, export, deletion (its cascade needs SQLite's foreign keys on),
    and the idle timeout."""
    from tests.graph.test_lifecycle import EXPORT, change_email, delete_account

    settings = make_settings(
        database_url=sqlite_url, require_email_verification=True, **smtp.settings()
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        challenge = await signup(http, email, PASSWORD)
        code = (await smtp.wait_for(email)).code()
        session = await verify_otp(http, challenge["challengeToken"], code)
        new = f"new-{email}"
        moving = await change_email(http, session["accessToken"], new)
        moved = await verify_otp(http, moving["challengeToken"], (await smtp.wait_for(new)).code())
        assert moved["user"]["email"] == new
        exported = (await gql(http, EXPORT, token=moved["accessToken"]))["data"]
        assert new in exported["exportAccount"]["json"]
        idle = moved["refreshToken"]
        clock.advance(days=14, seconds=1)
        assert (await refresh(http, idle))["code"] == "INVALID_TOKEN"
        fresh = await login(http, new, PASSWORD)
        assert (await delete_account(http, fresh["accessToken"]))["deleted"] is True
    engine = create_async_engine(sqlite_url)
    async with engine.connect() as conn:
        users = (await conn.execute(select(User.id))).all()
        tokens = (await conn.execute(select(RefreshToken.id))).all()
    await engine.dispose()
    assert users == [] and tokens == []


async def test_step_up_budgets_and_lockouts_run_on_sqlite(
    make_settings: Callable[..., Settings],
    sqlite_url: str,
    clock: MutableClock,
    smtp: SmtpSink,
) -> None:
    """Issue 12's paths on the embedded database: a signup without a password, a first
    password, reauthenticate (password and emailed code), the lockout's reservations and
    failures, the code lockout, the mail budgets (known networks), device tokens bound to
    sessions, two-factor, and an export and deletion (mail by owner)."""
    from tests.graph.test_abuse import device_login
    from tests.graph.test_lifecycle import EXPORT, delete_account
    from tests.graph.test_mfa import CONFIRM, SETUP, code_at
    from tests.graph.test_stepup import reauthenticate

    settings = make_settings(
        database_url=sqlite_url, require_email_verification=True, **smtp.settings()
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        challenge = await mutate(http, SIGNUP_WITHOUT_PASSWORD, {"i": {"email": email}})
        session = await verify_otp(
            http, challenge["challengeToken"], (await smtp.wait_for(email)).code()
        )
        token = session["accessToken"]
        assert (await gql(http, "{ me { hasPassword } }", token=token))["data"]["me"] == {
            "hasPassword": False
        }
        first = await mutate(http, CHANGE_PASSWORD, {"i": {"newPassword": PASSWORD}}, token=token)
        assert first["__typename"] == "AuthSession", first
        token = first["accessToken"]
        device = await device_login(http, email, PASSWORD)
        assert device["__typename"] == "AuthSession", device

        # Wrong passwords, one at a time and at once: reservations, failures, the lock.
        async with client_for(app, ip="198.51.100.40") as stranger:
            answers = await asyncio.gather(*(login(stranger, email, "wrong!!") for _ in range(8)))
            assert {a["code"] for a in answers} <= {"INVALID_CREDENTIALS", "RATE_LIMITED"}
            assert (await login(stranger, email, PASSWORD))["code"] == "RATE_LIMITED"
            # Wrong codes from a stranger's challenges: the code lockout.
            for _ in range(3):
                asked = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
                for guess in ("000000", "000001", "000002", "000003"):
                    await verify_otp(stranger, asked["challengeToken"], guess)
            asked = await mutate(stranger, REQUEST_LOGIN_CODE, {"i": {"email": email}})
            locked = await verify_otp(stranger, asked["challengeToken"], "000004")
            assert locked["code"] == "RATE_LIMITED", locked

        # The owner's device token past the lockout (a fresh sign-in), then step-ups.
        again = await device_login(http, email, PASSWORD, device["deviceToken"])
        assert again["__typename"] == "AuthSession", again
        clock.advance(minutes=40)  # the locks are over
        token = (await refresh(http, again["refreshToken"]))["accessToken"]
        renewed = await reauthenticate(http, token, password=PASSWORD)
        assert renewed["__typename"] == "AuthSession", renewed
        token = (await refresh(http, renewed["refreshToken"]))["accessToken"]
        by_mail = await reauthenticate(http, token)
        code = (await smtp.wait_for(email, where=lambda m: "confirmation" in m.subject)).code()
        stepped = await verify_otp(http, by_mail["challengeToken"], code)
        assert stepped["__typename"] == "AuthSession", stepped
        token = stepped["accessToken"]
        setup = (await gql(http, SETUP, token=token))["data"]["setupTotp"]
        confirmed = await gql(
            http, CONFIRM, {"i": {"code": code_at(setup["secret"], clock)}}, token=token
        )
        assert confirmed["data"]["confirmTotp"]["codes"]
        exported = (await gql(http, EXPORT, token=token))["data"]["exportAccount"]["json"]
        assert email in exported
        codes = confirmed["data"]["confirmTotp"]["codes"]
        deleted = await delete_account(http, token, password=PASSWORD, code=codes[0])
        assert deleted["deleted"] is True
        await app.state.housekeeper.run_once()
