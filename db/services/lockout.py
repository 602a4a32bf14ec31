"""Account lockout after Keycloak's brute-force detection, on the injected clock.

Failed sign-ins are counted per normalized email, registered or not (a lockout says
nothing about which addresses have accounts). From the THRESHOLD-th failure on, each
failure locks the address for a step that doubles from BASE up to MAX; a success, or
RESET without any failure, clears the count. A locked address answers RATE_LIMITED with
retryAfter before any password is hashed. Clients holding a device token for the
account are not held up by it (the caller skips the lockout for them).

Parallel guesses: every password check is reserved before its hash, under the row's
lock (on every process alike): the checks in flight and the failures counted so far stay
under the threshold together, so 20 guesses sent at once get at most THRESHOLD checks
before the lock, and one per lock period after it; the rest answer RATE_LIMITED (retry
in a second) without a hash. Concurrent right passwords of the owner are only spread
out, never locked: a success clears the count."""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, literal, null, or_, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation
from db.models import LoginThrottle
from db.services.batches import AnyOf, Batching, chosen, until_done
from db.session import Runner, Statements

SIGN_IN_REFUSAL = "Too many failed sign-ins for this address; try again later."
CODE_REFUSAL = "Too many wrong codes for this address; try again later."
# A code has a million values: the code lockout forgets a run of wrong ones only after a
# day without one (an hour's pause must not buy a stranger ten fresh guesses).
CODE_LOCKOUT_RESET = timedelta(hours=24)

# A reservation older than this was left by a process that died mid-check: not counted.
STALE_IN_FLIGHT = timedelta(minutes=1)

_STATE = select(
    LoginThrottle.failures,
    LoginThrottle.last_failure_at,
    LoginThrottle.locked_until,
    LoginThrottle.in_flight,
    LoginThrottle.in_flight_at,
)
_STATE_BY_EMAIL = _STATE.where(LoginThrottle.email == bindparam("address"))
_LOCK_ROW = _STATE_BY_EMAIL.with_for_update()
_FIRST_FAILURE = insert(LoginThrottle).values(
    email=bindparam("address"),
    failures=bindparam("failures"),
    last_failure_at=bindparam("now"),
    locked_until=bindparam("until"),
    in_flight=bindparam("in_flight"),
    in_flight_at=bindparam("in_flight_at"),
)
_NEXT_FAILURE = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("address"))
    .values(
        failures=bindparam("failures"),
        last_failure_at=bindparam("now"),
        locked_until=bindparam("until"),
        in_flight=bindparam("in_flight"),
    )
)
_RESERVE = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("address"))
    .values(in_flight=bindparam("in_flight"), in_flight_at=bindparam("now"))
)
_GIVE_BACK = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("address"), LoginThrottle.in_flight > 0)
    .values(in_flight=LoginThrottle.in_flight - 1)
)
_CLEAR = delete(LoginThrottle).where(LoginThrottle.email == bindparam("address"))


# Housekeeping, in batches (db/services/batches.py), found by the last_failure_at index.
def _quiet(row: Any) -> Any:
    return and_(
        row.last_failure_at < bindparam("quiet_since"),
        # The code lockout's rows (code_lockout_key) share the table: they are forgotten
        # only after its own reset, however short this lockout's is.
        or_(
            ~row.email.startswith(literal("code:")),
            row.last_failure_at < bindparam("code_quiet_since"),
        ),
        or_(row.locked_until.is_(None), row.locked_until < bindparam("now")),
        or_(row.in_flight_at.is_(None), row.in_flight_at < bindparam("stale")),
    )


