"""What an operator does to one account from the command line (`strawgate users`): look
at it, disable and enable it, clear its lockout, end its sessions, remove a passkey.

Every change runs in one transaction in the order the rest of the code locks in: the
user's row first (exclusively), then the user's sessions by id; it is written to the
audit trail (OPERATOR_* events, naming the operator's login) in the same transaction.
An action that finds nothing to do changes nothing and writes no event. Nothing shown
or recorded here is a secret: no password hash, token, digest or sealed secret is read."""

from __future__ import annotations

import json
import os
import pwd
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, insert, select, update

from db.clock import Clock
from db.errors import AuthFailure
from db.models import (
    Identity,
    LoginThrottle,
    Passkey,
    SecurityEvent,
    User,
    UserRole,
    UserSession,
)
from db.services.account import ACCOUNT_BY_EMAIL
from db.services.challenges import void_pending
from db.services.events import DetailValue, EventKind, SecurityEvents
from db.services.lockout import code_lockout_key
from db.services.sessions import (
    end_device_tokens,
    end_live_sessions,
    lock_account,
    lock_account_sessions,
)
from db.session import Runner, Statements
from db.validation import parse_email

if TYPE_CHECKING:
    from db.security.limiter import RateLimiter

RECENT_EVENTS = 10
# The per-account rate limit of sign-ins (db/services/signin/password.py), keyed by
# normalized email.
LOGIN_ACCOUNT_LIMIT = "login_account"

_SET_ACTIVE = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(is_active=bindparam("active"), updated_at=bindparam("now"))
)

_LIVE = (UserSession.revoked_at.is_(None), UserSession.expires_at > bindparam("now"))

# The lockout's row (db/services/lockout.py), keyed by the normalized email; and the
# wrong-code counters of the account, one per client ("otp:<user id>:<client>", see
# TwoFactor.check_code in db/services/mfa.py).
_LOCKOUT_STATE = select(
    LoginThrottle.failures, LoginThrottle.last_failure_at, LoginThrottle.locked_until
).where(LoginThrottle.email == bindparam("email"))
_CLEAR_LOCKOUT = delete(LoginThrottle).where(LoginThrottle.email == bindparam("email"))
# The address's code lockouts (its own, and per network of the account's own clients).
_CLEAR_CODE_LOCKOUTS = delete(LoginThrottle).where(LoginThrottle.email.startswith(bindparam("key")))
_CODE_FAILURES = select(func.coalesce(func.sum(LoginThrottle.failures), 0).label("n")).where(
    LoginThrottle.email.like(bindparam("pattern"))
)
_CLEAR_CODE_FAILURES = delete(LoginThrottle).where(LoginThrottle.email.like(bindparam("pattern")))

_LIVE_SESSIONS = (
    select(
        UserSession.id,
        UserSession.created_at,
        UserSession.last_used_at,
        UserSession.expires_at,
        UserSession.user_agent,
        UserSession.ip,
        UserSession.amr,
    )
    .where(UserSession.user_id == bindparam("uid"), *_LIVE)
    .order_by(UserSession.last_used_at.desc(), UserSession.id)
)

_RECENT_EVENTS = (
    select(SecurityEvent.at, SecurityEvent.kind, SecurityEvent.ip, SecurityEvent.details)
    .where(SecurityEvent.user_id == bindparam("uid"))
    .order_by(SecurityEvent.id.desc())
    .limit(bindparam("n"))
)
_PASSKEYS = (
    select(Passkey.id, Passkey.name, Passkey.created_at, Passkey.last_used_at, Passkey.backed_up)
    .where(Passkey.user_id == bindparam("uid"))
    .order_by(Passkey.created_at.desc(), Passkey.id)
)
_ROLES = (
    select(UserRole.role, UserRole.granted_at, UserRole.granted_by)
    .where(UserRole.user_id == bindparam("uid"))
    .order_by(UserRole.role)
)
_GRANT_ROLE = insert(UserRole).values(
    user_id=bindparam("uid"),
    role=bindparam("role"),
    granted_at=bindparam("now"),
    granted_by=bindparam("operator"),
)
_REVOKE_ROLE = delete(UserRole).where(
    UserRole.user_id == bindparam("uid"), UserRole.role == bindparam("role")
)
_HAS_ROLE = select(UserRole.role).where(
    UserRole.user_id == bindparam("uid"), UserRole.role == bindparam("role")
)
# A role's name: what resource servers compare, so plain (no spaces: a claim's list).
ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
_IDENTITIES = (
    select(Identity.provider, Identity.email, Identity.created_at, Identity.last_used_at)
    .where(Identity.user_id == bindparam("uid"))
    .order_by(Identity.created_at, Identity.id)
)
_REMOVE_PASSKEY = (
    delete(Passkey)
    .where(Passkey.id == bindparam("pid"), Passkey.user_id == bindparam("uid"))
    .returning(Passkey.name)
)


