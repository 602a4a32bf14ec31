"""Sessions: opening one, its tokens, rotating its refresh token, logging out, ending
sessions (one, every other, those over MAX_SESSIONS_PER_USER), the per-request check, and
one account's locks. Every way in (db/services/signin/) ends here through the one place
that decides what follows a proven credential (signin/conclusion.py); this module knows
nothing of how a credential is proven.
"""

from __future__ import annotations

import dataclasses
import hmac
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, delete, exists, func, insert, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from db.clock import Clock
from db.devices import device_family, network_of
from db.errors import AuthFailure, ErrorCode, account_disabled, reauthentication_required
from db.models import IP_MAX, RefreshToken, TotpCredential, User, UserRole, UserSession
from db.security.access import MAX_ACCESS_TOKEN_LENGTH, AccessClaims, AccessTokenCodec
from db.security.claims_hook import ClaimsRequest, ClaimsSource, Reason
from db.security.device import DeviceTokens
from db.security.limiter import RateLimiter, client_key
from db.security.tokens import (
    looks_like_opaque_token,
    new_opaque_token,
    successor_token,
    token_digest,
)
from db.services.device_trust import KNOWN_WINDOW
from db.services.events import EventKind, SecurityEvents
from db.services.notices import Notices
from db.services.types import ClientInfo, IssuedSession, UserView, user_view
from db.session import Runner, Statements, Writes
from db.validation import clean_user_agent

# A sign-in from a device family and network the user has not signed in from within
# this long is "new" (and mailed about).
KNOWN_DEVICE_WINDOW = KNOWN_WINDOW


# The statements of the request path, built once (SQLAlchemy caches their compiled form,
# and Statements keeps the driver's).

# Two-factor is on when the user has a confirmed TOTP credential.
OTP_CONFIRMED = TotpCredential.confirmed_at.label("otp_confirmed_at")
# An account without a password signs in by emailed code only.
HAS_PASSWORD = User.password_hash.is_not(None).label("has_password")
WITH_TOTP = (TotpCredential, TotpCredential.user_id == User.id)


class _SpaceSeparated(FunctionElement[str]):
    """Text values joined by spaces: PostgreSQL's string_agg, SQLite's group_concat (with
    the separator written into the SQL: the statements here are compiled once)."""

    type = String()
    inherit_cache = True


@compiles(_SpaceSeparated)
def _string_agg(element: _SpaceSeparated, compiler: Any, **kw: Any) -> str:
    return f"string_agg({compiler.process(element.clauses, **kw)}, ' ')"


@compiles(_SpaceSeparated, "sqlite")
def _group_concat(element: _SpaceSeparated, compiler: Any, **kw: Any) -> str:
    return f"group_concat({compiler.process(element.clauses, **kw)}, ' ')"


# The user's roles, space-separated (role names hold no space), for the tokens issued.
ROLES = (
    select(_SpaceSeparated(UserRole.role))
    .where(UserRole.user_id == User.id)
    .scalar_subquery()
    .label("roles")
)


# The user row's lock orders everything done to one account's credentials and sessions.
# Whatever changes the password, ends sessions en masse or voids challenges takes it
# exclusively, first; whatever opens a session takes it shared, first, and checks that
# what it relied on (the password it checked, the challenge it completes) still holds.
# A sign-in racing a password change then either finishes before the change (whose
# "end every other session" ends it) or sees the change and opens nothing.
_LOCK_USER = (
    select(User.password_changed_at, User.is_active, User.email_verified_at)
    .where(User.id == bindparam("uid"))
    .with_for_update()
)
_SHARE_USER = (
    select(User.password_changed_at, User.is_active, User.email_verified_at)
    .where(User.id == bindparam("uid"))
    .with_for_update(read=True)
)

