"""The way in by password: proving one (budgets, lockout, the hash), signing in with it,
stepping up with it, checking it before a sensitive change, and changing it. What follows
a right password is decided by signin/conclusion.py.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode
from db.mail.outbox import Outbox
from db.models import User
from db.security.access import AccessClaims
from db.security.device import device_budget
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher
from db.services.challenges import Challenges
from db.services.device_trust import DeviceTrust
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import Lockout
from db.services.notices import Notices
from db.services.sessions import HAS_PASSWORD, OTP_CONFIRMED, WITH_TOTP, Sessions
from db.services.signin.conclusion import NEW_PASSWORD, USER_BY_ID, Conclusion, step_up
from db.services.types import (
    AMR_PASSWORD,
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    UserView,
    user_view,
)
from db.session import Runner, Statements
from db.validation import could_be_a_password, normalize_password, parse_email

INVALID_CREDENTIALS_MESSAGE = "The email or password is incorrect."

_USER_BY_EMAIL = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.password_hash,
        User.password_changed_at,
        User.is_active,
        User.device_epoch,
        OTP_CONFIRMED,
        HAS_PASSWORD,
    )
    .outerjoin(*WITH_TOTP)
    .where(User.email_normalized == bindparam("email"))
)

_UPGRADE_HASH = (
    update(User)
    .where(User.id == bindparam("user_id"), User.password_hash == bindparam("old_hash"))
    .values(password_hash=bindparam("new_hash"), updated_at=bindparam("now"))
)

# A changed password (NEW_PASSWORD, see signin/conclusion.py): only over the password as
# it was when checked (a concurrent change wins, not both), and every device token ends
# (the asking session's client gets a new one).
_CHANGE_PASSWORD = (
    update(User)
    .where(
        User.id == bindparam("uid"),
        User.password_changed_at.is_not_distinct_from(bindparam("checked_at")),
    )
    .values(**NEW_PASSWORD, device_epoch=User.device_epoch + 1)
)


@dataclass(frozen=True, slots=True)
class ProvenPassword:
    """A password checked against an account: its replacement hash, if it wants one, and
    the address whose lockout holds the check's reservation (None for a device token's
    holder), cleared by the transaction that acts on it (see Passwords.acting)."""

    new_hash: str | None
    reserved: str | None


class Passwords:
    def __init__(
        self,
        *,
        statements: Statements,
        hasher: PasswordHasher,
        clock: Clock,
        limiter: RateLimiter,
        trust: DeviceTrust,
        lockout: Lockout,
        events: SecurityEvents,
        outbox: Outbox,
        challenges: Challenges,
        notices: Notices,
        sessions: Sessions,
        conclusion: Conclusion,
    ) -> None:
        self.statements = statements
        self.hasher = hasher
        self.clock = clock
        self.limiter = limiter
        self.trust = trust
        self.lockout = lockout
        self.events = events
        self.outbox = outbox
        self.challenges = challenges
        self.notices = notices
        self.sessions = sessions
        self.conclusion = conclusion

    # -- signing in, stepping up --------------------------------------------------------

    async def login(
        self, *, email: str, password: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Check a password and sign in. One answer whether the email is unknown, the
        account has no password or the password is wrong, in about the same time."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        await self.limiter.hit("login_ip", client_key(client.ip))
        password = normalize_password(password)
        try:
            normalized: str | None = parse_email(email).normalized
        except AuthFailure:
            normalized = None  # cannot be registered; answered like an unknown address
        user: Mapping[str, Any] | None = None
        if normalized is not None:
            async with self.statements.connection() as conn:
                user = await conn.first(_USER_BY_EMAIL, {"email": normalized})
        proven = await self.prove_password(
            account=user,
            normalized=normalized,
            password=password,
            client=client,
            failure=_invalid_credentials,
        )
        assert user is not None  # noqa: S101 - the password matched
        async with self.acting(proven) as tx:
            await self._still_the_password(tx, user, _invalid_credentials)
            issued = await self.conclusion.conclude(
                tx, user["id"], amr=AMR_PASSWORD, client=client, verify_address=True
            )
        await self._after_password(user, proven)
        return issued

    async def reauthenticate(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        address: str,
        password: str,
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """Step-up on this session by its password (its wrong attempts count as a
        login's); then the TOTP step where two-factor is on."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        await self.limiter.hit("login_ip", client_key(client.ip))
        async with self.statements.connection() as conn:
            account = await conn.first(_USER_BY_EMAIL, {"email": address})
        if account is None or account["id"] != user.id:
            raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
        proven = await self.prove_password(
            account=account,
            normalized=address,
            password=normalize_password(password),
            client=client,
            failure=_wrong_password,
            not_session=claims.session_id,
        )
        async with self.acting(proven) as tx:
            await self._still_the_password(tx, account, _wrong_password)
            issued = await self.conclusion.conclude(
                tx, user.id, amr=AMR_PASSWORD, client=client, intent=step_up(claims.session_id)
            )
        await self._after_password(account, proven)
        return issued

    async def check_current_password(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        password: str | None,
        client: ClientInfo,
        failure: Callable[[], AuthFailure],
    ) -> datetime | None:
        """The operations that take the current password: given, it is checked as a
        sign-in checks it (lockout, budgets; a wrong one counts); omitted, the session
        must have signed in recently. Returns the password's password_changed_at as it
        stood (an action re-checks it under the account's lock)."""
        address = parse_email(user.email).normalized
        async with self.statements.connection() as conn:
            account = await conn.first(_USER_BY_EMAIL, {"email": address})
        if account is None or account["id"] != user.id:
            raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
        if password is None:
            self.sessions.require_recent(claims)
        else:
            proven = await self.prove_password(
                account=account,
                normalized=address,
                password=normalize_password(password),
                client=client,
                failure=failure,
                not_session=claims.session_id,
            )
            async with self.acting(proven):
                pass  # nothing to do but what a right password always does: clear the count
            await self._after_password(account, proven)
        checked_at: datetime | None = account["password_changed_at"]
        return checked_at

    # -- proving a password ------------------------------------------------------------

    async def prove_password(
        self,
        *,
        account: Mapping[str, Any] | None,
        normalized: str | None,
        password: str,
        client: ClientInfo,
        failure: Callable[[], AuthFailure],
        not_session: uuid.UUID | None = None,
    ) -> ProvenPassword:
        """Checks a password against an account (None: an unknown address; a miss costs
        what a hit costs), as every way in by password does. Before any hash: a client
        holding a device token good for the account (and not issued with `not_session`,
        the session being stepped up) spends its device's budget and its device's own
        lockout (OWASP's device cookies); any other spends the account's budget and the
        address's lockout. Each check is reserved with its lockout (refused while locked),
        so parallel guesses cannot pass the threshold. A wrong
        password is counted and recorded (LOGIN_FAILED, LOCKED_OUT); `failure` is what the
        caller answers then. A right one leaves the reservation for the caller to clear
        (lockout.succeeded) in the transaction that acts on it."""
        device = None
        if account is not None:
            device = await self.trust.device_of(client, account["id"], not_session=not_session)
        reserved = None  # the key whose lockout holds this check's reservation
        if device is not None:
            reserved = device_budget(device)
            await self.limiter.hit("login_account", reserved)
            await self.lockout.reserve(reserved)
        elif normalized is not None:
            await self.limiter.hit("login_account", normalized)
            await self.lockout.reserve(normalized)
            reserved = normalized
        try:
            if not could_be_a_password(password):
                raise failure()
            stored = account["password_hash"] if account is not None else None
            if stored is None:
                # An unknown address, or an account without a password: the same work.
                await self.hasher.verify_dummy(password)
                raise failure()
            ok, new_hash = await self.hasher.verify(password, stored)
            if not ok:
                raise failure()
        except AuthFailure as refused:
            if refused.code is ErrorCode.RATE_LIMITED:
                # A busy hasher checked nothing: the attempt is not a failure.
                if reserved is not None:
                    await self.lockout.give_back(reserved)
                raise
            locked_until = await self.lockout.failed(reserved) if reserved is not None else None
            await self._login_failed(account, normalized, client, locked_until)
            raise
        except BaseException:
            if reserved is not None:  # cancelled or crashed mid-check: no failure either
                await self.lockout.give_back(reserved)
            raise
        return ProvenPassword(new_hash=new_hash, reserved=reserved)

    @contextlib.asynccontextmanager
    async def acting(self, proven: ProvenPassword) -> AsyncIterator[Runner]:
        """The transaction that acts on a right password: it clears the address's failure
        count and the check's reservation; where it fails, the reservation is given back."""
        try:
            async with self.events.transaction(self.statements) as tx:
                yield tx
                # Last: the account's lock comes first in every transaction (_LOCK_USER).
                if proven.reserved is not None:
                    await self.lockout.succeeded(tx, proven.reserved)
        except BaseException:
            if proven.reserved is not None:
                await self.lockout.give_back(proven.reserved)
            raise

    async def _still_the_password(
        self, tx: Runner, account: Mapping[str, Any], failure: Callable[[], AuthFailure]
    ) -> None:
        """First in the transaction that acts on a checked password, under the account's
        shared lock: it is still the password (a change or reset since ends the attempt)."""
        locked = await self.sessions.lock_user(tx, account["id"], exclusive=False)
        if locked is None or locked["password_changed_at"] != account["password_changed_at"]:
            raise failure()

    async def _after_password(self, account: Mapping[str, Any], proven: ProvenPassword) -> None:
        """After the commit: a legacy or weaker hash is replaced, in a transaction of its
        own (it takes the row exclusively, which concurrent sign-ins holding it shared
        must not wait for each other on)."""
        if proven.new_hash is not None:
            async with self.events.transaction(self.statements) as tx:
                await self._upgrade_hash(tx, account, proven.new_hash)
        self.outbox.wake()

    async def _login_failed(
        self,
        user: Mapping[str, Any] | None,
        normalized: str | None,
        client: ClientInfo,
        locked_until: datetime | None,
    ) -> None:
        """LOGIN_FAILED (and LOCKED_OUT when this failure started a lock), in their own
        transaction: the sign-in's own has nothing to commit."""
        user_id = user["id"] if user is not None else None
        async with self.events.transaction(self.statements) as tx:
            await self.events.record(
                tx, EventKind.LOGIN_FAILED, user_id=user_id, client=client, email=normalized
            )
            if locked_until is not None:
                await self.events.record(
                    tx,
                    EventKind.LOCKED_OUT,
                    user_id=user_id,
                    client=client,
                    email=normalized,
                    details={"until": locked_until.isoformat()},
                )

    async def _upgrade_hash(self, tx: Runner, user: Mapping[str, Any], new_hash: str) -> None:
        """A legacy or weaker hash is replaced, unless the password changed meanwhile."""
        await tx.execute(
            _UPGRADE_HASH,
            {
                "user_id": user["id"],
                "old_hash": user["password_hash"],
                "new_hash": new_hash,
                "now": self.clock.now(),
            },
        )

    # -- changing it --------------------------------------------------------------------

    async def change_password_now(
        self,
        tx: Runner,
        *,
        user: UserView,
        session_id: uuid.UUID,
        checked_at: datetime | None,
        new_hash: str,
        client: ClientInfo,
    ) -> UserView | None:
        """Sets a new password (an account without one gets its first) over the password
        as it stood when checked (`checked_at`: its password_changed_at), ends every other
        session, every device token and pending step, and tells the owner. Returns the
        user as it is now; None when the password changed meanwhile. The caller holds the
        user's lock (lock_user)."""
        changed = await tx.execute(
            _CHANGE_PASSWORD,
            {
                "uid": user.id,
                "checked_at": checked_at,
                "new_hash": new_hash,
                "now": self.clock.now(),
            },
        )
        if not changed:
            return None
        await self.sessions.end_sessions(tx, user.id, keep=session_id, reason="password_changed")
        await self.challenges.void_all(tx, user.id)
        await self.notices.send(
            tx, user_id=user.id, email=user.email, template="password_changed", client=client
        )
        await self.events.record(
            tx,
            EventKind.PASSWORD_CHANGED,
            user_id=user.id,
            session_id=session_id,
            client=client,
            details={"first": not user.has_password},
        )
        row = await tx.first(USER_BY_ID, {"user_id": user.id})
        assert row is not None  # noqa: S101 - the row is locked by this transaction
        return user_view(row)


def _invalid_credentials() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS_MESSAGE)


def _wrong_password() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_CREDENTIALS, "The password is incorrect.", field="password"
    )