class InvalidEmail(ValueError):
    """What was given is no email address (the message says why)."""


class BadRoleName(ValueError):
    """A role name that cannot be one (see ROLE_NAME)."""


class UnknownPasskey(LookupError):
    """No passkey with this id on the account."""

    def __init__(self, passkey_id: str) -> None:
        super().__init__(passkey_id)
        self.passkey_id = passkey_id


class UnknownAccount(LookupError):
    """No account has this (normalized) email."""

    def __init__(self, email: str) -> None:
        super().__init__(email)
        self.email = email


def normalized_email(email: str) -> str:
    """The address as accounts are looked up by; InvalidEmail when it is none."""
    try:
        return parse_email(email).normalized
    except AuthFailure as failure:
        raise InvalidEmail(failure.message) from None


def operator_name() -> str:
    """Who runs the command, by the process's user id (not LOGNAME or USER, which anyone
    can set), with the user sudo was run by where it was."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no passwd entry (a container's arbitrary uid, say)
        name = f"uid {os.getuid()}"
    sudo_user = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo_user})" if sudo_user and os.getuid() == 0 else name


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    user_agent: str | None
    ip: str | None
    amr: str


@dataclass(frozen=True, slots=True)
class EventInfo:
    at: datetime
    kind: str
    ip: str | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LockoutState:
    failures: int  # failed sign-ins counted against the address
    last_failure_at: datetime | None
    locked_until: datetime | None  # set only while the address is locked
    code_failures: int  # wrong codes counted against the account (all clients)

    @property
    def locked(self) -> bool:
        return self.locked_until is not None


@dataclass(frozen=True, slots=True)
class PasskeyInfo:
    id: uuid.UUID
    name: str
    created_at: datetime
    last_used_at: datetime | None
    backed_up: bool  # synced across the user's devices


@dataclass(frozen=True, slots=True)
class IdentityInfo:
    provider: str
    email: str | None  # the address the provider gave
    linked_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class RoleList:
    """What `users roles list` prints."""

    email: str
    roles: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"email": self.email, "roles": self.roles}


@dataclass(frozen=True, slots=True)
class AccountReport:
    """What `users show` prints."""

    id: uuid.UUID
    email: str
    active: bool
    created_at: datetime
    email_verified_at: datetime | None
    two_factor: str  # "on", "pending" (set up, not confirmed) or "off"
    two_factor_since: datetime | None
    lockout: LockoutState
    sessions: list[SessionInfo]
    events: list[EventInfo]
    passkeys: list[PasskeyInfo] = field(default_factory=list)  # newest first
    identities: list[IdentityInfo] = field(default_factory=list)  # oldest first
    roles: list[str] = field(default_factory=list)  # sorted

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "email": self.email,
            "status": "active" if self.active else "disabled",
            "created_at": _iso(self.created_at),
            "email_verified": self.email_verified_at is not None,
            "email_verified_at": _iso(self.email_verified_at),
            "two_factor": self.two_factor,
            "two_factor_since": _iso(self.two_factor_since),
            "passkeys": [
                {
                    "id": str(p.id),
                    "name": p.name,
                    "created_at": _iso(p.created_at),
                    "last_used_at": _iso(p.last_used_at),
                    "backed_up": p.backed_up,
                }
                for p in self.passkeys
            ],
            "roles": self.roles,
            "identities": [
                {
                    "provider": i.provider,
                    "email": i.email,
                    "linked_at": _iso(i.linked_at),
                    "last_used_at": _iso(i.last_used_at),
                }
                for i in self.identities
            ],
            "lockout": {
                "locked": self.lockout.locked,
                "failures": self.lockout.failures,
                "last_failure_at": _iso(self.lockout.last_failure_at),
                "locked_until": _iso(self.lockout.locked_until),
                "code_failures": self.lockout.code_failures,
            },
            "sessions": [
                {
                    "id": str(s.id),
                    "created_at": _iso(s.created_at),
                    "last_used_at": _iso(s.last_used_at),
                    "expires_at": _iso(s.expires_at),
                    "user_agent": s.user_agent,
                    "ip": s.ip,
                    "amr": s.amr.split(),
                }
                for s in self.sessions
            ],
            "events": [
                {"at": _iso(e.at), "kind": e.kind, "ip": e.ip, "details": e.details}
                for e in self.events
            ],
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one of disable, enable, unlock or logout did."""

    action: str
    email: str
    user_id: uuid.UUID
    changed: bool  # False: the account already was as asked (no event written)
    active: bool  # afterwards
    sessions_ended: int = 0
    challenges_voided: int = 0
    failures_cleared: int = 0  # failed sign-ins the lockout had counted
    code_failures_cleared: int = 0  # wrong codes counted against the account
    # unlock: whether the per-account sign-in rate limit was cleared in Redis (None: no
    # Redis configured, nothing shared to clear).
    rate_limit_cleared: bool | None = None
    details: dict[str, DetailValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "action": self.action,
            "email": self.email,
            "user_id": str(self.user_id),
            "changed": self.changed,
            "status": "active" if self.active else "disabled",
            "sessions_ended": self.sessions_ended,
            "challenges_voided": self.challenges_voided,
            "failures_cleared": self.failures_cleared,
            "code_failures_cleared": self.code_failures_cleared,
            "rate_limit_cleared": self.rate_limit_cleared,
        }
        if self.action == "passkeys remove":
            found["passkey"] = {"id": self.details["passkey"], "name": self.details["name"]}
        return found


