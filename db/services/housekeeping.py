"""Housekeeping: expired challenges, abandoned signups, expired mail secrets, old outbox
rows, old security events, ended sessions, spent refresh generations, quiet sign-in
throttles, provider redirects past their life, expired spent ID tokens and webhook events
delivered (or given up) long ago go away on a schedule. One run at a time across every
process: on PostgreSQL an advisory lock, held by a connection of its own for the whole
pass, picks the one process that runs it; SQLite serves one process anyway.

Every kind is removed in batches (db/services/batches.py): short transactions of at most
500 rows each (fewer when a batch takes longer than 50 ms), so a backlog of
millions never holds a row lock for long. The progress shows in the log (strawgate.
housekeeping, INFO: a line per kind that removed anything, every 10 s while a kind
takes longer, and one per pass that removed anything or took a second or more) and
through `on_deleted` (the metric strawgate_housekeeping_deleted_total).

The kinds no index finds (SWEPT: expired challenges, abandoned signups, ended sessions,
spent refresh generations) are found by reading their tables page by page, which costs
what the tables weigh however little there is to delete: a process sweeps them at most
once per `sweep_every` (HOUSEKEEPING_SWEEP_SECONDS, an hour; its first pass always), the
indexed kinds every pass. At a million users a sweep reads about 2 GB (seconds of
PostgreSQL's time): once an hour, not once a minute."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, select

from db.clock import Clock
from db.mail.outbox import erase_expired_secrets, prune_outbox
from db.models import Challenge, IdentityFlow, SpentIdToken, User, UserSession
from db.services.batches import (
    BATCH_PAGES,
    BATCH_ROWS,
    BATCH_TARGET,
    AnyOf,
    Batching,
    Progress,
    chosen,
    until_done,
    walk,
)
from db.services.events import (
    SecurityEvents,
    prune_ended_sessions,
    prune_events,
    prune_spent_generations,
)
from db.services.lockout import Lockout
from db.session import Statements
from db.webhooks.catalogue import USER_DELETED
from db.webhooks.delivery import prune_webhook_events

log = logging.getLogger("strawgate.housekeeping")

# An arbitrary 64-bit key naming the housekeeping lock (PostgreSQL advisory locks).
LOCK_KEY = 0x5354_5241_5747_4B01
_TAKE_LOCK = select(func.pg_try_advisory_lock(bindparam("key")).label("taken"))
_GIVE_LOCK = select(func.pg_advisory_unlock(bindparam("key")).label("given"))

# How often a kind that takes long says how far it got.
PROGRESS_EVERY = 10.0  # seconds
# A pass that removed nothing is logged (at INFO) when it took this long: what a pass
# costs with nothing to do grows with the tables.
SLOW_PASS = 1.0  # seconds
# The kinds found by reading their tables whole (no index serves them): swept less often.
SWEPT = frozenset({"challenges", "unverified_users", "ended_sessions", "spent_generations"})


def _expired(challenge: Any) -> Any:
    return challenge.expires_at < bindparam("cutoff")


# No index on expires_at: PostgreSQL walks the table's pages (in_pages).
_PRUNE_CHALLENGES = delete(Challenge).where(
    AnyOf(Challenge.id, chosen(Challenge, _expired, in_pages=True))
)
_PRUNE_CHALLENGES_ANYWHERE = delete(Challenge).where(
    AnyOf(Challenge.id, chosen(Challenge, _expired))
)


# Signups never verified, past their limit, that never had a session (with
# verification required no unverified account has one).
def _abandoned(user: Any) -> Any:
    return and_(
        user.email_verified_at.is_(None),
        user.created_at < bindparam("cutoff"),
        ~exists().where(UserSession.user_id == user.id),
    )


_PRUNE_UNVERIFIED = delete(User).where(AnyOf(User.id, chosen(User, _abandoned, in_pages=True)))
_PRUNE_UNVERIFIED_ANYWHERE = delete(User).where(AnyOf(User.id, chosen(User, _abandoned)))
_PRUNE_UNVERIFIED_RETURNING = _PRUNE_UNVERIFIED_ANYWHERE.returning(User.id)


# Provider redirects past their life (an hour's grace after: a one-time code made at the
# flow's last moment lives a minute longer), and ID tokens past their expiry (no longer
# taken anyway): both found by their expires_at index.
IDENTITY_FLOW_GRACE = timedelta(hours=1)
_PRUNE_IDENTITY_FLOWS = delete(IdentityFlow).where(
    AnyOf(
        IdentityFlow.id,
        chosen(
            IdentityFlow,
            lambda f: f.expires_at < bindparam("cutoff"),
            order_by=lambda f: f.expires_at,
        ),
    )
)
_PRUNE_SPENT_ID_TOKENS = delete(SpentIdToken).where(
    AnyOf(
        SpentIdToken.token_hash,
        chosen(
            SpentIdToken,
            lambda t: t.expires_at < bindparam("cutoff"),
            key="token_hash",
            order_by=lambda t: t.expires_at,
        ),
    )
)


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pass removed (mail_secrets: rows whose secrets were erased), how long it
    took and its longest batch (the longest any row lock of it was held), in seconds."""

    challenges: int = 0
    unverified_users: int = 0
    mail_secrets: int = 0
    outbox_rows: int = 0
    security_events: int = 0
    ended_sessions: int = 0
    spent_generations: int = 0
    throttles: int = 0
    identity_flows: int = 0
    spent_id_tokens: int = 0
    webhook_events: int = 0
    seconds: float = 0.0
    batches: int = 0
    longest_batch: float = 0.0
    progress: tuple[Progress, ...] = field(default=(), compare=False)


