"""Housekeeping: expired challenges, abandoned signups, sent mail, old security events
and ended sessions go, each after its configured retention; one process at a time does
it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta

import httpx
from sqlalchemy import bindparam, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from db.services.housekeeping import LOCK_KEY, Housekeeper
from db.session import Statements, create_engine
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, running, unique_email
from tests.gql import REQUEST_LOGIN_CODE, logout, mutate, signed_up, signup
from tests.smtp import SmtpSink


async def count(database_url: str, sql: str) -> int:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        found = (await conn.execute(text(sql))).scalar_one()
    await engine.dispose()
    return int(found)


async def all_mail_sent(database_url: str, within: float = 10.0) -> None:
    """Until the outbox has recorded every mail as sent: the mail server has a mail a moment
    before its sender records it, at the clock's time then (a test that moves the clock on
    first would date the sending days later)."""
    deadline = time.monotonic() + within
    while await count(database_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL"):
        if time.monotonic() > deadline:
            raise AssertionError(f"mail still unsent after {within} s")
        await asyncio.sleep(0.02)


async def test_expired_challenges_and_old_mail_go(
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    clock: MutableClock,
    database_url: str,
) -> None:
    email = unique_email()
    await signup(mail_client, email, PASSWORD)
    await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": "nobody@example.com"}})
    await smtp.wait_for(email)
    await all_mail_sent(database_url)
    housekeeper: Housekeeper = mail_app.state.housekeeper
    # Its own pass as the app starts holds the one-process lock while it lasts (long, on a
    # loaded machine): stopped, so that the passes below are the test's (run_once answers
    # None while another holds the lock; it did, once).
    await housekeeper.stop()
    assert await count(database_url, "SELECT count(*) FROM challenges") == 2
    clock.advance(minutes=11)  # expired, but kept a day (answered "expired", not "unknown")
    await housekeeper.run_once()
    assert await count(database_url, "SELECT count(*) FROM challenges") == 2
    clock.advance(days=1)
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.challenges == 2
    assert await count(database_url, "SELECT count(*) FROM challenges") == 0
    # The sent mail stays for the retention (7 days), then goes.
    assert await count(database_url, "SELECT count(*) FROM outbox") == 1
    clock.advance(days=6)
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.outbox_rows == 1
    assert await count(database_url, "SELECT count(*) FROM outbox") == 0


async def test_tables_without_an_index_are_swept_once_an_hour(
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    clock: MutableClock,
    database_url: str,
) -> None:
    """The kinds found by reading a table whole (expired challenges, ended sessions, ...)
    cost what the table weighs on every pass: a process sweeps them at most once per
    HOUSEKEEPING_SWEEP_SECONDS (an hour), the indexed kinds every pass."""
    email = unique_email()
    await signup(mail_client, email, PASSWORD)  # a challenge, prunable a day after expiry
    await smtp.wait_for(email)
    housekeeper: Housekeeper = mail_app.state.housekeeper
    await housekeeper.stop()  # as above
    assert housekeeper.sweep_every == timedelta(hours=1)
    clock.advance(days=1, minutes=5)  # not prunable yet: swept now
    swept = await housekeeper.run_once()
    assert swept is not None and "challenges" in {p.kind for p in swept.progress}
    clock.advance(minutes=10)  # prunable now, but the sweep was 10 minutes ago
    light = await housekeeper.run_once()
    assert light is not None and light.challenges == 0
    kinds = {p.kind for p in light.progress}
    assert kinds.isdisjoint({"challenges", "unverified_users", "ended_sessions"})
    assert {"outbox_rows", "security_events", "throttles"} <= kinds  # indexed: every pass
    assert await count(database_url, "SELECT count(*) FROM challenges") == 1
    clock.advance(minutes=50)  # an hour after the last sweep
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.challenges == 1
    assert await count(database_url, "SELECT count(*) FROM challenges") == 0


_HOLD_LOCK = select(func.pg_advisory_xact_lock(bindparam("key")))


async def test_one_housekeeper_at_a_time(
    statements: Statements, clock: MutableClock, clean_db: None
) -> None:
    """While another process holds the housekeeping lock, a pass does nothing."""
    keeper = Housekeeper(
        statements=statements,
        clock=clock,
        interval=60,
        unverified_account_age=timedelta(days=7),
        outbox_retention=timedelta(days=7),
    )
    engine = create_engine(Settings(_env_file=None, database_url=str(statements.engine.url)))
    other_process = Statements(engine)
    await other_process.start()
    try:
        async with other_process.transaction() as tx:
            await tx.first(_HOLD_LOCK, {"key": LOCK_KEY})
            assert await keeper.run_once() is None
        assert await keeper.run_once() is not None
    finally:
        await other_process.close()
        await engine.dispose()


async def test_each_kind_goes_after_its_own_configured_retention(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
    database_url: str,
) -> None:
    app = create_app(
        make_settings(
            require_email_verification=True,
            unverified_account_days=1,
            outbox_retention_days=2,
            challenge_retention_days=3,
            security_event_retention_days=4,
            session_retention_days=5,
            housekeeping_seconds=3600,  # only the passes this test runs
            housekeeping_sweep_seconds=0,  # every pass sweeps: the retentions to the minute
            **smtp.settings(),
        ),
        clock=clock,
    )
    async for _ in running(app):
        async with client_for(app) as http:
            _email, session = await signed_up(http, smtp)  # verified; its mail sent
            assert await logout(http, session["refreshToken"]) == 1  # ended on day 0
            abandoned = unique_email()
            await signup(http, abandoned, PASSWORD)  # never verified
            await smtp.wait_for(abandoned)
            await all_mail_sent(database_url)
        housekeeper: Housekeeper = app.state.housekeeper
        await housekeeper.stop()  # as above
        ten_minutes = timedelta(minutes=10, seconds=1)  # the codes' lifetime, and a second
        expected = [
            # (days after day 0, what that pass removes first)
            (1, "unverified_users"),
            (2, "outbox_rows"),
            (3, "challenges"),
            (4, "security_events"),
            (5, "ended_sessions"),
        ]
        start = clock.now()
        for days, kind in expected:
            clock.current = start + timedelta(days=days) - timedelta(seconds=2)
            before = await housekeeper.run_once()
            assert before is not None and getattr(before, kind) == 0, (days, kind, before)
            clock.current = start + timedelta(days=days) + ten_minutes
            pruned = await housekeeper.run_once()
            assert pruned is not None and getattr(pruned, kind) > 0, (days, kind, pruned)
    for table in ("challenges", "outbox", "security_events", "sessions"):
        assert await count(database_url, f"SELECT count(*) FROM {table}") == 0, table  # noqa: S608
    assert await count(database_url, "SELECT count(*) FROM users") == 1
