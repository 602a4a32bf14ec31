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
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, insert, select, true, update

from db.clock import Clock
from db.devices import device_family, network_of
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_challenge, invalid_otp
from db.mail.outbox import Outbox
from db.models import (
    IP_MAX,
    RecoveryCode,
    RefreshToken,
    TotpCredential,
    User,
    UserSession,
)
from db.security.access import AccessClaims, AccessTokenCodec
from db.security.device import DeviceTokens
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher, unusable_password_hash
from db.security.tokens import (
    looks_like_opaque_token,
    new_opaque_token,
    successor_token,
    token_digest,
)
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import Lockout
from db.services.mfa import TwoFactor
from db.services.notices import Notices
from db.services.types import (
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    UserView,
    merge_amr,
    user_view,
)
from db.session import Runner, Statements
from db.validation import (
    check_new_password,
    clean_user_agent,
    could_be_a_password,
    normalize_password,
    parse_email,
)

__all__ = ["AuthService", "ClientInfo", "IssuedChallenge", "IssuedSession", "UserView"]

INVALID_CREDENTIALS_MESSAGE = "The email or password is incorrect."

# What proving each factor adds to a session's `amr` (RFC 8176). An emailed code is
# "otp" (as Microsoft's identity platform documents it); "mfa" needs a second factor of
# the user's own: an authenticator code or a recovery code.
AMR_PASSWORD = ["pwd"]
AMR_EMAIL_CODE = ["otp"]
AMR_TOTP = ["otp", "mfa"]
AMR_RECOVERY_CODE = ["mfa"]

# A sign-in from a device family and network the user has not signed in from within
# this long is "new" (and mailed about).
KNOWN_DEVICE_WINDOW = timedelta(days=90)


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
        User.password_changed_at,
        User.is_active,
        User.device_epoch,
        _OTP_CONFIRMED,
    )
    .outerjoin(*_WITH_TOTP)
    .where(User.email_normalized == bindparam("email"))
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

_USER_BY_ID = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        User.device_epoch,
        _OTP_CONFIRMED,
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
        _OTP_CONFIRMED,
    )
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
        UserSession.absolute_expires_at,
        UserSession.amr,
        User.id.label("user_id"),
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        User.device_epoch,
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

# A use of the refresh token: the idle timeout starts again (within the absolute end).
_TOUCH_SESSION = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(last_used_at=bindparam("now"), expires_at=bindparam("expires_at"))
)

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
)


# Whether the user signed in before at all, and from this device family and network lately.
_DEVICE_HISTORY = select(
    exists().where(UserSession.user_id == bindparam("uid")).label("signed_in_before"),
    exists()
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.network == bindparam("network"),
        UserSession.device == bindparam("device"),
        UserSession.last_used_at >= bindparam("since"),
    )
    .label("known"),
)

# Who holds an address: what signup (and a change of address) decides on.
ADDRESS_HOLDER = select(User.id, User.email_verified_at).where(
    User.email_normalized == bindparam("email")
)
# An unverified signup is replaced by a new signup once its code has expired (it was made
# with the account: `created_at` says when, and nothing anyone does later extends it),
# unless the account ever had a session (one made while verification was off).
_DROP_ABANDONED_SIGNUP = delete(User).where(
    User.id == bindparam("uid"),
    User.email_verified_at.is_(None),
    User.created_at <= bindparam("abandoned_before"),
    ~exists().where(UserSession.user_id == User.id),
)

# A change of address, proven by the code mailed there.
_CHANGE_EMAIL = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(
        email=bindparam("email"),
        email_normalized=bindparam("email_normalized"),
        email_verified_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
)
_MARK_VERIFIED = (
    update(User)
    .where(User.id == bindparam("uid"), User.email_verified_at.is_(None))
    .values(email_verified_at=bindparam("now"))
)