_ADD_SESSION = insert(UserSession).values(
    id=bindparam("session_id"),
    user_id=bindparam("user_id"),
    created_at=bindparam("now"),
    last_used_at=bindparam("now"),
    auth_time=bindparam("now"),
    expires_at=bindparam("expires_at"),
    absolute_expires_at=bindparam("absolute_expires_at"),
    user_agent=bindparam("user_agent"),
    ip=bindparam("ip"),
    amr=bindparam("amr"),
    device=bindparam("device"),
    network=bindparam("network"),
)

# The one query behind every authenticated request: the session is live and its user
# active.
_CURRENT_USER = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.device_epoch,
        OTP_CONFIRMED,
        HAS_PASSWORD,
        UserSession.auth_time,
    )
    .join(UserSession, UserSession.user_id == User.id)
    .outerjoin(*WITH_TOTP)
    .where(
        UserSession.id == bindparam("sid"),
        UserSession.user_id == bindparam("uid"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
        User.is_active.is_(True),
    )
)

_SESSION_BY_TOKEN = (
    select(UserSession.id, UserSession.user_id, UserSession.revoked_at, UserSession.expires_at)
    .join(RefreshToken, RefreshToken.session_id == UserSession.id)
    .where(RefreshToken.token_hash == bindparam("digest"))
)

# Serialises everything done to one session (rotation, logout) across processes.
_LOCK_SESSION_BY_TOKEN = _SESSION_BY_TOKEN.with_for_update(of=UserSession)

# Every live session of a user, locked in one order (by id), so that two transactions
# that each end all of them wait for each other instead of deadlocking.
_LOCK_USER_SESSIONS = (
    select(UserSession.id)
    .where(UserSession.user_id == bindparam("user_id"), UserSession.revoked_at.is_(None))
    .order_by(UserSession.id)
    .with_for_update()
)

# What a rotation decides on: the presented generation, its session and the user, with
# the session and the generation locked. A refresh that waited for the lock gets their
# rows as the winner committed them (PostgreSQL re-reads locked rows after the wait), so
# it sees the generation as rotated.
_ROTATION_STATE = (
    select(
        RefreshToken.id,
        RefreshToken.session_id,
        RefreshToken.generation,
        RefreshToken.rotated_at,
        UserSession.revoked_at,
        UserSession.expires_at,
        UserSession.absolute_expires_at,
        UserSession.amr,
        UserSession.auth_time,
        User.id.label("user_id"),
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        User.device_epoch,
        OTP_CONFIRMED,
        HAS_PASSWORD,
        ROLES,
    )
    .join(UserSession, UserSession.id == RefreshToken.session_id)
    .join(User, User.id == UserSession.user_id)
    .outerjoin(*WITH_TOTP)
    .where(RefreshToken.token_hash == bindparam("digest"))
    .with_for_update(of=[UserSession, RefreshToken])
)

_NEWEST_GENERATION = (
    select(RefreshToken.generation, RefreshToken.token_hash)
    .where(RefreshToken.session_id == bindparam("session_id"))
    .order_by(RefreshToken.generation.desc())
    .limit(1)
)

_MARK_ROTATED = (
    update(RefreshToken)
    .where(RefreshToken.id == bindparam("token_id"))
    .values(rotated_at=bindparam("now"))
)

_ADD_GENERATION = insert(RefreshToken).values(
    session_id=bindparam("session_id"),
    generation=bindparam("generation"),
    token_hash=bindparam("token_hash"),
    created_at=bindparam("now"),
)

# A use of the refresh token: the idle timeout starts again (within the absolute end).
_TOUCH_SESSION = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(last_used_at=bindparam("now"), expires_at=bindparam("expires_at"))
)

# A rotation: the presented generation spent, its successor added, the session used.
_ROTATE = Writes(_MARK_ROTATED, _ADD_GENERATION, _TOUCH_SESSION)

# The user's other live sessions past the newest `keep`: what a new session ends when
# the user is over MAX_SESSIONS_PER_USER (never the new one, whatever the clock says).
_SESSIONS_OVER_CAP = (
    select(UserSession.id)
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.id != bindparam("new_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .order_by(UserSession.created_at.desc(), UserSession.id.desc())
    .offset(bindparam("keep"))
)

_REVOKE_SESSION = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
)

