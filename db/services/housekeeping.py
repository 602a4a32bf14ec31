"""Housekeeping: expired challenges, abandoned signups, expired mail secrets and old
outbox rows go away on a schedule. One run at a time across every process: on
PostgreSQL a transaction-level advisory lock picks the one process that runs it; SQLite
serves one process anyway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, delete, exists, func, select

from db.clock import Clock
from db.mail.outbox import erase_expired_secrets, prune_outbox
from db.models import Challenge, User, UserSession
from db.services.events import prune_ended_sessions, prune_events, prune_spent_generations
from db.services.lockout import Lockout
from db.session import Statements

log = logging.getLogger("strawgate.housekeeping")

# An arbitrary 64-bit key naming the housekeeping lock (PostgreSQL advisory locks).
LOCK_KEY = 0x5354_5241_5747_4B01
_TAKE_LOCK = select(func.pg_try_advisory_xact_lock(bindparam("key")).label("taken"))

_PRUNE_CHALLENGES = delete(Challenge).where(Challenge.expires_at < bindparam("cutoff"))

# Signups never verified, past their limit, that never had a session (with
# verification required no unverified account has one).
_PRUNE_UNVERIFIED = delete(User).where(
    User.email_verified_at.is_(None),
    User.created_at < bindparam("cutoff"),
    ~exists().where(UserSession.user_id == User.id),
)


@dataclass(frozen=True, slots=True)
class Pruned:
    challenges: int = 0
    unverified_users: int = 0
    mail_secrets: int = 0
    outbox_rows: int = 0
    security_events: int = 0
    ended_sessions: int = 0
    spent_generations: int = 0
    throttles: int = 0


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
        lockout: Lockout | None = None,
    ) -> None:
        self.challenge_retention = challenge_retention
        self.event_retention = event_retention
        self.session_retention = session_retention
        self.lockout = lockout
        self.statements = statements
        self.clock = clock
        self.interval = interval
        # None: unverified accounts are kept (verification is not required).
        self.unverified_account_age = unverified_account_age
        self.outbox_retention = outbox_retention
        self._postgres = statements.engine.dialect.name == "postgresql"
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> Pruned | None:
        """One pass; None when another process holds the lock (it is doing it)."""
        now = self.clock.now()
        async with self.statements.transaction() as tx:
            if self._postgres:
                lock = await tx.first(_TAKE_LOCK, {"key": LOCK_KEY})
                if lock is None or not lock["taken"]:
                    return None
            challenges = await tx.execute(
                _PRUNE_CHALLENGES, {"cutoff": now - self.challenge_retention}
            )
            unverified = 0
            if self.unverified_account_age is not None:
                unverified = await tx.execute(
                    _PRUNE_UNVERIFIED, {"cutoff": now - self.unverified_account_age}
                )
        pruned = Pruned(
            challenges=challenges,
            unverified_users=unverified,
            mail_secrets=await erase_expired_secrets(self.statements, now),
            outbox_rows=await prune_outbox(self.statements, now, self.outbox_retention),
            security_events=await prune_events(self.statements, now, self.event_retention),
            ended_sessions=await prune_ended_sessions(self.statements, now, self.session_retention),
            spent_generations=await prune_spent_generations(
                self.statements, now, self.session_retention
            ),
            throttles=await self.lockout.prune() if self.lockout is not None else 0,
        )
        if any((pruned.challenges, pruned.unverified_users, pruned.outbox_rows)):
            log.info(
                "housekeeping: %d expired challenge(s), %d unverified account(s), "
                "%d old outbox row(s) removed",
                pruned.challenges,
                pruned.unverified_users,
                pruned.outbox_rows,
            )
        return pruned

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