# A new password: on a change, only over the hash that was checked (a concurrent change
# wins, not both); on a reset, unconditionally, and the address counts as verified.
# A new password; password_changed_at is what sign-ins in flight re-check.
_NEW_PASSWORD: dict[str, Any] = {
    "password_hash": bindparam("new_hash"),
    "password_changed_at": bindparam("now"),
    "updated_at": bindparam("now"),
}
_CHANGE_PASSWORD = (
    update(User)
    .where(User.id == bindparam("uid"), User.password_hash == bindparam("old_hash"))
    .values(**_NEW_PASSWORD)
)
_RESET_PASSWORD = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(
        **_NEW_PASSWORD,
        email_verified_at=func.coalesce(User.email_verified_at, bindparam("now")),
        # A reset ends every device token too: whoever reset may be the only owner left.
        device_epoch=User.device_epoch + 1,
    )
)
# An address proven by a sign-in code, on an account whose password nobody proved: the
# password was set by whoever signed up with the address, who may not be its owner.
_DISCARD_PASSWORD = update(User).where(User.id == bindparam("uid")).values(**_NEW_PASSWORD)

_REVOKE_OTHER_SESSIONS = (
    update(UserSession)
    .where(
        UserSession.user_id == bindparam("owner_id"),
        UserSession.id != bindparam("keep_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .values(revoked_at=bindparam("now"), revoke_reason=bindparam("reason"))
)

# A live session and how it signed in (read under the user's lock).
LIVE_SESSION = select(UserSession.amr).where(
    UserSession.id == bindparam("session_id"),
    UserSession.revoked_at.is_(None),
    UserSession.expires_at > bindparam("now"),
)
_LOCK_LIVE_SESSION = LIVE_SESSION.with_for_update()
_NEWEST_GENERATION_NUMBER = select(func.max(RefreshToken.generation)).where(
    RefreshToken.session_id == bindparam("session_id")
)
# The session's refresh tokens so far are forgotten, not marked spent: presented later
# they answer INVALID_TOKEN and end nothing (reuse detection would end this session).
_FORGET_GENERATIONS = delete(RefreshToken).where(RefreshToken.session_id == bindparam("session_id"))

_UNUSED_RECOVERY_CODES = select(func.count(RecoveryCode.id)).where(
    RecoveryCode.user_id == bindparam("uid"), RecoveryCode.used_at.is_(None)
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
        challenges: Challenges,
        outbox: Outbox,
        notices: Notices,
        require_email_verification: bool,
        devices: DeviceTokens,
        lockout: Lockout,
        limiter: RateLimiter,
        events: SecurityEvents,
        idle_timeout: timedelta = timedelta(0),
        max_sessions: int = 50,
    ) -> None:
        # 0: no idle timeout (only the absolute refresh lifetime).
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.events = events
        self.devices = devices
        self.lockout = lockout
        self.limiter = limiter
        self.statements = statements
        self.hasher = hasher
        self.access_tokens = access_tokens
        self._refresh_key = refresh_key
        self.clock = clock
        self.refresh_lifetime = refresh_lifetime
        self.reuse_interval = reuse_interval
        self.password_min_length = password_min_length
        self.two_factor = two_factor
        self.challenges = challenges
        self.outbox = outbox
        self.notices = notices
        self.require_email_verification = require_email_verification

    # -- signup and login -------------------------------------------------------------

    async def signup(
        self, *, email: str, password: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Create an account. With email verification required, answer the challenge of
        the code mailed to the address (the account gets no session before it is
        verified); otherwise sign it in at once."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        await self.limiter.hit("signup_ip", client_key(client.ip))
        address = parse_email(email)
        password = normalize_password(password)
        check_new_password(password, min_length=self.password_min_length)
        async with self.statements.connection() as conn:
            existing = await conn.first(ADDRESS_HOLDER, {"email": address.normalized})
        # Only a verified registration is revealed (or any, without verification).
        if existing is not None and (
            existing["email_verified_at"] is not None or not self.require_email_verification
        ):
            raise _email_taken()
        password_hash = await self.hasher.hash(password)
        now = self.clock.now()
        user = {
            "id": uuid.uuid4(),
            "email": address.address,
            "email_verified_at": None,
            "created_at": now,
        }
        add_user: dict[str, Any] = {
            "user_id": user["id"],
            "email": address.address,
            "email_normalized": address.normalized,
            "password_hash": password_hash,
            "now": now,
        }
        try:
            async with self.events.transaction(self.statements) as tx:
                if existing is not None:
                    # A pending signup: replaced once its codes have expired; until then
                    # the answer looks the same and no mail goes out.
                    dropped = await tx.execute(
                        _DROP_ABANDONED_SIGNUP,
                        {
                            "uid": existing["id"],
                            "abandoned_before": now - self.challenges.email_lifetime,
                        },
                    )
                    if not dropped:
                        return await self._pending_signup(tx, client)
                # The unique index decides between concurrent signups; the check above
                # only spares a hash in the common case.
                await tx.execute(_ADD_USER, add_user)
                await self.events.record(
                    tx, EventKind.SIGNUP, user_id=add_user["user_id"], client=client
                )
                if self.require_email_verification:
                    issued: IssuedSession | IssuedChallenge = await self.challenges.open_email(
                        tx, purpose=ch.VERIFY_EMAIL, user=user, amr=AMR_PASSWORD, client=client
                    )
                else:
                    issued = await self.open_session(
                        tx, user_view(user), amr=AMR_PASSWORD, client=client
                    )
        except UniqueViolation:
            if not self.require_email_verification:
                raise _email_taken() from None
            async with self.events.transaction(self.statements) as tx:
                return await self._pending_signup(tx, client)
        self.outbox.wake()
        return issued

    async def _pending_signup(self, tx: Runner, client: ClientInfo) -> IssuedChallenge:
        return await self.challenges.open_email(
            tx, purpose=ch.VERIFY_EMAIL, user=None, amr=AMR_PASSWORD, client=client
        )

    async def login(
        self, *, email: str, password: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Check a password and sign in. One answer whether the email is unknown or the
        password wrong, in about the same time.

        Before any password is hashed: the client's address budget, then either the
        budget of the device token the client holds for this account, or the account's
        (its lockout, then its budget). A device token's holder is not held up by a
        lockout strangers caused, and its failures do not add to it."""
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
        device = None
        if user is not None:
            device = self.devices.check(
                client.device_token, user_id=user["id"], epoch=user["device_epoch"]
            )
        throttled = device is not None  # whether a success has a failure count to clear
        if device is not None:
            await self.limiter.hit("login_account", f"device:{device.device_id}")
        elif normalized is not None:
            throttled = await self.lockout.check(normalized)
            await self.limiter.hit("login_account", normalized)
        try:
            if not could_be_a_password(password):
                raise _invalid_credentials()
            if user is None:
                await self.hasher.verify_dummy(password)
                raise _invalid_credentials()
            ok, new_hash = await self.hasher.verify(password, user["password_hash"])
            if not ok:
                raise _invalid_credentials()
        except AuthFailure as failure:
            if failure.code is not ErrorCode.INVALID_CREDENTIALS:
                raise  # a busy hasher (RATE_LIMITED) is no failed sign-in
            locked_until = None
            if normalized is not None and device is None:
                locked_until = await self.lockout.failed(normalized)
            await self._login_failed(user, normalized, client, locked_until)
            raise
        if not user["is_active"]:
            raise _account_disabled()
        async with self.events.transaction(self.statements) as tx:
            locked = await tx.first(_SHARE_USER, {"uid": user["id"]})
            if locked is None or locked["password_changed_at"] != user["password_changed_at"]:
                # The password changed since it was checked: it is no longer the password.
                raise _invalid_credentials()
            if not locked["is_active"]:
                raise _account_disabled()
            if self.require_email_verification and user["email_verified_at"] is None:
                # The address is proven first: a fresh code goes to it.
                issued: IssuedSession | IssuedChallenge = await self.challenges.open_email(
                    tx, purpose=ch.VERIFY_EMAIL, user=user, amr=AMR_PASSWORD, client=client
                )
            elif user["otp_confirmed_at"] is not None:
                issued = await self.challenges.open_totp(
                    tx, user_id=user["id"], purpose=ch.LOGIN, amr=AMR_PASSWORD, client=client
                )
            else:
                issued = await self.open_session(
                    tx, user_view(user), amr=AMR_PASSWORD, client=client
                )
        if new_hash is not None:
            # After the commit, in a transaction of its own: it takes the row exclusively,
            # which concurrent sign-ins holding it shared must not wait for each other on.
            async with self.events.transaction(self.statements) as tx:
                await self._upgrade_hash(tx, user, new_hash)
        if normalized is not None and throttled:
            await self.lockout.succeeded(normalized)  # the right password clears the count
        self.outbox.wake()
        return issued

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

    # -- verifyOtp ----------------------------------------------------------------------

    async def verify_otp(
        self, *, challenge_token: str, code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Completes a TOTP step (a current code or an unused recovery code), or an
        emailed sign-in or verification code. An emailed reset code is not taken here."""
        await self.limiter.hit("verify_otp_ip", client_key(client.ip))
        await self.limit_code_checks(challenge_token, client)
        challenge = await self.challenges.take_attempt(ch.TAKE_FOR_VERIFY_OTP, challenge_token)
        try:
            return await self._complete(challenge, code, client)
        except AuthFailure as failure:
            if failure.code is ErrorCode.INVALID_OTP and challenge["user_id"] is not None:
                await self.events.record_now(
                    self.statements,
                    EventKind.LOGIN_FAILED,
                    user_id=challenge["user_id"],
                    client=client,
                    details={"step": challenge["method"].lower()},
                )
            raise

    async def _complete(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        if challenge["method"] == ch.EMAIL:
            return await self._complete_emailed_code(challenge, code, client)
        user_id = challenge["user_id"]
        if user_id is None:  # pragma: no cover - TOTP challenges always have a user
            raise invalid_challenge()
        resetting = challenge["purpose"] == ch.RESET_PASSWORD
        issued: list[IssuedSession] = []

        async def lock(tx: Runner) -> None:
            # First in the transaction that spends the code (see _LOCK_USER).
            await self.lock_user(tx, user_id, exclusive=resetting)

        async def claim(tx: Runner, method: str) -> bool:
            # In the transaction that spends the code: of two requests racing on one
            # challenge, the loser's code stays unspent; and the session is made there
            # too, so a password change cannot slip in between.
            if not await self.challenges.consume(tx, challenge["id"]):
                return False
            if method == "recovery":
                await self._recovery_code_used(tx, user_id, client)
            if resetting:
                await self.reset_password_now(
                    tx, user_id=user_id, new_hash=challenge["pending_password_hash"], client=client
                )
            user = await tx.first(_USER_BY_ID, {"user_id": user_id})
            if user is None:
                raise invalid_challenge()
            if not user["is_active"]:
                raise _account_disabled()
            amr = merge_amr(
                challenge["amr"].split(), AMR_TOTP if method == "totp" else AMR_RECOVERY_CODE
            )
            issued.append(await self.open_session(tx, user_view(user), amr=amr, client=client))
            return True

        await self.two_factor.check_code(
            user_id=user_id,
            code=code,
            recovery=True,
            claim=claim,
            lock=lock,
            client=self.client_budget_key(client),
        )
        self.outbox.wake()
        return issued[0]

    def client_budget_key(self, client: ClientInfo) -> str:
        return self.devices.budget_key(client.ip, client.device_token)

    async def limit_code_checks(self, challenge_token: str, client: ClientInfo) -> None:
        """Wrong-code budgets count per challenge and per client: another client's
        guesses never use up this one's."""
        digest = token_digest(challenge_token).hex()[:32] if challenge_token else "-"
        await self.limiter.hit("verify_otp_challenge", f"{digest}:{self.client_budget_key(client)}")

    async def _complete_emailed_code(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        if not self.challenges.email_code_matches(challenge, code):
            raise invalid_otp()
        amr = merge_amr(challenge["amr"].split(), AMR_EMAIL_CODE)
        try:
            return await self._complete_emailed_code_now(challenge, amr, client)
        except UniqueViolation as violation:
            if "email" not in str(violation):
                raise
            # Another account took the new address between the check and the change.
            raise _email_taken() from None

    async def _complete_emailed_code_now(
        self, challenge: Mapping[str, Any], amr: list[str], client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        async with self.events.transaction(self.statements) as tx:
            await self.lock_user(tx, challenge["user_id"], exclusive=True)
            user = await tx.first(_USER_BY_ID, {"user_id": challenge["user_id"]})
            if user is None:
                raise invalid_challenge()
            if not user["is_active"]:
                raise _account_disabled()
            now = self.clock.now()
            asking = None
            if challenge["purpose"] == ch.CHANGE_EMAIL:
                # Only while the session that asked (with the password) is still live: a
                # logout, a revocation or a password change since then ends the request.
                # Locked (after the user row, as everywhere): a refresh of it waits, and
                # its refresh tokens are replaced below.
                asking = await tx.first(
                    _LOCK_LIVE_SESSION, {"session_id": challenge["session_id"], "now": now}
                )
                if asking is None:
                    raise AuthFailure(
                        ErrorCode.INVALID_TOKEN,
                        "The session that asked for this change has ended; sign in and ask again.",
                    )
                if user["otp_confirmed_at"] is not None and "mfa" not in challenge["amr"].split():
                    # Asked without a second factor, and two-factor came on since.
                    raise AuthFailure(
                        ErrorCode.INVALID_TOKEN,
                        "Two-factor sign-in was turned on since this change was asked for; ask"
                        " again.",
                    )
            if not await self.challenges.consume(tx, challenge["id"]):
                raise invalid_challenge()
            if asking is not None:
                # The asking session goes on, at the new address, with a new refresh
                # token (as after changePassword); every other session stays as it is.
                user = await self._change_email_now(tx, user, challenge["new_email"], client)
                refresh = new_opaque_token()
                await self.replace_refresh_token(tx, challenge["session_id"], refresh, now)
                issued: IssuedSession | IssuedChallenge = self.issue(
                    user_view(user), challenge["session_id"], asking["amr"].split(), refresh, client
                )
            else:
                issued = await self._sign_in_by_emailed_code(tx, challenge, user, amr, client)
        self.outbox.wake()
        return issued

    async def _sign_in_by_emailed_code(
        self,
        tx: Runner,
        challenge: Mapping[str, Any],
        user: Mapping[str, Any],
        amr: list[str],
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """A verification or sign-in code: the address is proven, and the account signs
        in (after a TOTP step where two-factor is on)."""
        now = self.clock.now()
        if challenge["purpose"] == ch.LOGIN and user["email_verified_at"] is None:
            await self._distrust_password(tx, user["id"])
        # A code that reached the mailbox proves the address (sign-in codes too).
        await tx.execute(_MARK_VERIFIED, {"uid": user["id"], "now": now})
        if user["email_verified_at"] is None:
            await self.events.record(
                tx, EventKind.EMAIL_VERIFIED, user_id=user["id"], client=client
            )
        user = {**user, "email_verified_at": user["email_verified_at"] or now}
        if user["otp_confirmed_at"] is not None and "mfa" not in amr:
            # A mailbox alone never signs in to an account with two-factor on.
            return await self.challenges.open_totp(
                tx, user_id=user["id"], purpose=ch.LOGIN, amr=amr, client=client
            )
        return await self.open_session(tx, user_view(user), amr=amr, client=client)

    async def _change_email_now(
        self, tx: Runner, user: Mapping[str, Any], new_email: str, client: ClientInfo
    ) -> Mapping[str, Any]:
        """Moves the account to the address a code just proved: verified, every other
        pending step voided (a reset code sent to the old address stops working), the
        old address told, sessions kept. Returns the user as it is now."""
        address = parse_email(new_email)
        holder = await tx.first(ADDRESS_HOLDER, {"email": address.normalized})
        if holder is not None and holder["id"] != user["id"]:
            # Only a signup that never proved the address and never signed in yields it
            # (however recent): whoever completes this code owns the mailbox.
            dropped = await tx.execute(
                _DROP_ABANDONED_SIGNUP,
                {"uid": holder["id"], "abandoned_before": self.clock.now()},
            )
            if not dropped:
                raise _email_taken()
        now = self.clock.now()
        await tx.execute(
            _CHANGE_EMAIL,
            {
                "uid": user["id"],
                "email": address.address,
                "email_normalized": address.normalized,
                "now": now,
            },
        )
        await self.challenges.void_all(tx, user["id"])
        await self.notices.send(
            tx,
            email=user["email"],
            template="email_changed",
            client=client,
            new_email=address.address,
        )
        # The old address, for support (the notice tells its owner to ask there) and for
        # a deletion to find what is still held under it; erased with the account.
        await self.events.record(
            tx,
            EventKind.EMAIL_CHANGED,
            user_id=user["id"],
            client=client,
            details={"previous": user["email"]},
        )
        changed = await tx.first(_USER_BY_ID, {"user_id": user["id"]})
        assert changed is not None  # noqa: S101 - the row is locked by this transaction
        return changed

    async def _distrust_password(self, tx: Runner, user_id: uuid.UUID) -> None:
        """The owner of the address signs in by code to an account nobody had verified:
        whoever signed up chose its password, and may not be the owner (pre-hijacking).
        That password stops working (set one with requestPasswordReset), and whatever it
        opened ends."""
        await tx.execute(
            _DISCARD_PASSWORD,
            {"uid": user_id, "new_hash": unusable_password_hash(), "now": self.clock.now()},
        )
        await self._end_sessions(tx, user_id, keep=None, reason="unproven_password")
        await self.challenges.void_all(tx, user_id)

    async def _recovery_code_used(self, tx: Runner, user_id: uuid.UUID, client: ClientInfo) -> None:
        user = await tx.first(_USER_BY_ID, {"user_id": user_id})
        remaining = await tx.scalars(_UNUSED_RECOVERY_CODES, {"uid": user_id})
        if user is not None:
            await self.notices.send(
                tx,
                email=user["email"],
                template="recovery_code_used",
                client=client,
                remaining=int(remaining[0]),
            )
        await self.events.record(
            tx,
            EventKind.RECOVERY_CODE_USED,
            user_id=user_id,
            client=client,
            details={"remaining": int(remaining[0])},
        )

    # -- passwords ------------------------------------------------------------------------

    async def lock_user(
        self, tx: Runner, user_id: uuid.UUID, *, exclusive: bool
    ) -> Mapping[str, Any] | None:
        """The first lock of a transaction that touches the account's credentials,
        sessions or challenges (see _LOCK_USER). The row as locked (password_changed_at,
        is_active, email_verified_at); None when there is no such account."""
        return await lock_account(tx, user_id, exclusive=exclusive)

    async def reset_password_now(
        self, tx: Runner, *, user_id: uuid.UUID, new_hash: str, client: ClientInfo
    ) -> Mapping[str, Any]:
        """Sets a password proven by a reset code (and the TOTP step, where two-factor is
        on): the address counts as verified, every session and pending step ends, and the
        owner is told. Returns the user. The caller holds the user's lock (lock_user)."""
        user = await tx.first(_USER_BY_ID, {"user_id": user_id})
        if user is None:
            raise invalid_challenge()
        if not user["is_active"]:
            raise _account_disabled()
        now = self.clock.now()
        await tx.execute(_RESET_PASSWORD, {"uid": user_id, "new_hash": new_hash, "now": now})
        await self._end_sessions(tx, user_id, keep=None, reason="password_reset")
        await self.challenges.void_all(tx, user_id)
        await self.notices.send(tx, email=user["email"], template="password_reset", client=client)
        await self.events.record(tx, EventKind.PASSWORD_RESET, user_id=user_id, client=client)
        if user["email_verified_at"] is None:
            await self.events.record(tx, EventKind.EMAIL_VERIFIED, user_id=user_id, client=client)
        # As the reset left it (verified, a new device epoch): read, not recomputed.
        changed = await tx.first(_USER_BY_ID, {"user_id": user_id})
        assert changed is not None  # noqa: S101 - the row is locked by this transaction
        return changed

    async def change_password_now(
        self,
        tx: Runner,
        *,
        user: UserView,
        session_id: uuid.UUID,
        old_hash: str,
        new_hash: str,
        client: ClientInfo,
    ) -> bool:
        """Sets a new password over the checked one, ends every other session and pending
        step, and tells the owner. False when the password changed meanwhile. The caller
        holds the user's lock (lock_user)."""
        changed = await tx.execute(
            _CHANGE_PASSWORD,
            {"uid": user.id, "old_hash": old_hash, "new_hash": new_hash, "now": self.clock.now()},
        )
        if not changed:
            return False
        await self._end_sessions(tx, user.id, keep=session_id, reason="password_changed")
        await self.challenges.void_all(tx, user.id)
        await self.notices.send(tx, email=user.email, template="password_changed", client=client)
        await self.events.record(
            tx, EventKind.PASSWORD_CHANGED, user_id=user.id, session_id=session_id, client=client
        )
        return True

    async def lock_sessions(self, tx: Runner, user_id: uuid.UUID) -> None:
        """Locks every live session of the user, in one order (by id) wherever more than
        one is locked, so that two such transactions queue up instead of deadlocking. A
        transaction must take no other session lock before this one."""
        await lock_account_sessions(tx, user_id)

    async def _end_sessions(
        self, tx: Runner, user_id: uuid.UUID, *, keep: uuid.UUID | None, reason: str
    ) -> int:
        await self.lock_sessions(tx, user_id)
        return await tx.execute(
            _REVOKE_OTHER_SESSIONS,
            {
                "owner_id": user_id,
                # No session has the nil id: "keep none".
                "keep_id": keep or uuid.UUID(int=0),
                "now": self.clock.now(),
                "reason": reason,
            },
        )

    # -- sessions ---------------------------------------------------------------------------

    async def open_session(
        self, tx: Runner, user: UserView, *, amr: list[str], client: ClientInfo
    ) -> IssuedSession:
        now = self.clock.now()
        session_id = uuid.uuid4()
        refresh = new_opaque_token()
        device = device_family(client.user_agent)
        network = network_of(client.ip)
        history = await tx.first(
            _DEVICE_HISTORY,
            {
                "uid": user.id,
                "device": device,
                "network": network,
                "since": now - KNOWN_DEVICE_WINDOW,
            },
        )
        absolute_end = now + self.refresh_lifetime
        await tx.execute(
            _ADD_SESSION,
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
            },
        )
        await self.add_generation(tx, session_id, 0, refresh, now)
        await self._end_sessions_over_cap(tx, user.id, session_id, client)
        await self.events.record(
            tx,
            EventKind.LOGIN_SUCCEEDED,
            user_id=user.id,
            session_id=session_id,
            client=client,
            details={"amr": " ".join(amr)},
        )
        if history is not None and history["signed_in_before"] and not history["known"]:
            # Not the account's first session, and not a device and network seen lately.
            await self.notices.send(tx, email=user.email, template="new_device", client=client)
        return self.issue(user, session_id, amr, refresh, client)

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
        """Past MAX_SESSIONS_PER_USER live sessions, the oldest end (the new one counts).
        Sign-ins of one user in parallel each see the others' sessions only once
        committed, so the cap can be passed by as many as race; the next one trims."""
        now = self.clock.now()
        over = await tx.scalars(
            _SESSIONS_OVER_CAP,
            {"uid": user_id, "new_id": new_id, "now": now, "keep": self.max_sessions - 1},
        )
        for session_id in over:
            await tx.execute(
                _REVOKE_SESSION,
                {"session_id": session_id, "now": now, "reason": "session_limit"},
            )
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

    def issue(
        self,
        user: UserView,
        session_id: uuid.UUID,
        amr: list[str],
        refresh: str,
        client: ClientInfo | None = None,
    ) -> IssuedSession:
        access = self.access_tokens.issue(user_id=user.id, session_id=session_id, amr=amr)
        # The device keeps the identity its token had; a new one is named after the
        # session (so refreshing a session cannot mint device identities).
        held = self.devices.check(
            client.device_token if client else None, user_id=user.id, epoch=user.device_epoch
        )
        device_id = held.device_id if held is not None else session_id.hex
        return IssuedSession(
            access_token=access,
            refresh_token=refresh,
            expires_in=int(self.access_tokens.lifetime.total_seconds()),
            user=user,
            device_token=self.devices.issue(user.id, user.device_epoch, device_id),
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
                raise _account_disabled()
            session_id = state["session_id"]
            successor = successor_token(self._refresh_key, refresh_token)
            if state["rotated_at"] is None:
                # Only a rotation spends the session's budget (answers to a retry inside
                # the reuse interval do not); rotations of one session are serialised by
                # the lock held here, so the check and the count cannot interleave.
                await self.limiter.hit("refresh_session", str(session_id))
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
                await tx.execute(
                    _TOUCH_SESSION,
                    {
                        "session_id": session_id,
                        "now": now,
                        "expires_at": self.session_end(now, state["absolute_expires_at"]),
                    },
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
        user = user_view(state, id_key="user_id")
        return self.issue(user, session_id, state["amr"].split(), successor)

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
                tx, found["user_id"], now=now, reason="logout_everywhere"
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

    async def current_user(self, claims: AccessClaims) -> UserView | None:
        """The user of a live session, or None when the session has ended or the account
        is disabled: a revoked session's access tokens stop working at once."""
        async with self.statements.connection() as conn:
            row = await conn.first(
                _CURRENT_USER,
                {"sid": claims.session_id, "uid": claims.user_id, "now": self.clock.now()},
            )
        return None if row is None else user_view(row)


# -- one account's locks and mass endings: the sign-in paths and `strawgate users` ---------


async def lock_account(
    tx: Runner, user_id: uuid.UUID, *, exclusive: bool
) -> Mapping[str, Any] | None:
    """The account's row, locked (see _LOCK_USER): first in every such transaction."""
    return await tx.first(_LOCK_USER if exclusive else _SHARE_USER, {"uid": user_id})


async def lock_account_sessions(tx: Runner, user_id: uuid.UUID) -> None:
    """Every live session of the account, locked in one order (by id); after its row."""
    await tx.execute(_LOCK_USER_SESSIONS, {"user_id": user_id})


async def end_live_sessions(tx: Runner, user_id: uuid.UUID, *, now: datetime, reason: str) -> int:
    """Ends every live session of the account; how many. Under both locks above."""
    return await tx.execute(
        _REVOKE_USER_SESSIONS, {"owner_id": user_id, "now": now, "reason": reason}
    )


async def end_device_tokens(tx: Runner, user_id: uuid.UUID) -> None:
    """Every device token of the account stops working (they carry the epoch)."""
    await tx.execute(_BUMP_DEVICE_EPOCH, {"owner_id": user_id})


def _is_live(session: Mapping[str, Any], now: datetime) -> bool:
    return session["revoked_at"] is None and session["expires_at"] > now


def _email_taken() -> AuthFailure:
    return AuthFailure(
        ErrorCode.EMAIL_TAKEN, "An account with this email address already exists.", field="email"
    )


def _invalid_credentials() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS_MESSAGE)


def _account_disabled() -> AuthFailure:
    return AuthFailure(ErrorCode.ACCOUNT_DISABLED, "This account is disabled.")


def _invalid_token() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_TOKEN, "This token is invalid or has expired.")