# A session past the cap, unless something else ended it meanwhile (parallel sign-ins of
# one user each see it over the cap): only the one that ended it reports it.
_REVOKE_OVER_CAP = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"), UserSession.revoked_at.is_(None))
    .values(revoked_at=bindparam("now"), revoke_reason="session_limit")
    .returning(UserSession.id)
)

# Logout everywhere ends every device token of the account as well.
_BUMP_DEVICE_EPOCH = (
    update(User).where(User.id == bindparam("owner_id")).values(device_epoch=User.device_epoch + 1)
)

_REVOKE_USER_SESSIONS = (
    update(UserSession)
    .where(
        UserSession.user_id == bindparam("owner_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
    .returning(UserSession.id)
)


# What a new session needs to know, in one read before it is added: whether the user
# signed in before at all, and from this device family and network lately; and how many
# live sessions the user has (past MAX_SESSIONS_PER_USER, _SESSIONS_OVER_CAP names them).
_SESSION_CONTEXT = select(
    exists().where(UserSession.user_id == bindparam("uid")).label("signed_in_before"),
    exists()
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.network == bindparam("network"),
        UserSession.device == bindparam("device"),
        UserSession.last_used_at >= bindparam("since"),
    )
    .label("known"),
    select(func.count())
    .select_from(UserSession)
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .scalar_subquery()
    .label("live"),
)

# A new session and its first refresh token, with what the session needs to know of the
# others (_SESSION_CONTEXT, read as the database was before the new one).
_OPEN_SESSION = Writes(_ADD_SESSION, _ADD_GENERATION, before=_SESSION_CONTEXT)

_REVOKE_OTHER_SESSIONS = (
    update(UserSession)
    .where(
        UserSession.user_id == bindparam("owner_id"),
        UserSession.id != bindparam("keep_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
    .returning(UserSession.id)
)

# A live session, how it signed in and when it last proved a credential (read under the
# user's lock).
LIVE_SESSION = select(UserSession.amr, UserSession.auth_time).where(
    UserSession.id == bindparam("session_id"),
    UserSession.revoked_at.is_(None),
    UserSession.expires_at > bindparam("now"),
)
LOCK_LIVE_SESSION = LIVE_SESSION.with_for_update()
_NEWEST_GENERATION_NUMBER = select(func.max(RefreshToken.generation)).where(
    RefreshToken.session_id == bindparam("session_id")
)
# The session's refresh tokens so far are forgotten, not marked spent: presented later
# they answer INVALID_TOKEN and end nothing (reuse detection would end this session).
_FORGET_GENERATIONS = delete(RefreshToken).where(RefreshToken.session_id == bindparam("session_id"))


class Sessions:
    def __init__(
        self,
        *,
        statements: Statements,
        access_tokens: AccessTokenCodec,
        refresh_key: bytes,
        clock: Clock,
        refresh_lifetime: timedelta,
        reuse_interval: timedelta,
        devices: DeviceTokens,
        limiter: RateLimiter,
        events: SecurityEvents,
        notices: Notices,
        idle_timeout: timedelta,
        max_sessions: int,
        reauth_window: timedelta,
        claims_hook: ClaimsSource | None = None,
    ) -> None:
        # CLAIMS_HOOK / CLAIMS_HOOK_URL: asked for every access token issued (None: none).
        self.claims_hook = claims_hook
        # 0: no idle timeout (only the absolute refresh lifetime).
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.reauth_window = reauth_window
        self.events = events
        self.devices = devices
        self.limiter = limiter
        self.statements = statements
        self.access_tokens = access_tokens
        self._refresh_key = refresh_key
        self.clock = clock
        self.refresh_lifetime = refresh_lifetime
        self.reuse_interval = reuse_interval
        self.notices = notices

    # -- step-up ---------------------------------------------------------------------------

    def is_recent(self, claims: AccessClaims) -> bool:
        """Whether the credential behind this access token was proven within
        REAUTH_WINDOW (claims as the per-request check read them, see current_user)."""
        if claims.auth_time is None:
            return False
        return self.clock.now() - claims.auth_time <= self.reauth_window

    def require_recent(self, claims: AccessClaims) -> None:
        """REAUTHENTICATION_REQUIRED unless the session signed in recently."""
        if not self.is_recent(claims):
            raise reauthentication_required()

    async def lock_user(
        self, tx: Runner, user_id: uuid.UUID, *, exclusive: bool
    ) -> Mapping[str, Any] | None:
        """The first lock of a transaction that touches the account's credentials,
        sessions or challenges (see _LOCK_USER). The row as locked (password_changed_at,
        is_active, email_verified_at); None when there is no such account."""
        return await lock_account(tx, user_id, exclusive=exclusive)

    async def lock_sessions(self, tx: Runner, user_id: uuid.UUID) -> None:
        """Locks every live session of the user, in one order (by id) wherever more than
        one is locked, so that two such transactions queue up instead of deadlocking. A
        transaction must take no other session lock before this one."""
        await lock_account_sessions(tx, user_id)

    async def end_sessions(
        self, tx: Runner, user_id: uuid.UUID, *, keep: uuid.UUID | None, reason: str
    ) -> int:
        await self.lock_sessions(tx, user_id)
        ended = await tx.scalars(
            _REVOKE_OTHER_SESSIONS,
            {
                "owner_id": user_id,
                # No session has the nil id: "keep none".
                "keep_id": keep or uuid.UUID(int=0),
                "now": self.clock.now(),
                "reason": reason,
            },
        )
        await self.events.sessions_ended(tx, user_id, ended, reason)
        return len(ended)

    # -- sessions ---------------------------------------------------------------------------

    async def open_session(
        self, tx: Runner, user: UserView, *, amr: list[str], client: ClientInfo
    ) -> IssuedSession:
        now = self.clock.now()
        session_id = uuid.uuid4()
        refresh = new_opaque_token()
        device = device_family(client.user_agent)
        network = network_of(client.ip)
        absolute_end = now + self.refresh_lifetime
        context = await tx.execute_together(
            _OPEN_SESSION,
            {
                "session_id": session_id,
                "user_id": user.id,
                "now": now,
                "expires_at": self.session_end(now, absolute_end),
                "absolute_expires_at": absolute_end,
                "user_agent": clean_user_agent(client.user_agent),
                "ip": client.ip[:IP_MAX] if client.ip else None,
                "amr": " ".join(amr),
                "device": device,
                "network": network,
                "generation": 0,
                "token_hash": token_digest(refresh),
                # _SESSION_CONTEXT's
                "uid": user.id,
                "since": now - KNOWN_DEVICE_WINDOW,
            },
        )
        assert context is not None  # noqa: S101 - a SELECT without FROM has its one row
        if context["live"] + 1 > self.max_sessions:
            # The new session is one more than the cap allows: the oldest others end.
            await self._end_sessions_over_cap(tx, user.id, session_id, client)
        await self.events.record(
            tx,
            EventKind.LOGIN_SUCCEEDED,
            user_id=user.id,
            session_id=session_id,
            client=client,
            details={"amr": " ".join(amr)},
        )
        if context["signed_in_before"] and not context["known"]:
            # Not the account's first session, and not a device and network seen lately.
            await self.notices.send(
                tx, user_id=user.id, email=user.email, template="new_device", client=client
            )
        return await self.issue(
            user, session_id, amr, refresh, client, auth_time=now, reason="sign-in"
        )

    async def replace_refresh_token(
        self, tx: Runner, session_id: uuid.UUID, refresh: str, now: datetime
    ) -> None:
        """Gives a live session a new refresh token (a password or address change): the
        old ones stop working without counting as reuse."""
        newest = await tx.scalars(_NEWEST_GENERATION_NUMBER, {"session_id": session_id})
        generation = (newest[0] + 1) if newest and newest[0] is not None else 0
        await tx.execute(_FORGET_GENERATIONS, {"session_id": session_id})
        await self.add_generation(tx, session_id, generation, refresh, now)

    def session_end(self, now: datetime, absolute_end: datetime) -> datetime:
        """When a session used now ends unless used again: the idle timeout ahead,
        never past its absolute end."""
        if not self.idle_timeout:
            return absolute_end
        return min(absolute_end, now + self.idle_timeout)

    async def _end_sessions_over_cap(
        self, tx: Runner, user_id: uuid.UUID, new_id: uuid.UUID, client: ClientInfo
    ) -> None:
        """Past MAX_SESSIONS_PER_USER live sessions, the oldest end (the new one counts);
        called where the count read before the new one was added says so. Sign-ins of one
        user in parallel each see the others' sessions only once committed, so the cap
        can be passed by as many as race; the next one trims."""
        now = self.clock.now()
        over = await tx.scalars(
            _SESSIONS_OVER_CAP,
            {"uid": user_id, "new_id": new_id, "now": now, "keep": self.max_sessions - 1},
        )
        for session_id in over:
            if await tx.first(_REVOKE_OVER_CAP, {"session_id": session_id, "now": now}) is None:
                continue  # ended meanwhile, and reported by whoever ended it
            await self.events.record(
                tx,
                EventKind.SESSION_REVOKED,
                user_id=user_id,
                session_id=session_id,
                client=client,
                details={"reason": "session_limit"},
            )

    async def add_generation(
        self, tx: Runner, session_id: uuid.UUID, generation: int, refresh: str, now: datetime
    ) -> None:
        await tx.execute(
            _ADD_GENERATION,
            {
                "session_id": session_id,
                "generation": generation,
                "token_hash": token_digest(refresh),
                "now": now,
            },
        )

    async def issue(
        self,
        user: UserView,
        session_id: uuid.UUID,
        amr: list[str],
        refresh: str,
        client: ClientInfo | None = None,
        *,
        auth_time: datetime,
        reason: Reason,
    ) -> IssuedSession:
        """Tokens for a live session: an access token (with the session's auth_time and
        the claims hook's claims) and a device token issued with this session, at the
        account's current epoch. Called inside the transaction of the change that issues
        them: a claims hook that fails (ClaimsHookFailed) rolls the change back."""
        extra: dict[str, Any] = {}
        hook = self.claims_hook
        if hook is not None:
            request = ClaimsRequest(
                user_id=user.id,
                email=user.email,
                roles=tuple(user.roles),
                amr=tuple(amr),
                session_id=session_id,
                reason=reason,
            )
            extra = await hook.claims(request)
        access = self.access_tokens.issue(
            user_id=user.id,
            session_id=session_id,
            amr=amr,
            auth_time=auth_time,
            roles=user.roles,
            extra=extra,
        )
        if hook is not None and len(access) >= MAX_ACCESS_TOKEN_LENGTH:
            raise hook.too_big(request, len(access), MAX_ACCESS_TOKEN_LENGTH)
        # The device keeps the identity its token had; a new one is named after the
        # session (so refreshing a session cannot mint device identities).
        held = self.devices.check(client.device_token if client else None, user_id=user.id)
        keep = held is not None and held.epoch == user.device_epoch
        device_id = held.device_id if held is not None and keep else session_id.hex
        return IssuedSession(
            access_token=access,
            refresh_token=refresh,
            expires_in=int(self.access_tokens.lifetime.total_seconds()),
            user=user,
            device_token=self.devices.issue(user.id, user.device_epoch, session_id, device_id),
        )

    # -- refresh ------------------------------------------------------------------------

    async def refresh(
        self, *, refresh_token: str | None, client: ClientInfo | None = None
    ) -> IssuedSession:
        """Rotate a refresh token. A spent token presented again within the reuse interval
        gets the same successor; later it is reuse, and the whole session ends."""
        await self.limiter.hit("refresh_ip", client_key(client.ip if client else None))
        if not refresh_token or not looks_like_opaque_token(refresh_token):
            raise _invalid_token()
        digest = token_digest(refresh_token)
        now = self.clock.now()
        reused = False
        async with self.events.transaction(self.statements) as tx:
            # Locks the session and the presented generation: rotations of one session are
            # serialised across processes (SQLite: BEGIN IMMEDIATE holds the write lock).
            state = await tx.first(_ROTATION_STATE, {"digest": digest})
            if state is None or not _is_live(state, now):
                raise _invalid_token()
            if not state["is_active"]:
                raise account_disabled()
            session_id = state["session_id"]
            successor = successor_token(self._refresh_key, refresh_token)
            # A use of the session: its idle timeout starts again.
            used = {
                "session_id": session_id,
                "now": now,
                "expires_at": self.session_end(now, state["absolute_expires_at"]),
            }
            if state["rotated_at"] is None:
                # Only a rotation spends the session's budget (answers to a retry inside
                # the reuse interval do not); rotations of one session are serialised by
                # the lock held here, so the check and the count cannot interleave.
                await self.limiter.hit("refresh_session", str(session_id))
                await tx.execute_together(
                    _ROTATE,
                    {
                        **used,
                        "token_id": state["id"],
                        "generation": state["generation"] + 1,
                        "token_hash": token_digest(successor),
                    },
                )
            elif not await self._is_retry(tx, state, successor, now):
                await tx.execute(
                    _REVOKE_SESSION,
                    {"session_id": session_id, "now": now, "reason": "refresh_token_reused"},
                )
                # The trail's REFRESH_REUSED follows the commit; the webhook goes with it.
                await self.events.sessions_ended(
                    tx, state["user_id"], [session_id], "refresh_token_reused"
                )
                reused = True
            else:  # a retry: its answer is a use of the session too
                await tx.execute(_TOUCH_SESSION, used)
            if not reused:
                # In the transaction: a claims hook that fails leaves the token unspent.
                issued = await self.issue(
                    user_view(state, id_key="user_id"),
                    session_id,
                    state["amr"].split(),
                    successor,
                    auth_time=state["auth_time"],
                    reason="refresh",
                )
        if reused:  # raised after the commit, so the revocation holds
            await self.events.record_now(
                self.statements,
                EventKind.REFRESH_REUSED,
                user_id=state["user_id"],
                session_id=session_id,
                client=client,
            )
            raise AuthFailure(
                ErrorCode.TOKEN_REUSED,
                "This refresh token was already used; the session has been ended.",
            )
        return issued

    async def _is_retry(
        self, tx: Runner, state: Mapping[str, Any], successor: str, now: datetime
    ) -> bool:
        """A spent token presented again soon after its rotation, whose successor is still
        the newest generation: a racing tab or a retried request, not an attacker."""
        if now - state["rotated_at"] > self.reuse_interval:
            return False
        newest = await tx.first(_NEWEST_GENERATION, {"session_id": state["session_id"]})
        return (
            newest is not None
            and newest["generation"] == state["generation"] + 1
            and hmac.compare_digest(newest["token_hash"], token_digest(successor))
        )

    # -- logout -------------------------------------------------------------------------

    async def logout(
        self, *, refresh_token: str | None, everywhere: bool, client: ClientInfo | None = None
    ) -> int:
        """End the session of a refresh token (spent ones of a live session too), or every
        session of its user. Returns how many sessions ended."""
        if not refresh_token or not looks_like_opaque_token(refresh_token):
            return 0
        now = self.clock.now()
        digest = {"digest": token_digest(refresh_token)}
        async with self.events.transaction(self.statements) as tx:
            if not everywhere:
                found = await tx.first(_LOCK_SESSION_BY_TOKEN, digest)
                if found is None or not _is_live(found, now):
                    return 0
                await tx.execute(
                    _REVOKE_SESSION, {"session_id": found["id"], "now": now, "reason": "logout"}
                )
                await self.events.record(
                    tx,
                    EventKind.LOGOUT,
                    user_id=found["user_id"],
                    session_id=found["id"],
                    client=client,
                )
                return 1
            found = await tx.first(_SESSION_BY_TOKEN, digest)
            if found is None or not _is_live(found, now):
                return 0
            # The user's row first, then the sessions: the order of every transaction that
            # ends sessions en masse (a password change, `strawgate users disable`), so
            # that they queue up instead of deadlocking.
            await self.lock_user(tx, found["user_id"], exclusive=True)
            await self.lock_sessions(tx, found["user_id"])
            # Read again under the locks: a concurrent logout may have ended it meanwhile.
            found = await tx.first(_SESSION_BY_TOKEN, digest)
            if found is None or not _is_live(found, now):
                return 0
            await end_device_tokens(tx, found["user_id"])
            ended = await end_live_sessions(
                tx, found["user_id"], now=now, reason="logout_everywhere", events=self.events
            )
            await self.events.record(
                tx,
                EventKind.LOGOUT,
                user_id=found["user_id"],
                session_id=found["id"],
                client=client,
                details={"everywhere": True, "sessions": ended},
            )
            return ended

    # -- the per-request check ------------------------------------------------------------

    def decode_access_token(self, token: str) -> AccessClaims:
        return self.access_tokens.decode(token)

    async def current_user(self, claims: AccessClaims) -> tuple[UserView, AccessClaims] | None:
        """The user of a live session, and the claims as they hold now; None when the
        session has ended or the account is disabled: a revoked session's access tokens
        stop working at once. auth_time is the token's own (signed) claim, never later
        than the session's: a step-up renews the tokens it answers, not older tokens of
        the session, which a thief may hold. A token without the claim is not recent."""
        async with self.statements.connection() as conn:
            row = await conn.first(
                _CURRENT_USER,
                {"sid": claims.session_id, "uid": claims.user_id, "now": self.clock.now()},
            )
        if row is None:
            return None
        auth_time = claims.auth_time
        if auth_time is not None and auth_time > row["auth_time"]:
            auth_time = row["auth_time"]  # pragma: no cover - tokens carry the row's value
        return user_view(row), dataclasses.replace(claims, auth_time=auth_time)


# -- one account's locks and mass endings: the sign-in paths and `strawgate users` ---------


async def lock_account(
    tx: Runner, user_id: uuid.UUID, *, exclusive: bool
) -> Mapping[str, Any] | None:
    """The account's row, locked (see _LOCK_USER): first in every such transaction."""
    return await tx.first(_LOCK_USER if exclusive else _SHARE_USER, {"uid": user_id})


async def lock_account_sessions(tx: Runner, user_id: uuid.UUID) -> None:
    """Every live session of the account, locked in one order (by id); after its row."""
    await tx.execute(_LOCK_USER_SESSIONS, {"user_id": user_id})


async def end_live_sessions(
    tx: Runner, user_id: uuid.UUID, *, now: datetime, reason: str, events: SecurityEvents
) -> int:
    """Ends every live session of the account (a session.revoked webhook each); how many.
    Under both locks above."""
    ended = await tx.scalars(
        _REVOKE_USER_SESSIONS, {"owner_id": user_id, "now": now, "reason": reason}
    )
    await events.sessions_ended(tx, user_id, ended, reason)
    return len(ended)


async def end_device_tokens(tx: Runner, user_id: uuid.UUID) -> None:
    """Every device token of the account stops working (they carry the epoch)."""
    await tx.execute(_BUMP_DEVICE_EPOCH, {"owner_id": user_id})


def _is_live(session: Mapping[str, Any], now: datetime) -> bool:
    return session["revoked_at"] is None and session["expires_at"] > now


def _invalid_token() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_TOKEN, "This token is invalid or has expired.")