_PRUNE = delete(LoginThrottle).where(
    AnyOf(
        LoginThrottle.email,
        chosen(LoginThrottle, _quiet, key="email", order_by=lambda row: row.last_failure_at),
    )
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
        refusal: str = SIGN_IN_REFUSAL,
    ) -> None:
        self.refusal = refusal
        self.statements = statements
        self.clock = clock
        self.threshold = threshold
        self.base = base
        self.cap = cap
        self.reset_after = reset_after

    async def reserve(self, email: str) -> None:
        """Reserves one password check for the address before its hash, under the row's
        lock; RATE_LIMITED (nothing reserved) while the address is locked, or while the
        checks already in flight would take it past the threshold. Settle it with
        failed(), succeeded() or give_back()."""
        now = self.clock.now()
        for _attempt in range(3):
            try:
                async with self.statements.transaction() as tx:
                    state = await tx.first(_LOCK_ROW, {"address": email})
                    if state is None:
                        await tx.execute(
                            _FIRST_FAILURE,
                            {
                                "address": email,
                                "failures": 0,
                                "now": now,
                                "until": None,
                                "in_flight": 1,
                                "in_flight_at": now,
                            },
                        )
                        return
                    self._refuse_if_locked(state["locked_until"], now)
                    failures = self._current(state, now)
                    in_flight = state["in_flight"]
                    if state["in_flight_at"] is None or now - state["in_flight_at"] >= (
                        STALE_IN_FLIGHT
                    ):
                        in_flight = 0
                    # Past the threshold, one check at a time (one per lock period).
                    if in_flight >= max(1, self.threshold - failures):
                        raise AuthFailure(
                            ErrorCode.RATE_LIMITED,
                            "Too many sign-ins for this address at once; try again in a moment.",
                            retry_after=1,
                        )
                    await tx.execute(
                        _RESERVE, {"address": email, "in_flight": in_flight + 1, "now": now}
                    )
                return
            except UniqueViolation:
                continue  # a concurrent first attempt made the row: reserve on top of it

    async def failed(self, email: str) -> datetime | None:
        """Settles a reserved check as a failure; the end of the lock it starts, if it
        starts one."""
        now = self.clock.now()
        for _attempt in range(3):
            try:
                async with self.statements.transaction() as tx:
                    state = await tx.first(_LOCK_ROW, {"address": email})
                    failures = 1 + (self._current(state, now) if state is not None else 0)
                    until = self._lock_end(failures, now)
                    params = {
                        "address": email,
                        "failures": failures,
                        "now": now,
                        "until": until,
                        "in_flight": max(0, state["in_flight"] - 1) if state is not None else 0,
                    }
                    if state is None:  # a success cleared the row meanwhile
                        await tx.execute(_FIRST_FAILURE, {**params, "in_flight_at": None})
                    else:
                        # Exactly the statement's parameters: on SQLite, a key naming a
                        # column the statement does not set would be set too.
                        await tx.execute(_NEXT_FAILURE, params)
                return until
            except UniqueViolation:
                continue  # a concurrent first failure made the row: count on top of it
        return None  # pragma: no cover - the row exists after the first conflict

    async def give_back(self, email: str) -> None:
        """Settles a reserved check that never ran (a busy hasher): not a failure."""
        async with self.statements.standalone() as tx:
            await tx.execute(_GIVE_BACK, {"address": email})

    async def succeeded(self, tx: Runner, email: str) -> None:
        """The right password: the count and the reservations are cleared, in the
        transaction that signs in."""
        await tx.execute(_CLEAR, {"address": email})

    async def prune(self, batching: Batching | None = None) -> int:
        """Forgets addresses quiet for longer than the reset period (the code lockout's:
        for longer than CODE_LOCKOUT_RESET as well), in batches."""
        now = self.clock.now()
        done = await until_done(
            self.statements,
            "throttles",
            _PRUNE,
            {
                "quiet_since": now - self.reset_after,
                "code_quiet_since": now - max(self.reset_after, CODE_LOCKOUT_RESET),
                "now": now,
                "stale": now - STALE_IN_FLIGHT,
            },
            batching or Batching(),
        )
        return done.rows

    def steps(self, failures: int) -> timedelta | None:
        """How long the `failures`-th failure in a row locks the address."""
        if failures < self.threshold:
            return None
        doublings = min(failures - self.threshold, 32)
        step: timedelta = self.base * (1 << doublings)
        return step if step < self.cap else self.cap

    def _current(self, state: Any, now: datetime) -> int:
        """The failures still counted (none once RESET has passed without one)."""
        if now - state["last_failure_at"] < self.reset_after:
            return int(state["failures"])
        return 0

    def _lock_end(self, failures: int, now: datetime) -> datetime | None:
        step = self.steps(failures)
        return None if step is None else now + step

    def _refuse_if_locked(self, locked_until: datetime | None, now: datetime) -> None:
        if locked_until is not None and locked_until > now:
            wait = math.ceil((locked_until - now).total_seconds())
            raise AuthFailure(ErrorCode.RATE_LIMITED, self.refusal, retry_after=max(1, wait))


