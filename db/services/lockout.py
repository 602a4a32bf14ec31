"""Account lockout after Keycloak's brute-force detection, on the injected clock.

Failed sign-ins are counted per normalized email, registered or not (a lockout says
nothing about which addresses have accounts). From the THRESHOLD-th failure on, each
failure locks the address for a step that doubles from BASE up to MAX; a success, or
RESET without any failure, clears the count. A locked address answers RATE_LIMITED with
retryAfter before any password is hashed. Clients holding a device token for the
account are not held up by it (the caller skips the lockout for them)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, insert, or_, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation
from db.models import LoginThrottle
from db.session import Statements

_STATE = select(LoginThrottle.failures, LoginThrottle.last_failure_at, LoginThrottle.locked_until)
_STATE_BY_EMAIL = _STATE.where(LoginThrottle.email == bindparam("email"))
_LOCK_ROW = _STATE_BY_EMAIL.with_for_update()
_FIRST_FAILURE = insert(LoginThrottle).values(
    email=bindparam("email"),
    failures=bindparam("failures"),
    last_failure_at=bindparam("now"),
    locked_until=bindparam("until"),
)
_NEXT_FAILURE = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("email"))
    .values(
        failures=bindparam("failures"),
        last_failure_at=bindparam("now"),
        locked_until=bindparam("until"),
    )
)
_CLEAR = delete(LoginThrottle).where(LoginThrottle.email == bindparam("email"))
_PRUNE = delete(LoginThrottle).where(
    LoginThrottle.last_failure_at < bindparam("quiet_since"),
    or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < bindparam("now")),
)


class Lockout:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        threshold: int,
        base: timedelta,
        cap: timedelta,
        reset_after: timedelta,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.threshold = threshold
        self.base = base
        self.cap = cap
        self.reset_after = reset_after

    async def check(self, email: str) -> bool:
        """RATE_LIMITED while the address is locked; whether it has failures counted."""
        async with self.statements.connection() as conn:
            state = await conn.first(_STATE_BY_EMAIL, {"email": email})
        if state is None:
            return False
        self._refuse_if_locked(state["locked_until"], self.clock.now())
        return True

    async def failed(self, email: str) -> datetime | None:
        """Counts a failure; the end of the lock it starts, if it starts one."""
        now = self.clock.now()
        for _attempt in range(3):
            try:
                async with self.statements.transaction() as tx:
                    state = await tx.first(_LOCK_ROW, {"email": email})
                    failures = 1
                    if state is not None and now - state["last_failure_at"] < self.reset_after:
                        failures = state["failures"] + 1
                    until = self._lock_end(failures, now)
                    params = {"email": email, "failures": failures, "now": now, "until": until}
                    if state is None:
                        await tx.execute(_FIRST_FAILURE, params)
                    else:
                        await tx.execute(_NEXT_FAILURE, params)
                return until
            except UniqueViolation:
                continue  # a concurrent first failure made the row: count on top of it
        return None  # pragma: no cover - the row exists after the first conflict

    async def succeeded(self, email: str) -> None:
        async with self.statements.transaction() as tx:
            await tx.execute(_CLEAR, {"email": email})

    async def prune(self) -> int:
        """Forgets addresses quiet for longer than the reset period."""
        now = self.clock.now()
        async with self.statements.transaction() as tx:
            return await tx.execute(_PRUNE, {"quiet_since": now - self.reset_after, "now": now})

    def steps(self, failures: int) -> timedelta | None:
        """How long the `failures`-th failure in a row locks the address."""
        if failures < self.threshold:
            return None
        doublings = min(failures - self.threshold, 32)
        step: timedelta = self.base * (1 << doublings)
        return step if step < self.cap else self.cap

    def _lock_end(self, failures: int, now: datetime) -> datetime | None:
        step = self.steps(failures)
        return None if step is None else now + step

    @staticmethod
    def _refuse_if_locked(locked_until: datetime | None, now: datetime) -> None:
        if locked_until is not None and locked_until > now:
            wait = math.ceil((locked_until - now).total_seconds())
            raise AuthFailure(
                ErrorCode.RATE_LIMITED,
                "Too many failed sign-ins for this address; try again later.",
                retry_after=max(1, wait),
            )