KINDS = tuple(
    f.name
    for f in fields(Pruned)
    if f.name not in ("seconds", "batches", "longest_batch", "progress")
)


class Housekeeper:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        interval: float,
        unverified_account_age: timedelta | None,
        outbox_retention: timedelta,
        event_retention: timedelta = timedelta(days=365),
        session_retention: timedelta = timedelta(days=30),
        # Expired challenges are kept a while (a code typed just after expiry still
        # finds its challenge and answers "expired", not "unknown"), then deleted.
        challenge_retention: timedelta = timedelta(days=1),
        # Webhook events delivered or given up at every endpoint are kept this long (a
        # dead letter can be replayed until then).
        webhook_retention: timedelta = timedelta(days=7),
        lockout: Lockout | None = None,
        batch_rows: int = BATCH_ROWS,
        batch_pages: int = BATCH_PAGES,
        # Seconds a batch should take at most (its size adapts); None: always batch_rows.
        batch_target: float | None = BATCH_TARGET,
        # How often this process sweeps the SWEPT kinds (0: every pass).
        sweep_every: timedelta = timedelta(0),
        # The trail and its webhooks: a pruned signup is `user.deleted` to endpoints
        # that want it (its `user.created` went out).
        events: SecurityEvents | None = None,
    ) -> None:
        self.events = events
        self.sweep_every = sweep_every
        self._swept_at: datetime | None = None  # when this process's last sweep began
        self.challenge_retention = challenge_retention
        self.webhook_retention = webhook_retention
        self.event_retention = event_retention
        self.session_retention = session_retention
        self.lockout = lockout
        self.statements = statements
        self.clock = clock
        self.interval = interval
        # None: unverified accounts are kept (verification is not required).
        self.unverified_account_age = unverified_account_age
        self.outbox_retention = outbox_retention
        self.batch_rows = batch_rows
        self.batch_pages = batch_pages
        self.batch_target = batch_target
        # Rows removed, per kind (a Pruned field's name), after every batch that removed
        # any: the app counts them (strawgate_housekeeping_deleted_total).
        self.on_deleted: Callable[[str, int], None] | None = None
        self._postgres = statements.engine.dialect.name == "postgresql"
        self._task: asyncio.Task[None] | None = None

    def _deletions_published(self) -> bool:
        webhooks = self.events.webhooks if self.events is not None else None
        return webhooks is not None and bool(webhooks.wanted(USER_DELETED))

    async def _prune_unverified_publishing(self, cutoff: datetime, batching: Batching) -> int:
        """The abandoned signups, deleted a batch per transaction with a `user.deleted`
        each in it (the statement names the rows it deleted): when an endpoint wants them."""
        assert self.events is not None  # noqa: S101 - see _deletions_published
        done = Progress("unverified_users")
        limit = max(1, batching.rows)
        while True:
            started = time.perf_counter()
            async with self.events.transaction(self.statements) as tx:
                gone = await tx.scalars(
                    _PRUNE_UNVERIFIED_RETURNING, {"cutoff": cutoff, "batch": limit}
                )
                for user_id in gone:
                    await self.events.user_deleted(tx, user_id, reason="unverified")
            done.add(len(gone), time.perf_counter() - started)
            if batching.on_batch is not None:
                batching.on_batch(done, len(gone))
            if len(gone) < limit:
                return done.rows

    async def run_once(self) -> Pruned | None:
        """One pass; None when another process holds the lock (it is doing it)."""
        now = self.clock.now()
        async with self._one_process() as ours:
            if not ours:
                return None
            started = time.perf_counter()
            done: list[Progress] = []
            sweep = self._swept_at is None or now - self._swept_at >= self.sweep_every
            for kind, prune in self._passes(now):
                if kind in SWEPT and not sweep:
                    continue
                done.append(await self._timed(kind, prune))
            if sweep:
                self._swept_at = now
        pruned = Pruned(
            **{p.kind: p.rows for p in done},
            seconds=time.perf_counter() - started,
            batches=sum(p.batches for p in done),
            longest_batch=max((p.longest for p in done), default=0.0),
            progress=tuple(done),
        )
        removed = sum(getattr(pruned, kind) for kind in KINDS)
        log.log(
            logging.INFO if removed or pruned.seconds >= SLOW_PASS else logging.DEBUG,
            "housekeeping: %s removed in %.1f s, %d batch(es), the longest %.0f ms",
            ", ".join(f"{kind} {getattr(pruned, kind):,}" for kind in KINDS),
            pruned.seconds,
            pruned.batches,
            1000 * pruned.longest_batch,
        )
        return pruned

    def _passes(self, now: datetime) -> list[tuple[str, Callable[[Batching], Awaitable[int]]]]:
        statements = self.statements

        async def challenges(batching: Batching) -> int:
            done = await walk(
                statements,
                "challenges",
                "challenges",
                _PRUNE_CHALLENGES,
                _PRUNE_CHALLENGES_ANYWHERE,
                {"cutoff": now - self.challenge_retention},
                batching,
            )
            return done.rows

        async def unverified_users(batching: Batching) -> int:
            if self.unverified_account_age is None:
                return 0
            cutoff = now - self.unverified_account_age
            if self._deletions_published():
                return await self._prune_unverified_publishing(cutoff, batching)
            done = await walk(
                statements,
                "unverified_users",
                "users",
                _PRUNE_UNVERIFIED,
                _PRUNE_UNVERIFIED_ANYWHERE,
                {"cutoff": now - self.unverified_account_age},
                batching,
            )
            return done.rows

        async def throttles(batching: Batching) -> int:
            return await self.lockout.prune(batching) if self.lockout is not None else 0

        return [
            ("challenges", challenges),
            ("unverified_users", unverified_users),
            ("mail_secrets", lambda b: erase_expired_secrets(statements, now, b)),
            ("outbox_rows", lambda b: prune_outbox(statements, now, self.outbox_retention, b)),
            ("security_events", lambda b: prune_events(statements, now, self.event_retention, b)),
            (
                "ended_sessions",
                lambda b: prune_ended_sessions(statements, now, self.session_retention, b),
            ),
            (
                "spent_generations",
                lambda b: prune_spent_generations(statements, now, self.session_retention, b),
            ),
            ("throttles", throttles),
            (
                "identity_flows",
                lambda b: self._until_done(
                    "identity_flows", _PRUNE_IDENTITY_FLOWS, now - IDENTITY_FLOW_GRACE, b
                ),
            ),
            (
                "spent_id_tokens",
                lambda b: self._until_done("spent_id_tokens", _PRUNE_SPENT_ID_TOKENS, now, b),
            ),
            (
                "webhook_events",
                lambda b: prune_webhook_events(statements, now, self.webhook_retention, b),
            ),
        ]

    async def _until_done(
        self, kind: str, statement: Any, cutoff: datetime, batching: Batching
    ) -> int:
        done = await until_done(self.statements, kind, statement, {"cutoff": cutoff}, batching)
        return done.rows

    async def _timed(self, kind: str, prune: Callable[[Batching], Awaitable[int]]) -> Progress:
        """One kind's prune, its batches counted and timed; progress logged as it goes."""
        seen = Progress(kind)
        started = time.perf_counter()
        last_said = started

        def on_batch(_so_far: Progress, rows: int) -> None:
            nonlocal last_said
            seen.rows += rows
            seen.batches += 1
            seen.longest = max(seen.longest, _so_far.longest)
            if rows and self.on_deleted is not None:
                self.on_deleted(kind, rows)
            if time.perf_counter() - last_said >= PROGRESS_EVERY:
                last_said = time.perf_counter()
                log.info(
                    "housekeeping: %s: %s removed so far, %d batch(es), %.0f s",
                    kind,
                    f"{seen.rows:,}",
                    seen.batches,
                    last_said - started,
                )

        batching = Batching(
            rows=self.batch_rows,
            pages=self.batch_pages,
            target=self.batch_target,
            on_batch=on_batch,
        )
        await prune(batching)
        seen.seconds = time.perf_counter() - started
        if seen.rows:
            log.info(
                "housekeeping: %s: %s removed in %.1f s, %d batch(es), the longest %.0f ms",
                kind,
                f"{seen.rows:,}",
                seen.seconds,
                seen.batches,
                1000 * seen.longest,
            )
        return seen

    @contextlib.asynccontextmanager
    async def _one_process(self) -> AsyncIterator[bool]:
        """Whether this process is the one to run the pass. On PostgreSQL: the advisory
        lock, taken for the session of a connection of its own (outside any transaction:
        an idle transaction would hold every deleted row back from vacuum, and from the
        index clean-up the next batch relies on) and given back when the pass ends, however
        it ends; if this process dies, the lock goes with its connection."""
        if not self._postgres:
            yield True
            return
        async with self.statements.connection() as lock:
            taken = await lock.first(_TAKE_LOCK, {"key": LOCK_KEY})
            if taken is None or not taken["taken"]:
                yield False
                return
            try:
                yield True
            finally:
                await lock.first(_GIVE_LOCK, {"key": LOCK_KEY})

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="strawgate-housekeeping")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # the next pass tries again; the database may be down now
                log.warning("housekeeping failed; trying again later", exc_info=True)
            await asyncio.sleep(self.interval)
