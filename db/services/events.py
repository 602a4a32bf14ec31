"""The audit trail. Every security event is a row of the append-only security_events
table, written in the transaction of what it reports, and one log line on
"strawgate.security" whose `security_event` holds the event's fields; the signed-in user
reads their own in newest-first pages. Also the retention passes the housekeeper runs:
old events, ended sessions, and spent refresh generations of live sessions."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import unicodedata
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql import Executable

from db.clock import Clock
from db.errors import AuthFailure, invalid_input
from db.models import IP_MAX, RefreshToken, SecurityEvent, UserSession
from db.services.batches import AnyOf, Batching, chosen, ctid_of, until_done, walk
from db.services.types import ClientInfo
from db.session import Runner, Statements, Writes
from db.validation import clean_user_agent, parse_email
from db.webhooks import catalogue
from db.webhooks.events import WebhookEvents

# The audit stream: one line per event, at INFO.
log = logging.getLogger("strawgate.security")
# Complaints about the callers (a detail dropped); kept out of the audit stream.
warnings_log = logging.getLogger("strawgate.events")

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# A detail whose key holds one of these is dropped, whatever its value: the trail and
# the log never carry a secret, even when a caller slips.
SECRET_KEY_MARKERS = ("password", "token", "code", "secret", "hash")
DETAIL_VALUE_MAX = 200  # characters of one string detail
EMAIL_MAX = 254  # security_events.email

_CURSOR_VERSION = "v1:"
_CURSOR_MAX = 40  # characters: "v1:" and 19 digits in base64url, with room to spare
_ID_MAX = 2**63 - 1  # BIGINT; also the "no cursor" bound of the first page

DetailValue = str | int | bool | None


class EventKind(StrEnum):
    """The contract's SecurityEventKind."""

    SIGNUP = "SIGNUP"
    EMAIL_VERIFIED = "EMAIL_VERIFIED"
    LOGIN_SUCCEEDED = "LOGIN_SUCCEEDED"
    LOGIN_FAILED = "LOGIN_FAILED"
    LOCKED_OUT = "LOCKED_OUT"
    REFRESH_REUSED = "REFRESH_REUSED"
    LOGOUT = "LOGOUT"
    PASSWORD_CHANGED = "PASSWORD_CHANGED"  # noqa: S105 - an event kind
    PASSWORD_RESET = "PASSWORD_RESET"  # noqa: S105 - an event kind
    TOTP_ENABLED = "TOTP_ENABLED"
    TOTP_DISABLED = "TOTP_DISABLED"
    RECOVERY_CODE_USED = "RECOVERY_CODE_USED"
    SESSION_REVOKED = "SESSION_REVOKED"
    EMAIL_CHANGED = "EMAIL_CHANGED"
    ACCOUNT_DELETED = "ACCOUNT_DELETED"
    # What an operator did with the `strawgate users` commands.
    OPERATOR_DISABLE = "OPERATOR_DISABLE"
    OPERATOR_ENABLE = "OPERATOR_ENABLE"
    OPERATOR_UNLOCK = "OPERATOR_UNLOCK"
    OPERATOR_LOGOUT = "OPERATOR_LOGOUT"
    # A credential proven again on a live session (reauthenticate): its auth_time renewed.
    REAUTHENTICATED = "REAUTHENTICATED"
    # Passkeys: registered, deleted, and a sign-in refused for a sign count that went
    # backwards (a possible clone of the authenticator).
    PASSKEY_ADDED = "PASSKEY_ADDED"
    PASSKEY_REMOVED = "PASSKEY_REMOVED"
    PASSKEY_CLONE_SUSPECTED = "PASSKEY_CLONE_SUSPECTED"
    # Identity providers: a provider account linked to the user, or unlinked.
    IDENTITY_LINKED = "IDENTITY_LINKED"
    IDENTITY_UNLINKED = "IDENTITY_UNLINKED"
    # An operator granted or took away a role (`strawgate users roles`): details name the
    # role, the change and the operator.
    ROLES_CHANGED = "ROLES_CHANGED"


