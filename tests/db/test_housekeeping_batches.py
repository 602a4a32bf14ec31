"""Housekeeping in batches: a backlog larger than a batch is removed completely, in
transactions of its own that others see as they commit, with the progress logged and
counted; the lock that makes one process do a pass is given back however the pass ends,
and holds no transaction open."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.migrate import upgrade_head
from db.models import (
    Challenge,
    IdentityFlow,
    LoginThrottle,
    OutboxMail,
    RefreshToken,
    SecurityEvent,
    SpentIdToken,
    User,
    UserSession,
    WebhookDelivery,
    WebhookEvent,
)
from db.services.batches import Batching, BatchSize
from db.services.housekeeping import KINDS, Housekeeper
from db.services.lockout import Lockout, code_lockout_key
from db.session import Runner, Statements, create_engine
from db.settings import Settings
from graph.metrics import Metrics
from tests.conftest import MutableClock, OpenStatements

BACKLOG = 23  # rows of every kind, past its retention
BATCH = 4  # rows a batch may remove: six batches of four and one of three, per kind

EXPECTED = {
    "challenges": BACKLOG,
    "unverified_users": BACKLOG,
    "mail_secrets": BACKLOG,
    "outbox_rows": BACKLOG,
    "security_events": BACKLOG,
    "ended_sessions": BACKLOG,
    "spent_generations": BACKLOG,
    "throttles": BACKLOG,
    "identity_flows": BACKLOG,
    "spent_id_tokens": BACKLOG,
    "webhook_events": BACKLOG,
}
# What stays: the owner, its live session (with its two newest generations), a live
# challenge, a recent event, the recent mails (their secrets erased), a recent throttle, a
# provider redirect under way and an ID token spent that has not expired; an old webhook
# event one endpoint still waits for (its delivery to the other done) and a recent one.
LEFT = {
    "users": 1,
    "sessions": 1,
    "refresh_tokens": 2,
    "challenges": 1,
    "security_events": 1,
    "outbox": BACKLOG,
    "login_throttles": 1,
    "identity_flows": 1,
    "spent_id_tokens": 1,
    "webhook_events": 2,
    "webhook_deliveries": 3,
}


async def seed_backlog(engine: AsyncEngine, now: datetime) -> None:
    """BACKLOG rows of every kind the housekeeper removes, and one row of each that stays.
    The live session is 90 days old and was refreshed BACKLOG + 1 times: its generations
    but the newest two are spent, long enough ago."""
    long_ago = now - timedelta(days=400)
    owner = uuid.uuid4()
    live = uuid.uuid4()

    def user(user_id: uuid.UUID, email: str, verified: bool) -> dict[str, Any]:
        return {
            "id": user_id,
            "email": email,
            "email_normalized": email,
            "password_hash": "x",
            "is_active": True,
            "email_verified_at": long_ago if verified else None,
            "created_at": long_ago,
            "updated_at": long_ago,
        }

    def session(session_id: uuid.UUID, ends: datetime, created: datetime) -> dict[str, Any]:
        return {
            "id": session_id,
            "user_id": owner,
            "created_at": created,
            "last_used_at": created,
            "auth_time": created,
            "expires_at": ends,
            "absolute_expires_at": ends,
            "amr": "pwd",
        }

    def token(session_id: uuid.UUID, generation: int, rotated: datetime | None) -> dict[str, Any]:
        digest = hashlib.sha256(f"{session_id}:{generation}".encode()).digest()
        return {
            "session_id": session_id,
            "generation": generation,
            "token_hash": digest,
            "created_at": long_ago,
            "rotated_at": rotated,
        }

    def challenge(expires: datetime) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "token_hash": hashlib.sha256(uuid.uuid4().bytes).digest(),
            "user_id": owner,
            "purpose": "LOGIN",
            "method": "TOTP",
            "amr": "pwd",
            "created_at": expires - timedelta(minutes=10),
            "expires_at": expires,
        }

    def mail(sent: datetime, sealed: bool) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "user_id": owner,
            "recipient": "owner@example.com",
            "template": "login_code",
            "context": "{}",
            "secrets_sealed": "sealed" if sealed else None,
            "secrets_expire_at": sent + timedelta(minutes=10),
            "created_at": sent,
            "next_attempt_at": None,
            "sent_at": sent,
        }

    def throttle(key: str, last: datetime) -> dict[str, Any]:
        return {"email": key, "failures": 3, "last_failure_at": last}

    def flow(expires: datetime) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "state_hash": hashlib.sha256(uuid.uuid4().bytes).digest(),
            "browser_hash": bytes(32),
            "provider": "google",
            "purpose": "SIGN_IN",
            "redirect_to": "https://app.example.com/done",
            "code_challenge": secrets.token_urlsafe(32)[:43],
            "created_at": expires - timedelta(minutes=10),
            "expires_at": expires,
        }

    def spent(expires: datetime) -> dict[str, Any]:
        return {"token_hash": hashlib.sha256(uuid.uuid4().bytes).digest(), "expires_at": expires}

    def webhook(seq: int, at: datetime) -> dict[str, Any]:
        return {
            "seq": seq,
            "id": uuid.uuid4(),
            "type": "user.created",
            "user_id": owner,
            "payload": "{}",
            "created_at": at,
        }

    def sent(
        seq: int, at: datetime, *, dead: bool = False, url: str = "https://a.example.com"
    ) -> dict[str, Any]:
        return {
            "event_seq": seq,
            "endpoint": url,
            "created_at": at,
            "next_attempt_at": None,
            "attempts": 1,
            "delivered_at": None if dead else at,
            "failed_at": at if dead else None,
        }

    waiting = {**sent(1, long_ago, url="https://b.example.com"), "next_attempt_at": long_ago}

    rows: list[tuple[Any, list[dict[str, Any]]]] = [
        (
            User,
            [user(owner, "owner@example.com", verified=True)]
            + [user(uuid.uuid4(), f"abandoned{i}@example.com", False) for i in range(BACKLOG)],
        ),
        (
            UserSession,
            [session(live, now + timedelta(days=1), now - timedelta(days=90))]
            + [session(ended, long_ago, long_ago) for ended in _ended_ids(BACKLOG)],
        ),
        (
            RefreshToken,
            [token(live, g, long_ago) for g in range(BACKLOG + 1)]
            + [token(live, BACKLOG + 1, None)]
            + [token(ended, 0, None) for ended in _ended_ids(BACKLOG)],
        ),
        (
            Challenge,
            [challenge(now + timedelta(minutes=5))] + [challenge(long_ago) for _ in range(BACKLOG)],
        ),
        (
            SecurityEvent,
            [{"at": now, "kind": "LOGIN_SUCCEEDED", "user_id": owner}]
            + [{"at": long_ago, "kind": "LOGIN_SUCCEEDED", "user_id": owner}] * BACKLOG,
        ),
        # The old mails are pruned; the recent ones' secrets have expired (erased).
        (
            OutboxMail,
            [mail(long_ago, sealed=False) for _ in range(BACKLOG)]
            + [mail(now - timedelta(hours=1), sealed=True) for _ in range(BACKLOG)],
        ),
        (
            LoginThrottle,
            [throttle("recent@example.com", now)]
            + [throttle(f"quiet{i}@example.com", long_ago) for i in range(BACKLOG)],
        ),
        (
            IdentityFlow,
            [flow(now + timedelta(minutes=5))] + [flow(long_ago) for _ in range(BACKLOG)],
        ),
        (
            SpentIdToken,
            [spent(now + timedelta(minutes=5))] + [spent(long_ago) for _ in range(BACKLOG)],
        ),
        # Delivered or given up long ago: pruned; one still waiting for an endpoint, and a
        # recent one, stay.
        (
            WebhookEvent,
            [webhook(1, long_ago), webhook(2, now)]
            + [webhook(10 + i, long_ago) for i in range(BACKLOG)],
        ),
        (
            WebhookDelivery,
            [sent(1, long_ago), waiting, sent(2, now)]
            + [sent(10 + i, long_ago, dead=i % 2 == 1) for i in range(BACKLOG)],
        ),
    ]
    async with engine.begin() as conn:
        for model, values in rows:
            await conn.execute(insert(model), values)


def _ended_ids(count: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=index + 1) for index in range(count)]


async def counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        return {
            table: int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608
            for table in LEFT
        }


def keeper(statements: Statements, clock: MutableClock, **overrides: Any) -> Housekeeper:
    lockout = Lockout(
        statements=statements,
        clock=clock,
        threshold=5,
        base=timedelta(seconds=30),
        cap=timedelta(minutes=15),
        reset_after=timedelta(hours=1),
        refusal="locked",
    )
    options: dict[str, Any] = {
        "statements": statements,
        "clock": clock,
        "interval": 3600,
        "unverified_account_age": timedelta(days=7),
        "outbox_retention": timedelta(days=7),
        "lockout": lockout,
        "batch_rows": BATCH,
        "batch_pages": 1,  # a walk reads one heap page a batch
        "batch_target": None,  # every batch may remove BATCH rows, however long it takes
        **overrides,
    }
    return Housekeeper(**options)


@contextlib.asynccontextmanager
async def watched(
    statements: Statements, seen: Callable[[], Any]
) -> AsyncIterator[list[dict[str, Any]]]:
    """Calls `seen` (a coroutine function, on connections of its own) after every
    transaction and every plain connection of `statements` has ended (on PostgreSQL a
    batch is one statement outside any transaction block); its answers are yielded."""
    answers: list[dict[str, Any]] = []
    originals = {"transaction": statements.transaction, "connection": statements.connection}

    def watching(name: str) -> Callable[[], Any]:
        @contextlib.asynccontextmanager
        async def used() -> AsyncIterator[Runner]:
            async with originals[name]() as runner:
                yield runner
            answers.append(await seen())

        return used

    statements.transaction = watching("transaction")  # type: ignore[method-assign]
    statements.connection = watching("connection")  # type: ignore[method-assign]
    try:
        yield answers
    finally:
        del statements.transaction, statements.connection


async def test_a_backlog_larger_than_a_batch_goes_in_several_transactions(
    statements: Statements,
    clock: MutableClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = statements.engine
    await seed_backlog(engine, clock.now())
    housekeeper = keeper(statements, clock)
    deleted: list[tuple[str, int]] = []
    housekeeper.on_deleted = lambda kind, rows: deleted.append((kind, rows))

    async def seen() -> dict[str, Any]:
        found = await counts(engine)
        async with engine.connect() as conn:
            # The pass's lock is held outside any transaction: nothing of it is left idle
            # in one (which would hold every deleted row back from vacuum).
            idle = await conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'idle in transaction'"
                )
            )
            found["idle_in_transaction"] = int(idle.scalar_one())
        return found

    caplog.set_level(logging.INFO, logger="strawgate.housekeeping")
    async with watched(statements, seen) as after_each:
        pruned = await housekeeper.run_once()
    assert pruned is not None
    assert {kind: getattr(pruned, kind) for kind in KINDS} == EXPECTED
    assert await counts(engine) == LEFT

    # Every kind went in batches of at most BATCH rows, each committed on its own: the
    # rest of the database saw the tables shrink batch by batch.
    for kind, rows in EXPECTED.items():
        sizes = [n for k, n in deleted if k == kind]
        assert sum(sizes) == rows and max(sizes) == BATCH and len(sizes) >= rows // BATCH, kind
    observed = {1 + BACKLOG} | {seen_then["challenges"] for seen_then in after_each}
    challenges = sorted(observed, reverse=True)
    assert len(challenges) > 1 + BACKLOG // BATCH and challenges[-1] == 1, challenges
    steps = itertools.pairwise(challenges)
    assert all(before - after <= BATCH for before, after in steps), challenges
    assert all(seen_then["idle_in_transaction"] == 0 for seen_then in after_each)
    assert pruned.batches >= sum(rows // BATCH for rows in EXPECTED.values())
    assert 0 < pruned.longest_batch <= pruned.seconds

    # The progress is in the log: a line per kind, and one for the pass.
    messages = [record.getMessage() for record in caplog.records]
    for kind, rows in EXPECTED.items():
        assert any(m.startswith(f"housekeeping: {kind}: {rows:,} removed in") for m in messages)
    assert any("ended_sessions 23," in m and "batch(es), the longest" in m for m in messages)

    # Nothing is left: the next pass removes nothing, in one (empty) batch per kind.
    again = await housekeeper.run_once()
    assert again is not None and all(getattr(again, kind) == 0 for kind in KINDS)


def test_the_batch_size_adapts_to_the_time_a_batch_takes() -> None:
    """A small first batch; slower than the target: rows and pages halve (down to a
    floor); faster than half of it: they double (up to the configured sizes). Without a
    target, always the configured sizes."""
    size = BatchSize(Batching(rows=100, pages=256, target=0.05))
    seen = [(size.rows, size.pages)]  # a slow start
    for took in (0.2, 0.2, 0.2, 0.2, 0.03, 0.01, 0.01, 0.01, 0.01):
        size.took(took)
        seen.append((size.rows, size.pages))
    assert seen == [
        (50, 128),
        (25, 64),
        (12, 32),
        (10, 16),
        (10, 16),
        (10, 16),  # between half the target and the target: as it was
        (20, 32),
        (40, 64),
        (80, 128),
        (100, 256),
    ]
    fixed = BatchSize(Batching(rows=7, pages=3, target=None))
    fixed.took(10.0)
    assert (fixed.rows, fixed.pages) == (7, 3)


async def test_the_lock_is_given_back_when_a_pass_fails(
    statements: Statements,
    open_statements: OpenStatements,
    clock: MutableClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    housekeeper = keeper(statements, clock)
    other_process = keeper(await open_statements(), clock)

    async def broken(*_args: Any, **_kwargs: Any) -> int:
        assert await other_process.run_once() is None  # held by the pass under way
        raise RuntimeError("the database went away")

    monkeypatch.setattr("db.services.housekeeping.prune_events", broken)
    with pytest.raises(RuntimeError):
        await housekeeper.run_once()
    monkeypatch.undo()
    assert await other_process.run_once() is not None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
    upgrade_head(url)  # runs a loop of its own: not from within the test's
    return url


async def test_a_backlog_goes_in_batches_on_sqlite(
    make_settings: Callable[..., Settings], sqlite_url: str, clock: MutableClock
) -> None:
    engine = create_engine(make_settings(database_url=sqlite_url))
    statements = Statements(engine)
    await statements.start()
    try:
        await seed_backlog(engine, clock.now())
        housekeeper = keeper(statements, clock)
        deleted: list[tuple[str, int]] = []
        housekeeper.on_deleted = lambda kind, rows: deleted.append((kind, rows))
        pruned = await housekeeper.run_once()
        assert pruned is not None
        assert {kind: getattr(pruned, kind) for kind in KINDS} == EXPECTED
        assert await counts(engine) == LEFT
        assert max(rows for _, rows in deleted) == BATCH
    finally:
        await statements.close()
        await engine.dispose()


async def test_housekeeping_counts_in_the_metrics() -> None:
    metrics = Metrics()
    metrics.housekept("ended_sessions", 500)
    metrics.housekept("ended_sessions", 20)

    def value(kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "strawgate_housekeeping_deleted_total", {"kind": kind}
        )

    assert value("ended_sessions") == 520
    assert all(value(kind) == 0 for kind in KINDS if kind != "ended_sessions")


async def test_a_code_lockout_is_forgotten_only_after_its_own_day(
    statements: Statements, clock: MutableClock
) -> None:
    """The password lockout's pass forgets an address quiet for an hour; the code
    lockout's rows (same table) only after CODE_LOCKOUT_RESET, a day."""
    now = clock.now()
    code = code_lockout_key("victim@example.com")
    async with statements.engine.begin() as conn:
        await conn.execute(
            insert(LoginThrottle),
            [
                {"email": "quiet@example.com", "failures": 4, "last_failure_at": now},
                {"email": code, "failures": 9, "last_failure_at": now},
            ],
        )
    housekeeper = keeper(statements, clock)
    clock.advance(hours=2)
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.throttles == 1
    async with statements.engine.connect() as conn:
        left = (await conn.execute(select(LoginThrottle.email))).scalars().all()
    assert left == [code]
    clock.advance(hours=23)
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.throttles == 1
    async with statements.engine.connect() as conn:
        assert (await conn.execute(select(func.count(LoginThrottle.email)))).scalar_one() == 0