class Operator:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        events: SecurityEvents,
        limiter: RateLimiter | None = None,
        operator: str | None = None,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.events = events
        # Where the shared (Redis) counters live; None leaves rate limits alone.
        self.limiter = limiter
        self.operator = operator or operator_name()

    async def show(self, email: str) -> AccountReport:
        normalized = normalized_email(email)
        now = self.clock.now()
        async with self.statements.connection() as conn:
            user = await conn.first(ACCOUNT_BY_EMAIL, {"email": normalized})
            if user is None:
                raise UnknownAccount(normalized)
            uid = user["id"]
            throttle = await conn.first(_LOCKOUT_STATE, {"email": normalized})
            codes = await conn.first(_CODE_FAILURES, {"pattern": _code_pattern(uid)})
            sessions = await conn.all(_LIVE_SESSIONS, {"uid": uid, "now": now})
            events = await conn.all(_RECENT_EVENTS, {"uid": uid, "n": RECENT_EVENTS})
            passkeys = await conn.all(_PASSKEYS, {"uid": uid})
            identities = await conn.all(_IDENTITIES, {"uid": uid})
            roles = await conn.all(_ROLES, {"uid": uid})
        locked_until = throttle["locked_until"] if throttle is not None else None
        if user["otp_confirmed_at"] is not None:
            two_factor, since = "on", user["otp_confirmed_at"]
        elif user["otp_created_at"] is not None:
            two_factor, since = "pending", None
        else:
            two_factor, since = "off", None
        return AccountReport(
            id=uid,
            email=user["email"],
            active=bool(user["is_active"]),
            created_at=user["created_at"],
            email_verified_at=user["email_verified_at"],
            two_factor=two_factor,
            two_factor_since=since,
            passkeys=[
                PasskeyInfo(
                    id=row["id"],
                    name=row["name"],
                    created_at=row["created_at"],
                    last_used_at=row["last_used_at"],
                    backed_up=bool(row["backed_up"]),
                )
                for row in passkeys
            ],
            roles=[row["role"] for row in roles],
            identities=[
                IdentityInfo(
                    provider=row["provider"],
                    email=row["email"],
                    linked_at=row["created_at"],
                    last_used_at=row["last_used_at"],
                )
                for row in identities
            ],
            lockout=LockoutState(
                failures=throttle["failures"] if throttle is not None else 0,
                last_failure_at=throttle["last_failure_at"] if throttle is not None else None,
                locked_until=locked_until
                if locked_until is not None and locked_until > now
                else None,
                code_failures=int(codes["n"]) if codes is not None else 0,
            ),
            sessions=[
                SessionInfo(
                    id=row["id"],
                    created_at=row["created_at"],
                    last_used_at=row["last_used_at"],
                    expires_at=row["expires_at"],
                    user_agent=row["user_agent"],
                    ip=row["ip"],
                    amr=row["amr"],
                )
                for row in sessions
            ],
            events=[
                EventInfo(
                    at=row["at"], kind=row["kind"], ip=row["ip"], details=_loads(row["details"])
                )
                for row in events
            ],
        )

    async def disable(self, email: str) -> Outcome:
        """Disables the account and ends everything it is signed in with: its live
        sessions, its device tokens, its pending challenges. Sign-in then answers
        ACCOUNT_DISABLED after the right password. Disabling a disabled account ends
        whatever might still be live (nothing, normally) and is otherwise a no-op."""
        normalized = normalized_email(email)
        now = self.clock.now()
        async with self.events.transaction(self.statements) as tx:
            uid, was_active = await self._lock(tx, normalized)
            if was_active:
                await tx.execute(_SET_ACTIVE, {"uid": uid, "active": False, "now": now})
            ended = await self._end_sessions(tx, uid, now, reason="operator_disable")
            voided = await void_pending(tx, uid, now)
            changed = was_active or ended > 0 or voided > 0
            details: dict[str, DetailValue] = {
                "operator": self.operator,
                "sessions": ended,
                "challenges": voided,
            }
            if changed:
                await end_device_tokens(tx, uid)
                await self.events.record(
                    tx, EventKind.OPERATOR_DISABLE, user_id=uid, details=details
                )
        return Outcome(
            action="disable",
            email=normalized,
            user_id=uid,
            changed=changed,
            active=False,
            sessions_ended=ended,
            challenges_voided=voided,
            details=details,
        )

    async def enable(self, email: str) -> Outcome:
        """Lets the account sign in again (its ended sessions stay ended)."""
        normalized = normalized_email(email)
        now = self.clock.now()
        async with self.events.transaction(self.statements) as tx:
            uid, was_active = await self._lock(tx, normalized)
            details: dict[str, DetailValue] = {"operator": self.operator}
            if not was_active:
                await tx.execute(_SET_ACTIVE, {"uid": uid, "active": True, "now": now})
                await self.events.record(
                    tx, EventKind.OPERATOR_ENABLE, user_id=uid, details=details
                )
        return Outcome(
            action="enable",
            email=normalized,
            user_id=uid,
            changed=not was_active,
            active=True,
            details=details,
        )

    async def unlock(self, email: str) -> Outcome:
        """Clears the address's lockout (its failed sign-ins) and the account's wrong-code
        counters; with a limiter, also the address's per-account sign-in rate limit in
        the shared store (Redis). The event is written when a counter was cleared in the
        database."""
        normalized = normalized_email(email)
        async with self.events.transaction(self.statements) as tx:
            uid, active = await self._lock(tx, normalized)
            throttle = await tx.first(_LOCKOUT_STATE, {"email": normalized})
            failures = throttle["failures"] if throttle is not None else 0
            cleared = await tx.execute(_CLEAR_LOCKOUT, {"email": normalized})
            cleared += await tx.execute(_CLEAR_CODE_LOCKOUTS, {"key": code_lockout_key(normalized)})
            pattern = {"pattern": _code_pattern(uid)}
            codes = await tx.first(_CODE_FAILURES, pattern)
            code_failures = int(codes["n"]) if codes is not None else 0
            code_rows = await tx.execute(_CLEAR_CODE_FAILURES, pattern)
            changed = cleared > 0 or code_rows > 0
            details: dict[str, DetailValue] = {
                "operator": self.operator,
                "failures": failures,
                "otp_failures": code_failures,
            }
            if changed:
                await self.events.record(
                    tx, EventKind.OPERATOR_UNLOCK, user_id=uid, details=details
                )
        rate_limit_cleared = await self._clear_rate_limit(normalized)
        return Outcome(
            action="unlock",
            email=normalized,
            user_id=uid,
            changed=changed,
            active=active,
            failures_cleared=failures,
            code_failures_cleared=code_failures,
            rate_limit_cleared=rate_limit_cleared,
            details=details,
        )

    async def logout(self, email: str) -> Outcome:
        """Ends every live session of the account and every device token (as a logout
        everywhere does). Always a change: device tokens leave no row to count."""
        normalized = normalized_email(email)
        now = self.clock.now()
        async with self.events.transaction(self.statements) as tx:
            uid, active = await self._lock(tx, normalized)
            ended = await self._end_sessions(tx, uid, now, reason="operator_logout")
            await end_device_tokens(tx, uid)
            details: dict[str, DetailValue] = {"operator": self.operator, "sessions": ended}
            await self.events.record(tx, EventKind.OPERATOR_LOGOUT, user_id=uid, details=details)
        return Outcome(
            action="logout",
            email=normalized,
            user_id=uid,
            changed=True,
            active=active,
            sessions_ended=ended,
            details=details,
        )

    async def roles(self, email: str) -> list[str]:
        """The account's roles, sorted."""
        normalized = normalized_email(email)
        async with self.statements.connection() as conn:
            user = await conn.first(ACCOUNT_BY_EMAIL, {"email": normalized})
            if user is None:
                raise UnknownAccount(normalized)
            rows = await conn.all(_ROLES, {"uid": user["id"]})
        return [row["role"] for row in rows]

    async def change_role(self, email: str, role: str, *, grant: bool) -> Outcome:
        """Grants (or takes away) a role, recorded as ROLES_CHANGED naming the role and the
        operator. Access tokens carry it from the user's next sign-in or refresh, so
        resource servers see it within ACCESS_TOKEN_EXPIRE_MINUTES. Granting a role held
        (or taking away one not held) changes nothing and writes no event."""
        if not ROLE_NAME.fullmatch(role):
            raise BadRoleName(role)
        normalized = normalized_email(email)
        async with self.events.transaction(self.statements) as tx:
            uid, active = await self._lock(tx, normalized)
            held = await tx.first(_HAS_ROLE, {"uid": uid, "role": role}) is not None
            changed = held != grant
            details: dict[str, DetailValue] = {
                "role": role,
                "change": "added" if grant else "removed",
                "operator": self.operator,
            }
            if changed and grant:
                await tx.execute(
                    _GRANT_ROLE,
                    {"uid": uid, "role": role, "now": self.clock.now(), "operator": self.operator},
                )
            elif changed:
                await tx.execute(_REVOKE_ROLE, {"uid": uid, "role": role})
            if changed:
                await self.events.record(tx, EventKind.ROLES_CHANGED, user_id=uid, details=details)
        return Outcome(
            action="roles add" if grant else "roles remove",
            email=normalized,
            user_id=uid,
            changed=changed,
            active=active,
            details=details,
        )

    async def remove_passkey(self, email: str, passkey_id: str) -> Outcome:
        """Removes one passkey of the account (a lost or compromised authenticator the owner
        cannot reach to delete it), recorded as PASSKEY_REMOVED naming the operator. Its
        sessions stay: end them with logout where the passkey may have been used by
        someone else. UnknownPasskey for an id the account does not hold."""
        normalized = normalized_email(email)
        try:
            pid = uuid.UUID(passkey_id)
        except ValueError:
            raise UnknownPasskey(passkey_id) from None
        async with self.events.transaction(self.statements) as tx:
            uid, active = await self._lock(tx, normalized)
            removed = await tx.first(_REMOVE_PASSKEY, {"pid": pid, "uid": uid})
            if removed is None:
                raise UnknownPasskey(passkey_id)
            details: dict[str, DetailValue] = {
                "operator": self.operator,
                "passkey": str(pid),
                "name": removed["name"],
            }
            await self.events.record(tx, EventKind.PASSKEY_REMOVED, user_id=uid, details=details)
        return Outcome(
            action="passkeys remove",
            email=normalized,
            user_id=uid,
            changed=True,
            active=active,
            details=details,
        )

    # -- helpers ---------------------------------------------------------------------------

    async def _lock(self, tx: Runner, normalized: str) -> tuple[uuid.UUID, bool]:
        """The account's id and whether it is active, its row locked exclusively."""
        found = await tx.first(ACCOUNT_BY_EMAIL, {"email": normalized})
        if found is None:
            raise UnknownAccount(normalized)
        # The lock order of every transaction that changes an account (db/services/sessions.py).
        locked = await lock_account(tx, found["id"], exclusive=True)
        if locked is None:  # deleted meanwhile
            raise UnknownAccount(normalized)
        return found["id"], bool(locked["is_active"])

    async def _end_sessions(self, tx: Runner, uid: uuid.UUID, now: datetime, *, reason: str) -> int:
        await lock_account_sessions(tx, uid)
        return await end_live_sessions(tx, uid, now=now, reason=reason, events=self.events)

    async def _clear_rate_limit(self, normalized: str) -> bool | None:
        if self.limiter is None:
            return None
        if self.limiter.degraded:
            return False  # Redis is unreachable: clearing memory here would mean nothing
        await self.limiter.clear(LOGIN_ACCOUNT_LIMIT, normalized)
        return not self.limiter.degraded


def _code_pattern(uid: uuid.UUID) -> str:
    # A UUID's text holds no LIKE wildcard.
    return f"otp:{uid}:%"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


def _loads(details: str | None) -> dict[str, Any]:
    if not details:
        return {}
    try:
        value = json.loads(details)
    except ValueError:
        return {}
    return dict(value) if isinstance(value, Mapping) else {}