_KINDS = {kind.value: kind for kind in EventKind}

_RECORD = (
    insert(SecurityEvent)
    .values(
        at=bindparam("at"),
        kind=bindparam("kind"),
        user_id=bindparam("user_id"),
        session_id=bindparam("session_id"),
        ip=bindparam("ip"),
        user_agent=bindparam("user_agent"),
        email=bindparam("email"),
        details=bindparam("details"),
    )
    .returning(SecurityEvent.id)
)

# One user's events below a cursor, newest first (ix_security_events_user_id_id).
_PAGE = (
    select(
        SecurityEvent.id,
        SecurityEvent.at,
        SecurityEvent.kind,
        SecurityEvent.ip,
        SecurityEvent.user_agent,
        SecurityEvent.session_id,
    )
    .where(SecurityEvent.user_id == bindparam("owner"), SecurityEvent.id < bindparam("before"))
    .order_by(SecurityEvent.id.desc())
    .limit(bindparam("n"))
)

# The retention passes, in batches (db/services/batches.py): each statement removes at
# most :batch rows, which it picks (and locks, skipping rows a request holds) itself.
_PRUNE_EVENTS = delete(SecurityEvent).where(
    AnyOf(
        SecurityEvent.id,
        chosen(SecurityEvent, lambda e: e.at < bindparam("cutoff"), order_by=lambda e: e.at),
    )
)


# Ended (revoked, or past their absolute expiry) longer ago than the retention; their
# refresh tokens go with them (ON DELETE CASCADE). No index serves this (expires_at moves
# on every refresh; an index on it would cost every refresh an index write), so
# PostgreSQL walks the table's pages (in_pages).
def _ended(session: Any) -> Any:
    return or_(session.revoked_at < bindparam("cutoff"), session.expires_at < bindparam("cutoff"))


_PRUNE_ENDED_SESSIONS = delete(UserSession).where(
    AnyOf(UserSession.id, chosen(UserSession, _ended, in_pages=True))
)
_PRUNE_ENDED_SESSIONS_ANYWHERE = delete(UserSession).where(
    AnyOf(UserSession.id, chosen(UserSession, _ended))
)


def _spent_generations(*, in_pages: bool) -> Executable:
    """Spent longer ago than the retention, and older than the generation before the newest
    (which a retry within the reuse interval, and its reuse check, still need), of a live
    session. Only a session that began before the cutoff can have one (a generation is
    made, and so spent, after its session began): walked by its session's pages, and with
    REFRESH_TOKEN_EXPIRE_DAYS no longer than the retention (the defaults) no live session
    began that long ago, so the pass finds nothing without reading a refresh token."""
    spent = aliased(RefreshToken, name="spent")
    owner = aliased(UserSession, name="owner")
    newer = aliased(RefreshToken, name="newer")
    newest_but_one = (
        select(func.max(newer.generation) - 1)
        .where(newer.session_id == spent.session_id)
        .correlate(spent)
        .scalar_subquery()
    )
    conditions = [
        owner.revoked_at.is_(None),
        owner.expires_at > bindparam("now"),
        owner.created_at < bindparam("cutoff"),
        spent.rotated_at < bindparam("cutoff"),
        spent.generation < newest_but_one,
    ]
    if in_pages:
        conditions += [ctid_of("owner") >= bindparam("lo"), ctid_of("owner") < bindparam("hi")]
    picked = (
        select(spent.id)
        .join(owner, owner.id == spent.session_id)
        .where(*conditions)
        .limit(bindparam("batch"))
        .with_for_update(of=spent, skip_locked=True)
    )
    return delete(RefreshToken).where(AnyOf(RefreshToken.id, picked))


_PRUNE_SPENT_GENERATIONS = _spent_generations(in_pages=True)
_PRUNE_SPENT_GENERATIONS_ANYWHERE = _spent_generations(in_pages=False)