# -- wrong codes per account and client ------------------------------------------------------

# Wrong codes (TOTP, recovery, emailed) per account and client, across challenges and
# mutations, before code checks refuse.
ACCOUNT_CODE_FAILURES = 10
ACCOUNT_CODE_WINDOW = timedelta(minutes=15)

# In the throttles table under a key of their own ("otp:<account>:<client>"): the
# window's start, and the checks counted in it.
_CHECKS = (
    select(LoginThrottle.failures, LoginThrottle.last_failure_at)
    .where(LoginThrottle.email == bindparam("key"))
    .with_for_update()
)
_FIRST_CHECK = insert(LoginThrottle).values(
    email=bindparam("key"),
    failures=literal(1),
    last_failure_at=bindparam("now"),
    locked_until=null(),
)
_SET_CHECKS = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("key"))
    .values(failures=bindparam("failures"), last_failure_at=bindparam("since"))
)
_REFUND_CHECK = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("key"), LoginThrottle.failures > 0)
    .values(failures=LoginThrottle.failures - 1)
)


def address_digest(address: str) -> str:
    """An address in a throttle key: fixed length (the key column holds 254 characters),
    and not the address itself."""
    return hashlib.sha256(address.encode("utf-8")).hexdigest()[:32]


def code_lockout_key(address: str) -> str:
    """The emailed-code lockout's row of a (normalized) address."""
    return f"code:{address_digest(address)}"


def code_check_key(account: str, client: str) -> str:
    """The counter of one account's wrong codes from one client (its device, else its
    address): other clients' guesses never use up this one's budget."""
    return f"otp:{account}:{client}"


class CodeChecks:
    """Every code checked against an account first takes one of the window's checks; a
    right code gives it back, so only wrong ones count. The row lock serialises parallel
    guesses, so none passes the cap."""

    def __init__(self, *, statements: Statements, clock: Clock) -> None:
        self.statements = statements
        self.clock = clock

    async def reserve(self, key: str) -> None:
        """Takes one check, or RATE_LIMITED when the window's are used up."""
        now = self.clock.now()
        for _attempt in range(3):
            try:
                async with self.statements.transaction() as tx:
                    row = await tx.first(_CHECKS, {"key": key})
                    if row is None:
                        await tx.execute(_FIRST_CHECK, {"key": key, "now": now})
                        return
                    since, failures = row["last_failure_at"], row["failures"]
                    if now - since >= ACCOUNT_CODE_WINDOW or failures == 0:
                        since, failures = now, 0  # a new window
                    if failures >= ACCOUNT_CODE_FAILURES:
                        wait = (since + ACCOUNT_CODE_WINDOW - now).total_seconds()
                        raise AuthFailure(
                            ErrorCode.RATE_LIMITED,
                            "Too many wrong codes for this account; try again later.",
                            retry_after=max(1, math.ceil(wait)),
                        )
                    await tx.execute(
                        _SET_CHECKS, {"key": key, "failures": failures + 1, "since": since}
                    )
                    return
            except UniqueViolation:
                continue  # a concurrent first check made the row: count on top of it

    async def give_back(self, tx: Runner, key: str) -> None:
        """A right code: its check does not count (in the transaction that spends it)."""
        await tx.execute(_REFUND_CHECK, {"key": key})
