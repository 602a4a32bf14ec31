"""Signup, login, refresh-token rotation, logout and the per-request session check.

These services open their own transactions rather than taking one from the caller:
a password hash (tens of milliseconds in a worker thread) sits between reading the user
and writing the session, and no database connection is held across it. They run fixed
Core statements through `Statements` (see db/session.py): this is the request path of
every client, and ORM units of work cost more here than the queries.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, null, select, true, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_challenge
from db.models import IP_MAX, Challenge, RefreshToken, TotpCredential, User, UserSession
from db.security.access import AccessClaims, AccessTokenCodec
from db.security.passwords import PasswordHasher
from db.security.tokens import (
    looks_like_opaque_token,
    new_opaque_token,
    successor_token,
    token_digest,
)
from db.services.mfa import TwoFactor
from db.session import Runner, Statements
from db.validation import (
    check_new_password,
    clean_user_agent,
    could_be_a_password,
    normalize_password,
    parse_email,
)

INVALID_CREDENTIALS_MESSAGE = "The email or password is incorrect."


@dataclass(frozen=True, slots=True)
class UserView:
    id: uuid.UUID
    email: str
    email_verified: bool
    otp_enabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedSession:
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserView


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    """A second step is needed: the challenge token goes back with the code."""

    challenge_token: str
    method: str  # "TOTP"
    purpose: str  # "LOGIN"
    expires_in: int


# What proving each factor adds to a session's `amr` (RFC 8176).
AMR_PASSWORD = ["pwd"]
AMR_PASSWORD_AND_TOTP = ["pwd", "otp", "mfa"]
AMR_PASSWORD_AND_RECOVERY_CODE = ["pwd", "mfa"]
MAX_CHALLENGE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class ClientInfo:
    ip: str | None = None
    user_agent: str | None = None


def user_view(row: Mapping[str, Any], id_key: str = "id") -> UserView:
    return UserView(
        id=row[id_key],
        email=row["email"],
        email_verified=row["email_verified_at"] is not None,
        otp_enabled=row.get("otp_confirmed_at") is not None,
        created_at=row["created_at"],
    )


# The statements of the request path, built once (SQLAlchemy caches their compiled form,
# and Statements keeps the driver's).

# Two-factor is on when the user has a confirmed TOTP credential.
_OTP_CONFIRMED = TotpCredential.confirmed_at.label("otp_confirmed_at")
_WITH_TOTP = (TotpCredential, TotpCredential.user_id == User.id)

_USER_BY_EMAIL = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.password_hash,
        User.is_active,
        _OTP_CONFIRMED,
    )
    .outerjoin(*_WITH_TOTP)
    .where(User.email_normalized == bindparam("email"))
)

_USER_BY_ID = (
    select(
        User.id, User.email, User.email_verified_at, User.created_at, User.is_active, _OTP_CONFIRMED
    )
    .outerjoin(*_WITH_TOTP)
    .where(User.id == bindparam("user_id"))
)

_ADD_USER = insert(User).values(
    id=bindparam("user_id"),
    email=bindparam("email"),
    email_normalized=bindparam("email_normalized"),
    password_hash=bindparam("password_hash"),
    is_active=true(),
    created_at=bindparam("now"),
    updated_at=bindparam("now"),
)

_UPGRADE_HASH = (
    update(User)
    .where(User.id == bindparam("user_id"), User.password_hash == bindparam("old_hash"))
    .values(password_hash=bindparam("new_hash"), updated_at=bindparam("now"))
)

_ADD_SESSION = insert(UserSession).values(
    id=bindparam("session_id"),
    user_id=bindparam("user_id"),
    created_at=bindparam("now"),
    last_used_at=bindparam("now"),
    expires_at=bindparam("expires_at"),
    user_agent=bindparam("user_agent"),
    ip=bindparam("ip"),
    amr=bindparam("amr"),
)

# The one query behind every authenticated request: the session is live and its user
# active.
_CURRENT_USER = (
    select(User.id, User.email, User.email_verified_at, User.created_at, _OTP_CONFIRMED)
    .join(UserSession, UserSession.user_id == User.id)
    .outerjoin(*_WITH_TOTP)
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
        UserSession.amr,
        User.id.label("user_id"),
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        _OTP_CONFIRMED,
    )
    .join(UserSession, UserSession.id == RefreshToken.session_id)
    .join(User, User.id == UserSession.user_id)
    .outerjoin(*_WITH_TOTP)
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

_TOUCH_SESSION = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(last_used_at=bindparam("now"))
)

_REVOKE_SESSION = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
)

_REVOKE_USER_SESSIONS = (
    update(UserSession)
    .where(
        UserSession.user_id == bindparam("owner_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
)


_ADD_CHALLENGE = insert(Challenge).values(
    id=bindparam("challenge_id"),
    token_hash=bindparam("token_hash"),
    user_id=bindparam("user_id"),
    purpose=bindparam("purpose"),
    method=bindparam("method"),
    amr=bindparam("amr"),
    user_agent=bindparam("user_agent"),
    ip=bindparam("ip"),
    created_at=bindparam("now"),
    expires_at=bindparam("expires_at"),
    consumed_at=null(),
)

# Every code checked against a challenge first takes one of its attempts, in one write,
# so parallel guesses cannot pass the cap; a challenge out of attempts, used or expired
# gives none.
_TAKE_ATTEMPT = (
    update(Challenge)
    .where(
        Challenge.token_hash == bindparam("digest"),
        Challenge.consumed_at.is_(None),
        Challenge.expires_at > bindparam("now"),
        Challenge.attempts < MAX_CHALLENGE_ATTEMPTS,
    )
    .values(attempts=Challenge.attempts + 1)
    .returning(
        Challenge.id,
        Challenge.user_id,
        Challenge.purpose,
        Challenge.method,
        Challenge.amr,
        Challenge.user_agent,
        Challenge.ip,
    )
)

_CONSUME_CHALLENGE = (
    update(Challenge)
    .where(Challenge.id == bindparam("challenge_id"), Challenge.consumed_at.is_(None))
    .values(consumed_at=bindparam("now"))
    .returning(Challenge.id)
)


class AuthService:
    def __init__(
        self,
        *,
        statements: Statements,
        hasher: PasswordHasher,
        access_tokens: AccessTokenCodec,
        refresh_key: bytes,
        clock: Clock,
        refresh_lifetime: timedelta,
        reuse_interval: timedelta,
        password_min_length: int,
        two_factor: TwoFactor,
        challenge_lifetime: timedelta,
    ) -> None:
        self.statements = statements
        self.hasher = hasher
        self.access_tokens = access_tokens
        self._refresh_key = refresh_key
        self.clock = clock
        self.refresh_lifetime = refresh_lifetime
        self.reuse_interval = reuse_interval
        self.password_min_length = password_min_length
        self.two_factor = two_factor
        self.challenge_lifetime = challenge_lifetime

    # -- signup and login -------------------------------------------------------------

    async def signup(self, *, email: str, password: str, client: ClientInfo) -> IssuedSession:
        """Create an account and sign it in."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        address = parse_email(email)
        password = normalize_password(password)
        check_new_password(password, min_length=self.password_min_length)
        async with self.statements.connection() as conn:
            if await conn.first(_USER_BY_EMAIL, {"email": address.normalized}) is not None:
                raise _email_taken()
        password_hash = await self.hasher.hash(password)
        now = self.clock.now()
        user = {
            "id": uuid.uuid4(),
            "email": address.address,
            "email_verified_at": None,
            "created_at": now,
        }
        try:
            async with self.statements.transaction() as tx:
                # The unique index decides between concurrent signups; the check above
                # only spares a hash in the common case.
                await tx.execute(
                    _ADD_USER,
                    {
                        "user_id": user["id"],
                        "email": address.address,
                        "email_normalized": address.normalized,
                        "password_hash": password_hash,
                        "now": now,
                    },
                )
                return await self._open_session(
                    tx, user_view(user), amr=AMR_PASSWORD, client=client
                )
        except UniqueViolation:
            raise _email_taken() from None

    async def login(
        self, *, email: str, password: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Check a password and sign in. One answer whether the email is unknown or the
        password wrong, in about the same time."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        password = normalize_password(password)
        try:
            normalized: str | None = parse_email(email).normalized
        except AuthFailure:
            normalized = None  # cannot be registered; answered like an unknown address
        if not could_be_a_password(password):
            raise _invalid_credentials()
        user: Mapping[str, Any] | None = None
        if normalized is not None:
            async with self.statements.connection() as conn:
                user = await conn.first(_USER_BY_EMAIL, {"email": normalized})
        if user is None:
            await self.hasher.verify_dummy(password)
            raise _invalid_credentials()
        ok, new_hash = await self.hasher.verify(password, user["password_hash"])
        if not ok:
            raise _invalid_credentials()
        if not user["is_active"]:
            raise AuthFailure(ErrorCode.ACCOUNT_DISABLED, "This account is disabled.")
        if user["otp_confirmed_at"] is not None:
            async with self.statements.transaction() as tx:
                if new_hash is not None:
                    await self._upgrade_hash(tx, user, new_hash)
                return await self._open_challenge(tx, user["id"], client)
        async with self.statements.transaction() as tx:
            if new_hash is not None:
                await self._upgrade_hash(tx, user, new_hash)
            return await self._open_session(tx, user_view(user), amr=AMR_PASSWORD, client=client)

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

    async def _open_challenge(
        self, tx: Runner, user_id: uuid.UUID, client: ClientInfo
    ) -> IssuedChallenge:
        now = self.clock.now()
        token = new_opaque_token()  # 256 bits; stored only as its SHA-256
        await tx.execute(
            _ADD_CHALLENGE,
            {
                "challenge_id": uuid.uuid4(),
                "token_hash": token_digest(token),
                "user_id": user_id,
                "purpose": "LOGIN",
                "method": "TOTP",
                "amr": " ".join(AMR_PASSWORD),
                "user_agent": clean_user_agent(client.user_agent),
                "ip": client.ip[:IP_MAX] if client.ip else None,
                "now": now,
                "expires_at": now + self.challenge_lifetime,
            },
        )
        return IssuedChallenge(
            challenge_token=token,
            method="TOTP",
            purpose="LOGIN",
            expires_in=int(self.challenge_lifetime.total_seconds()),
        )

    async def verify_otp(
        self, *, challenge_token: str, code: str, client: ClientInfo
    ) -> IssuedSession:
        """The second step of a login: a current TOTP code, or an unused recovery code."""
        if not challenge_token or not looks_like_opaque_token(challenge_token):
            raise invalid_challenge()
        now = self.clock.now()
        async with self.statements.transaction() as tx:
            challenge = await tx.first(
                _TAKE_ATTEMPT, {"digest": token_digest(challenge_token), "now": now}
            )
        if challenge is None or challenge["user_id"] is None:
            raise invalid_challenge()

        async def consume(tx: Runner) -> bool:
            # In the transaction that spends the code: of two requests racing on one
            # challenge, the loser's code stays unspent.
            claimed = {"challenge_id": challenge["id"], "now": now}
            return await tx.first(_CONSUME_CHALLENGE, claimed) is not None

        method = await self.two_factor.check_code(
            user_id=challenge["user_id"], code=code, recovery=True, claim=consume
        )
        amr = AMR_PASSWORD_AND_TOTP if method == "totp" else AMR_PASSWORD_AND_RECOVERY_CODE
        async with self.statements.transaction() as tx:
            user = await tx.first(_USER_BY_ID, {"user_id": challenge["user_id"]})
            if user is None:
                raise invalid_challenge()
            if not user["is_active"]:
                raise AuthFailure(ErrorCode.ACCOUNT_DISABLED, "This account is disabled.")
            return await self._open_session(
                tx,
                user_view(user),
                amr=amr,
                client=ClientInfo(ip=challenge["ip"], user_agent=challenge["user_agent"]),
            )

    async def _open_session(
        self, tx: Runner, user: UserView, *, amr: list[str], client: ClientInfo
    ) -> IssuedSession:
        now = self.clock.now()
        session_id = uuid.uuid4()
        refresh = new_opaque_token()
        await tx.execute(
            _ADD_SESSION,
            {
                "session_id": session_id,
                "user_id": user.id,
                "now": now,
                "expires_at": now + self.refresh_lifetime,
                "user_agent": clean_user_agent(client.user_agent),
                "ip": client.ip[:IP_MAX] if client.ip else None,
                "amr": " ".join(amr),
            },
        )
        await tx.execute(
            _ADD_GENERATION,
            {
                "session_id": session_id,
                "generation": 0,
                "token_hash": token_digest(refresh),
                "now": now,
            },
        )
        return self._issue(user, session_id, amr, refresh)

    def _issue(
        self, user: UserView, session_id: uuid.UUID, amr: list[str], refresh: str
    ) -> IssuedSession:
        access = self.access_tokens.issue(user_id=user.id, session_id=session_id, amr=amr)
        return IssuedSession(
            access_token=access,
            refresh_token=refresh,
            expires_in=int(self.access_tokens.lifetime.total_seconds()),
            user=user,
        )

    # -- refresh ------------------------------------------------------------------------

    async def refresh(self, *, refresh_token: str | None) -> IssuedSession:
        """Rotate a refresh token. A spent token presented again within the reuse interval
        gets the same successor; later it is reuse, and the whole session ends."""
        if not refresh_token or not looks_like_opaque_token(refresh_token):
            raise _invalid_token()
        digest = token_digest(refresh_token)
        now = self.clock.now()
        reused = False
        async with self.statements.transaction() as tx:
            # Locks the session and the presented generation: rotations of one session are
            # serialised across processes (SQLite: BEGIN IMMEDIATE holds the write lock).
            state = await tx.first(_ROTATION_STATE, {"digest": digest})
            if state is None or not _is_live(state, now):
                raise _invalid_token()
            if not state["is_active"]:
                raise AuthFailure(ErrorCode.ACCOUNT_DISABLED, "This account is disabled.")
            session_id = state["session_id"]
            successor = successor_token(self._refresh_key, refresh_token)
            if state["rotated_at"] is None:
                await tx.execute(_MARK_ROTATED, {"token_id": state["id"], "now": now})
                await tx.execute(
                    _ADD_GENERATION,
                    {
                        "session_id": session_id,
                        "generation": state["generation"] + 1,
                        "token_hash": token_digest(successor),
                        "now": now,
                    },
                )
            elif not await self._is_retry(tx, state, successor, now):
                await tx.execute(
                    _REVOKE_SESSION,
                    {"session_id": session_id, "now": now, "reason": "refresh_token_reused"},
                )
                reused = True
            if not reused:
                await tx.execute(_TOUCH_SESSION, {"session_id": session_id, "now": now})
        if reused:  # raised after the commit, so the revocation holds
            raise AuthFailure(
                ErrorCode.TOKEN_REUSED,
                "This refresh token was already used; the session has been ended.",
            )
        user = user_view(state, id_key="user_id")
        return self._issue(user, session_id, state["amr"].split(), successor)

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

    async def logout(self, *, refresh_token: str | None, everywhere: bool) -> int:
        """End the session of a refresh token (spent ones of a live session too), or every
        session of its user. Returns how many sessions ended."""
        if not refresh_token or not looks_like_opaque_token(refresh_token):
            return 0
        now = self.clock.now()
        digest = {"digest": token_digest(refresh_token)}
        async with self.statements.transaction() as tx:
            if not everywhere:
                found = await tx.first(_LOCK_SESSION_BY_TOKEN, digest)
                if found is None or not _is_live(found, now):
                    return 0
                await tx.execute(
                    _REVOKE_SESSION, {"session_id": found["id"], "now": now, "reason": "logout"}
                )
                return 1
            found = await tx.first(_SESSION_BY_TOKEN, digest)
            if found is None or not _is_live(found, now):
                return 0
            await tx.execute(_LOCK_USER_SESSIONS, {"user_id": found["user_id"]})
            # Read again under the locks: a concurrent logout may have ended it meanwhile.
            found = await tx.first(_SESSION_BY_TOKEN, digest)
            if found is None or not _is_live(found, now):
                return 0
            return await tx.execute(
                _REVOKE_USER_SESSIONS,
                {"owner_id": found["user_id"], "now": now, "reason": "logout_everywhere"},
            )

    # -- the per-request check ------------------------------------------------------------

    def decode_access_token(self, token: str) -> AccessClaims:
        return self.access_tokens.decode(token)

    async def current_user(self, claims: AccessClaims) -> UserView | None:
        """The user of a live session, or None when the session has ended or the account
        is disabled: a revoked session's access tokens stop working at once."""
        async with self.statements.connection() as conn:
            row = await conn.first(
                _CURRENT_USER,
                {"sid": claims.session_id, "uid": claims.user_id, "now": self.clock.now()},
            )
        return None if row is None else user_view(row)


def _is_live(session: Mapping[str, Any], now: datetime) -> bool:
    return session["revoked_at"] is None and session["expires_at"] > now


def _email_taken() -> AuthFailure:
    return AuthFailure(
        ErrorCode.EMAIL_TAKEN, "An account with this email address already exists.", field="email"
    )


def _invalid_credentials() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS_MESSAGE)


def _invalid_token() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_TOKEN, "This token is invalid or has expired.")