@dataclass(frozen=True, slots=True)
class EventView:
    id: int
    at: datetime
    kind: EventKind
    ip: str | None
    user_agent: str | None
    session_id: uuid.UUID | None
    cursor: str


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a user's events, newest first."""

    events: list[EventView]
    has_next_page: bool

    @property
    def end_cursor(self) -> str | None:
        return self.events[-1].cursor if self.events else None


class _Recording:
    """A transaction's Runner that holds back the log lines of the events recorded in it
    until the transaction has committed (see SecurityEvents.transaction)."""

    def __init__(self, tx: Runner) -> None:
        self.tx = tx
        self.lines: list[dict[str, Any]] = []
        self.wake = False  # a webhook event was written: wake the dispatcher after commit

    async def first(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        return await self.tx.first(statement, params)

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        return await self.tx.execute(statement, params)

    async def scalars(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        return await self.tx.scalars(statement, params)

    async def all(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        return await self.tx.all(statement, params)

    async def execute_together(
        self, writes: Writes, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        return await self.tx.execute_together(writes, params)


class SecurityEvents:
    def __init__(self, *, clock: Clock, webhooks: WebhookEvents | None = None) -> None:
        self.clock = clock
        # The webhook events that follow from these (db/webhooks): written in the same
        # transaction. None: no webhooks (tests of the trail alone).
        self.webhooks = webhooks

    @contextlib.asynccontextmanager
    async def transaction(self, statements: Statements) -> AsyncIterator[Runner]:
        """`statements.transaction()`, whose events are logged once it has committed: a
        transaction that rolls back leaves neither a row nor a log line."""
        async with statements.transaction() as tx:
            recording = _Recording(tx)
            yield recording
        for line in recording.lines:
            _log(line)
        if recording.wake and self.webhooks is not None:
            self.webhooks.wake()

    async def record(
        self,
        tx: Runner,
        kind: EventKind,
        *,
        user_id: uuid.UUID | None = None,
        session_id: uuid.UUID | None = None,
        client: ClientInfo | None = None,
        email: str | None = None,
        details: Mapping[str, DetailValue] | None = None,
        webhook: Mapping[str, Any] | None = None,
    ) -> None:
        """Writes the event in `tx`, so it exists only if what it reports commits, and the
        webhook event that follows from it (see _webhook_of), with `webhook`'s facts
        added to its data (an address: the trail keeps none).

        The log line follows the commit when `tx` comes from `transaction()`; on any
        other Runner it is emitted now (and stands even if `tx` then rolls back).
        `email` is for a failed login, normalized, and only for a valid address: the
        field sometimes holds a password; anything that is no valid address is dropped
        here too. Details whose key looks like a secret are dropped."""
        at = self.clock.now()
        kind = EventKind(kind)
        ip = _clean_ip(client.ip if client else None)
        user_agent = clean_user_agent(client.user_agent if client else None)
        stored_email = _valid_email(email)
        cleaned = _clean_details(details)
        row = await tx.first(
            _RECORD,
            {
                "at": at,
                "kind": kind.value,
                "user_id": user_id,
                "session_id": session_id,
                "ip": ip,
                "user_agent": user_agent,
                "email": stored_email,
                "details": _dumps(cleaned) if cleaned else None,
            },
        )
        line = {
            "event": kind.value,
            "id": row["id"] if row is not None else None,
            "at": at.isoformat(),
            "user_id": str(user_id) if user_id is not None else None,
            "session_id": str(session_id) if session_id is not None else None,
            "ip": ip,
            "user_agent": user_agent,
            "email": stored_email,
            "details": cleaned,
        }
        if isinstance(tx, _Recording):
            tx.lines.append(line)
        else:
            _log(line)
        await self._publish(tx, kind, user_id, session_id, cleaned, webhook)

    async def _publish(
        self,
        tx: Runner,
        kind: EventKind,
        user_id: uuid.UUID | None,
        session_id: uuid.UUID | None,
        details: Mapping[str, DetailValue],
        extra: Mapping[str, Any] | None,
    ) -> None:
        """The webhook event that follows from a security event, in the same transaction:
        every change that reaches the trail reaches the webhooks from this one place."""
        if self.webhooks is None:
            return
        found = _webhook_of(kind, session_id, details)
        if found is None:
            return
        event_type, data = found
        await self._emit(tx, event_type, user_id, {**data, **dict(extra or {})})

    async def sessions_ended(
        self, tx: Runner, user_id: uuid.UUID, session_ids: Sequence[uuid.UUID], reason: str
    ) -> None:
        """`session.revoked` for each of the sessions a change ended en masse (a password
        change, logout everywhere, a disable): the trail has one event for the change, the
        webhooks one per session, as for a session ended alone."""
        if self.webhooks is None:
            return
        for session_id in session_ids:
            await self._emit(
                tx,
                catalogue.SESSION_REVOKED,
                user_id,
                {"session_id": session_id, "reason": reason},
            )

    async def user_deleted(
        self, tx: Runner, user_id: uuid.UUID, *, reason: str, sessions: Sequence[uuid.UUID] = ()
    ) -> None:
        """`user.deleted` (and `session.revoked` for its live sessions) for an account
        deleted without a trail event of its own (an abandoned signup)."""
        await self.sessions_ended(tx, user_id, sessions, "account_deleted")
        if self.webhooks is not None:
            await self._emit(tx, catalogue.USER_DELETED, user_id, {"reason": reason})

    async def _emit(
        self, tx: Runner, event_type: str, user_id: uuid.UUID | None, data: Mapping[str, Any]
    ) -> None:
        assert self.webhooks is not None  # noqa: S101 - checked by the callers
        if await self.webhooks.emit(tx, event_type, user_id=user_id, data=data) is not None:
            if isinstance(tx, _Recording):
                tx.wake = True

    async def record_now(
        self,
        statements: Statements,
        kind: EventKind,
        *,
        user_id: uuid.UUID | None = None,
        session_id: uuid.UUID | None = None,
        client: ClientInfo | None = None,
        email: str | None = None,
        details: Mapping[str, DetailValue] | None = None,
    ) -> None:
        """`record` in a transaction of its own: for failures, whose own transaction
        rolls back (LOGIN_FAILED, LOCKED_OUT, REFRESH_REUSED)."""
        async with self.transaction(statements) as tx:
            await self.record(
                tx,
                kind,
                user_id=user_id,
                session_id=session_id,
                client=client,
                email=email,
                details=details,
            )

    async def page(
        self,
        statements: Statements,
        *,
        user_id: uuid.UUID,
        first: int | None = None,
        after: str | None = None,
    ) -> Page:
        """The user's own events, newest first: `first` (default 20; above 100 counts as
        100; 0 answers no events but still tells whether there are any) after the
        cursor `after`. A negative `first` or a cursor this code did not make raises
        INVALID_INPUT."""
        size = DEFAULT_PAGE_SIZE if first is None else min(first, MAX_PAGE_SIZE)
        if size < 0:
            raise invalid_input("first must not be negative.", "first")
        before = _ID_MAX if after is None else decode_cursor(after)
        async with statements.connection() as conn:
            rows = await conn.all(_PAGE, {"owner": user_id, "before": before, "n": size + 1})
        events = [
            EventView(
                id=row["id"],
                at=row["at"],
                kind=_KINDS[row["kind"]],
                ip=row["ip"],
                user_agent=row["user_agent"],
                session_id=row["session_id"],
                cursor=encode_cursor(row["id"]),
            )
            for row in rows[:size]
            # A kind this version does not know (written by a newer one) is not shown.
            if row["kind"] in _KINDS
        ]
        return Page(events=events, has_next_page=len(rows) > size)


def encode_cursor(event_id: int) -> str:
    """Opaque to clients: base64url (unpadded) of "v1:<id>". Not a secret: a page only
    ever holds the caller's own events, whatever the cursor says."""
    raw = f"{_CURSOR_VERSION}{event_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> int:
    """The event id a cursor of encode_cursor stands for; INVALID_INPUT for anything else."""
    refused = invalid_input("after is not a cursor of this list.", "after")
    if not cursor or len(cursor) > _CURSOR_MAX or not cursor.isascii():
        raise refused
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        text = raw.decode("ascii")
    except (binascii.Error, ValueError):
        raise refused from None
    digits = text.removeprefix(_CURSOR_VERSION)
    if digits == text or not digits.isascii() or not digits.isdecimal():
        raise refused
    event_id = int(digits)
    # Exactly the cursor this code makes (no padding, no leading zeros), for an id in range.
    if not 0 < event_id <= _ID_MAX or encode_cursor(event_id) != cursor:
        raise refused
    return event_id


async def prune_events(
    statements: Statements,
    now: datetime,
    retention: timedelta,
    batching: Batching | None = None,
) -> int:
    """Deletes events older than `retention`, in batches; how many."""
    done = await until_done(
        statements,
        "security_events",
        _PRUNE_EVENTS,
        {"cutoff": now - retention},
        batching or Batching(),
    )
    return done.rows


async def prune_ended_sessions(
    statements: Statements,
    now: datetime,
    retention: timedelta,
    batching: Batching | None = None,
) -> int:
    """Deletes sessions that ended (revoked or expired) longer than `retention` ago, and
    with them their refresh tokens, in batches; how many sessions.

    Their tokens were refused anyway (a token of an ended session is invalid, reused or
    not); what goes is the history: the user's new-device check no longer sees them."""
    done = await walk(
        statements,
        "ended_sessions",
        "sessions",
        _PRUNE_ENDED_SESSIONS,
        _PRUNE_ENDED_SESSIONS_ANYWHERE,
        {"cutoff": now - retention},
        batching or Batching(),
    )
    return done.rows


async def prune_spent_generations(
    statements: Statements,
    now: datetime,
    retention: timedelta,
    batching: Batching | None = None,
) -> int:
    """Deletes the refresh-token generations of live sessions that were rotated longer
    than `retention` ago, except the generation before the newest (a retry within the
    reuse interval is answered from it, and its reuse detected), in batches; how many.

    Why this is safe: every generation is kept so that a spent token presented again is
    recognised as reuse and ends the session. Once a generation is deleted, presenting
    it is answered as an unknown token (INVALID_TOKEN): it still gives nothing, but no
    longer ends the session. That matters only for a token presented more than
    `retention` after it was spent. The reuse that detection exists for, a thief and
    the rightful client both refreshing from one token, shows within one access-token
    lifetime (minutes), when the slower of the two next refreshes; a spent token first
    seen again months later has been replaced many times over. Sessions that ended are
    left to prune_ended_sessions."""
    done = await walk(
        statements,
        "spent_generations",
        "sessions",
        _PRUNE_SPENT_GENERATIONS,
        _PRUNE_SPENT_GENERATIONS_ANYWHERE,
        {"cutoff": now - retention, "now": now},
        batching or Batching(),
    )
    return done.rows


# The webhook type of each security event that reports a change to the account, with the
# data it carries (the user id leads every event's data).
_SIMPLE_WEBHOOKS: dict[EventKind, str] = {
    EventKind.SIGNUP: catalogue.USER_CREATED,
    EventKind.EMAIL_VERIFIED: catalogue.USER_EMAIL_VERIFIED,
    EventKind.OPERATOR_DISABLE: catalogue.USER_DISABLED,
    EventKind.OPERATOR_ENABLE: catalogue.USER_ENABLED,
}


def _webhook_of(
    kind: EventKind, session_id: uuid.UUID | None, details: Mapping[str, DetailValue]
) -> tuple[str, dict[str, Any]] | None:
    """The webhook event (type, data) a security event stands for; None for the events
    that change nothing (a failed sign-in, a lockout) or whose webhook is written apart
    (a logout everywhere: one session.revoked per session, see sessions_ended)."""
    if kind in _SIMPLE_WEBHOOKS:
        data: dict[str, Any] = {}
        if "provider" in details:
            data["provider"] = details["provider"]
        return _SIMPLE_WEBHOOKS[kind], data
    match kind:
        case EventKind.ACCOUNT_DELETED:
            return catalogue.USER_DELETED, {"reason": "deleted_by_user"}
        case EventKind.EMAIL_CHANGED:
            return catalogue.USER_EMAIL_CHANGED, {"previous_email": details.get("previous")}
        case EventKind.PASSWORD_CHANGED:
            return catalogue.USER_PASSWORD_CHANGED, {
                "reason": "set" if details.get("first") else "changed"
            }
        case EventKind.PASSWORD_RESET:
            return catalogue.USER_PASSWORD_CHANGED, {"reason": "reset"}
        case EventKind.TOTP_ENABLED:
            return catalogue.USER_TWO_FACTOR_ENABLED, {"method": "totp"}
        case EventKind.TOTP_DISABLED:
            return catalogue.USER_TWO_FACTOR_DISABLED, {"method": "totp"}
        case EventKind.PASSKEY_ADDED:
            return catalogue.USER_PASSKEY_ADDED, {"passkey_id": details.get("passkey")}
        case EventKind.PASSKEY_REMOVED:
            return catalogue.USER_PASSKEY_REMOVED, {"passkey_id": details.get("passkey")}
        case EventKind.IDENTITY_LINKED:
            return catalogue.USER_IDENTITY_LINKED, {"provider": details.get("provider")}
        case EventKind.IDENTITY_UNLINKED:
            return catalogue.USER_IDENTITY_UNLINKED, {"provider": details.get("provider")}
        case EventKind.ROLES_CHANGED:
            return catalogue.USER_ROLES_CHANGED, {
                "role": details.get("role"),
                "change": details.get("change"),
            }
        case EventKind.LOGIN_SUCCEEDED:
            amr = details.get("amr")
            return catalogue.SESSION_CREATED, {
                "session_id": session_id,
                "amr": str(amr).split() if amr else [],
            }
        case EventKind.SESSION_REVOKED:
            return catalogue.SESSION_REVOKED, {
                "session_id": session_id,
                "reason": details.get("reason") or "revoked_by_user",
            }
        case EventKind.LOGOUT if not details.get("everywhere"):
            return catalogue.SESSION_REVOKED, {"session_id": session_id, "reason": "logout"}
    return None


def _log(line: dict[str, Any]) -> None:
    """One audit line: the event's fields are the `security_event` object of a JSON line."""
    log.info("security event %s", line["event"], extra={"security_event": line})


def _dumps(value: Any) -> str:
    # One line, stable key order; ASCII-only, so control characters in a value are
    # escaped and cannot forge a line of their own.
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _looks_secret(key: str) -> bool:
    lowered = key.casefold()
    return any(marker in lowered for marker in SECRET_KEY_MARKERS)


def _clean_details(details: Mapping[str, DetailValue] | None) -> dict[str, DetailValue]:
    cleaned: dict[str, DetailValue] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str) or _looks_secret(key):
            # Named by key only: the value is what must not be written anywhere.
            warnings_log.warning("security event detail %r dropped: it looks like a secret", key)
            continue
        if value is None or isinstance(value, bool | int):
            cleaned[key] = value
        else:
            cleaned[key] = _strip_controls(str(value))[:DETAIL_VALUE_MAX]
    return cleaned


def _strip_controls(value: str) -> str:
    return "".join(ch for ch in value if unicodedata.category(ch) != "Cc")


def _clean_ip(ip: str | None) -> str | None:
    if not ip:
        return None
    return _strip_controls(ip)[:IP_MAX] or None


def _valid_email(email: str | None) -> str | None:
    """The normalized address, or None when `email` is not a valid one (then it may well
    be a password typed into the wrong field)."""
    if not email:
        return None
    try:
        normalized = parse_email(email).normalized
    except AuthFailure:
        return None
    return normalized if len(normalized) <= EMAIL_MAX else None
