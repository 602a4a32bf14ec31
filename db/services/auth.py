"""Signup, login, refresh-token rotation, logout and the per-request session check.

These services open their own transactions rather than taking one from the caller:
a password hash (tens of milliseconds in a worker thread) sits between reading the user
and writing the session, and no database connection is held across it. They run fixed
Core statements through `Statements` (see db/session.py): this is the request path of
every client, and ORM units of work cost more here than the queries.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, insert, select, true, update

from db.clock import Clock
from db.devices import network_of
from db.errors import (
    AuthFailure,
    ErrorCode,
    UniqueViolation,
    account_disabled,
    email_taken,
    invalid_challenge,
    invalid_input,
    invalid_otp,
)
from db.mail.outbox import Outbox
from db.models import (
    RecoveryCode,
    User,
    UserSession,
)
from db.security.access import AccessClaims, AccessTokenCodec
from db.security.device import DeviceTokens, device_budget
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher
from db.security.tokens import (
    new_opaque_token,
    token_digest,
)
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.device_trust import DeviceTrust
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import (
    CodeChecks,
    Lockout,
    address_digest,
    code_check_key,
    code_lockout_key,
)
from db.services.mfa import TwoFactor
from db.services.notices import Notices
from db.services.sessions import (
    HAS_PASSWORD,
    LOCK_LIVE_SESSION,
    OTP_CONFIRMED,
    WITH_TOTP,
    Sessions,
    end_device_tokens,
)
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
_USER_BY_ID = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        User.device_epoch,
        OTP_CONFIRMED,
        HAS_PASSWORD,
    )
    .outerjoin(*WITH_TOTP)
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

# A new password; password_changed_at is what sign-ins in flight re-check. On a change,
# only over the password as it was when checked (a concurrent change wins, not both), and
# every device token ends (the asking session's client gets a new one); on a reset,
# unconditionally, and the address counts as verified.
_NEW_PASSWORD: dict[str, Any] = {
    "password_hash": bindparam("new_hash"),
    "password_changed_at": bindparam("now"),
    "updated_at": bindparam("now"),
}
_CHANGE_PASSWORD = (
    update(User)
    .where(
        User.id == bindparam("uid"),
        User.password_changed_at.is_not_distinct_from(bindparam("checked_at")),
    )
    .values(**_NEW_PASSWORD, device_epoch=User.device_epoch + 1)
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
# password was set by whoever signed up with the address, who may not be its owner. The
# account goes on without one.
_DISCARD_PASSWORD = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(password_hash=None, password_changed_at=bindparam("now"), updated_at=bindparam("now"))
)

_LOCK_OWN_LIVE_SESSION = LOCK_LIVE_SESSION.where(UserSession.user_id == bindparam("uid"))
# A credential proven again on the session (reauthenticate).
_REAUTHENTICATED = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(auth_time=bindparam("now"), last_used_at=bindparam("now"), amr=bindparam("amr"))
)

_UNUSED_RECOVERY_CODES = select(func.count(RecoveryCode.id)).where(
    RecoveryCode.user_id == bindparam("uid"), RecoveryCode.used_at.is_(None)
)


@dataclass(frozen=True, slots=True)
class Intent:
    """What a proven credential is for: a sign-in (a new session), a password reset (set
    the new password, then a new session), or a step-up of a live session."""

    purpose: str = ch.LOGIN
    # REAUTHENTICATE: the session whose auth_time is renewed.
    session_id: uuid.UUID | None = None
    # RESET_PASSWORD: the new password's hash, set once every factor is proven.
    new_password_hash: str | None = None


SIGN_IN = Intent()


def step_up(session_id: uuid.UUID) -> Intent:
    return Intent(purpose=ch.REAUTHENTICATE, session_id=session_id)


@dataclass(frozen=True, slots=True)
class CodeCheck:
    """A right emailed code, not spent yet: its wrong-code check (per account and client)
    and its reservation with the address's code lockout (None for a device token's
    holder), settled by the transaction that spends it (see AuthService.spending)."""

    key: str
    lock: str | None


@dataclass(frozen=True, slots=True)
class ProvenPassword:
    """A password checked against an account: its replacement hash, if it wants one, and
    the address whose lockout holds the check's reservation (None for a device token's
    holder), cleared by the transaction that acts on it (see AuthService.acting)."""

    new_hash: str | None
    reserved: str | None


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
        trust: DeviceTrust,
        lockout: Lockout,
        code_lockout: Lockout,
        code_checks: CodeChecks,
        limiter: RateLimiter,
        events: SecurityEvents,
        idle_timeout: timedelta = timedelta(0),
        max_sessions: int = 50,
        reauth_window: timedelta = timedelta(minutes=10),
    ) -> None:
        self.events = events
        self.devices = devices
        self.trust = trust
        self.lockout = lockout
        self.code_lockout = code_lockout
        self.code_checks = code_checks
        self.limiter = limiter
        self.statements = statements
        self.hasher = hasher
        self.access_tokens = access_tokens
        self.clock = clock
        self.password_min_length = password_min_length
        self.two_factor = two_factor
        self.challenges = challenges
        self.outbox = outbox
        self.notices = notices
        self.require_email_verification = require_email_verification
        self.sessions = Sessions(
            statements=statements,
            access_tokens=access_tokens,
            refresh_key=refresh_key,
            clock=clock,
            refresh_lifetime=refresh_lifetime,
            reuse_interval=reuse_interval,
            devices=devices,
            limiter=limiter,
            events=events,
            notices=notices,
            idle_timeout=idle_timeout,
            max_sessions=max_sessions,
            reauth_window=reauth_window,
        )

        # What the resolvers and the other services call, by the names they know.
        self.is_recent = self.sessions.is_recent
        self.require_recent = self.sessions.require_recent
        self.lock_user = self.sessions.lock_user
        self.lock_sessions = self.sessions.lock_sessions
        self.open_session = self.sessions.open_session
        self.replace_refresh_token = self.sessions.replace_refresh_token
        self.issue = self.sessions.issue
        self.refresh = self.sessions.refresh
        self.logout = self.sessions.logout
        self.decode_access_token = self.sessions.decode_access_token
        self.current_user = self.sessions.current_user

    # -- after a proven credential: the one place ---------------------------------------

    async def conclude(
        self,
        tx: Runner,
        user_id: uuid.UUID,
        *,
        amr: list[str],
        client: ClientInfo,
        intent: Intent = SIGN_IN,
        verify_address: bool = False,
    ) -> IssuedSession | IssuedChallenge:
        """What follows a proven credential, whichever way in proved it (password, emailed
        code, TOTP or recovery code): refuse a disabled account; ask for the address to be
        proven (`verify_address`: a password sign-in, where verification is required);
        ask for the TOTP step where two-factor is on and `amr` has no second factor; else
        act on the intent: reset the password, renew a session (step-up) or open one.
        The caller holds the account's lock (lock_user) in `tx`."""
        user = await tx.first(_USER_BY_ID, {"user_id": user_id})
        if user is None:
            raise invalid_challenge()
        if not user["is_active"]:
            raise account_disabled()
        if verify_address and self.require_email_verification and user["email_verified_at"] is None:
            # The address is proven first: a fresh code goes to it (its mail budget allowing).
            return await self.challenges.open_email(
                tx,
                purpose=ch.VERIFY_EMAIL,
                user=user,
                address=parse_email(user["email"]).normalized,
                amr=amr,
                client=client,
            )
        if user["otp_confirmed_at"] is not None and "mfa" not in amr:
            # One factor never signs in to, resets or steps up an account with two-factor on.
            return await self.challenges.open_totp(
                tx,
                user_id=user_id,
                purpose=intent.purpose,
                amr=amr,
                client=client,
                pending_password_hash=intent.new_password_hash,
                session_id=intent.session_id,
            )
        if intent.new_password_hash is not None:
            user = await self.reset_password_now(
                tx, user_id=user_id, new_hash=intent.new_password_hash, client=client
            )
        if intent.session_id is not None:
            return await self._renew(tx, user, intent.session_id, amr, client)
        return await self.sessions.open_session(tx, user_view(user), amr=amr, client=client)

    async def _renew(
        self,
        tx: Runner,
        user: Mapping[str, Any],
        session_id: uuid.UUID,
        amr: list[str],
        client: ClientInfo,
    ) -> IssuedSession:
        """Step-up: the session, still live, gets a fresh auth_time and new tokens (the
        old refresh token stops working without counting as reuse)."""
        now = self.clock.now()
        session = await tx.first(
            _LOCK_OWN_LIVE_SESSION, {"session_id": session_id, "uid": user["id"], "now": now}
        )
        if session is None:
            raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
        merged = merge_amr(session["amr"].split(), amr)
        await tx.execute(
            _REAUTHENTICATED, {"session_id": session_id, "now": now, "amr": " ".join(merged)}
        )
        refresh = new_opaque_token()
        await self.sessions.replace_refresh_token(tx, session_id, refresh, now)
        await self.events.record(
            tx,
            EventKind.REAUTHENTICATED,
            user_id=user["id"],
            session_id=session_id,
            client=client,
            details={"amr": " ".join(amr)},
        )
        return self.sessions.issue(
            user_view(user), session_id, merged, refresh, client, auth_time=now
        )

    async def reauthenticate(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        password: str | None,
        email_code: bool,
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """Step-up on this session: the password (its wrong attempts count as a login's),
        or with none, a code mailed to the address; then the TOTP step where two-factor
        is on. Answers this session re-issued with a fresh auth_time, or the challenge."""
        address = parse_email(user.email).normalized
        if password is None:
            if not email_code:
                raise invalid_input(
                    "Give your password, or ask for a code by mail (emailCode: true).",
                    field="password",
                )
            await self.limiter.hit("request_login_code_ip", client_key(client.ip))
            async with self.events.transaction(self.statements) as tx:
                issued: IssuedSession | IssuedChallenge = await self.challenges.open_email(
                    tx,
                    purpose=ch.REAUTHENTICATE,
                    user={"id": user.id, "email": user.email},
                    address=address,
                    amr=[],
                    client=client,
                    session_id=claims.session_id,
                )
            self.outbox.wake()
            return issued
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
            issued = await self.conclude(
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

    # -- signup and login -------------------------------------------------------------

    async def signup(
        self, *, email: str, password: str | None, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Create an account. With email verification required, or without a password,
        answer the challenge of the code mailed to the address (the account gets no
        session before it is verified); otherwise sign it in at once. An account without
        a password signs in by emailed code."""
        self.hasher.check_capacity()  # when overloaded, refuse before doing any work
        await self.limiter.hit("signup_ip", client_key(client.ip))
        address = parse_email(email)
        if password is not None:
            password = normalize_password(password)
            check_new_password(password, min_length=self.password_min_length)
        async with self.statements.connection() as conn:
            existing = await conn.first(ADDRESS_HOLDER, {"email": address.normalized})
        # Only a verified registration is revealed (or any, without verification).
        if existing is not None and (
            existing["email_verified_at"] is not None or not self.require_email_verification
        ):
            raise email_taken()
        password_hash = await self.hasher.hash(password) if password is not None else None
        # Without a password, the address is the credential: it is proven first, always.
        verify_first = self.require_email_verification or password_hash is None
        amr = AMR_PASSWORD if password_hash is not None else []
        now = self.clock.now()
        user = {
            "id": uuid.uuid4(),
            "email": address.address,
            "email_verified_at": None,
            "created_at": now,
            "has_password": password_hash is not None,
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
                        return await self._pending_signup(tx, address.normalized, amr, client)
                # The unique index decides between concurrent signups; the check above
                # only spares a hash in the common case.
                await tx.execute(_ADD_USER, add_user)
                await self.events.record(
                    tx, EventKind.SIGNUP, user_id=add_user["user_id"], client=client
                )
                if verify_first:
                    issued: IssuedSession | IssuedChallenge = await self.challenges.open_email(
                        tx,
                        purpose=ch.VERIFY_EMAIL,
                        user=user,
                        address=address.normalized,
                        amr=amr,
                        client=client,
                    )
                else:
                    issued = await self.sessions.open_session(
                        tx, user_view(user), amr=amr, client=client
                    )
        except UniqueViolation:
            if not self.require_email_verification:
                raise email_taken() from None
            async with self.events.transaction(self.statements) as tx:
                return await self._pending_signup(tx, address.normalized, amr, client)
        self.outbox.wake()
        return issued

    async def _pending_signup(
        self, tx: Runner, address: str, amr: list[str], client: ClientInfo
    ) -> IssuedChallenge:
        return await self.challenges.open_email(
            tx, purpose=ch.VERIFY_EMAIL, user=None, address=address, amr=amr, client=client
        )

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
            issued = await self.conclude(
                tx, user["id"], amr=AMR_PASSWORD, client=client, verify_address=True
            )
        await self._after_password(user, proven)
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
        emailed sign-in, verification, change-of-address or step-up code. An emailed
        reset code is not taken here. A wrong code costs the same whether or not the
        address has an account."""
        await self.limiter.hit("verify_otp_ip", client_key(client.ip))
        await self.limit_code_checks(challenge_token, client)
        challenge = await self.challenges.take_attempt(ch.TAKE_FOR_VERIFY_OTP, challenge_token)
        async with self.recording_wrong_codes(challenge, client, step=challenge["method"].lower()):
            return await self._complete(challenge, code, client)

    @contextlib.asynccontextmanager
    async def recording_wrong_codes(
        self, challenge: Mapping[str, Any], client: ClientInfo, *, step: str
    ) -> AsyncIterator[None]:
        """A wrong code checked in the block (INVALID_OTP) is recorded as a failed
        sign-in, for an unknown address too (as a wrong password is): the same write
        either way, so the time of a wrong code tells nothing."""
        try:
            yield
        except AuthFailure as failure:
            if failure.code is ErrorCode.INVALID_OTP:
                await self.events.record_now(
                    self.statements,
                    EventKind.LOGIN_FAILED,
                    user_id=challenge["user_id"],
                    client=client,
                    email=challenge["email"],
                    details={"step": step},
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
        intent = Intent(
            purpose=challenge["purpose"],
            session_id=challenge["session_id"],
            new_password_hash=challenge["pending_password_hash"],
        )
        issued: list[IssuedSession | IssuedChallenge] = []

        async def lock(tx: Runner) -> None:
            # First in the transaction that spends the code (see _LOCK_USER).
            await self.sessions.lock_user(
                tx, user_id, exclusive=intent.new_password_hash is not None
            )

        async def claim(tx: Runner, method: str) -> bool:
            # In the transaction that spends the code: of two requests racing on one
            # challenge, the loser's code stays unspent; and the session is made there
            # too, so a password change cannot slip in between.
            if not await self.challenges.consume(tx, challenge["id"]):
                return False
            if method == "recovery":
                await self._recovery_code_used(tx, user_id, client)
            amr = merge_amr(
                challenge["amr"].split(), AMR_TOTP if method == "totp" else AMR_RECOVERY_CODE
            )
            issued.append(await self.conclude(tx, user_id, amr=amr, client=client, intent=intent))
            return True

        await self.two_factor.check_code(
            user_id=user_id,
            code=code,
            recovery=True,
            claim=claim,
            lock=lock,
            client=await self.trust.budget_of(client, user_id, not_session=challenge["session_id"]),
        )
        self.outbox.wake()
        return issued[0]

    async def limit_code_checks(self, challenge_token: str, client: ClientInfo) -> None:
        """Wrong-code budgets count per challenge and per client: another client's
        guesses never use up this one's."""
        digest = token_digest(challenge_token).hex()[:32] if challenge_token else "-"
        budget = self.devices.budget_key(client.ip, client.device_token)
        await self.limiter.hit("verify_otp_challenge", f"{digest}:{budget}")

    async def emailed_code_check(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> CodeCheck:
        """Checks an emailed code as every way in by emailed code does, the same for an
        unknown address as for an account. Before the comparison, the check is reserved
        with a code lockout (refused while locked; CODE_LOCKOUT_THRESHOLD, then one per
        lock period): a device token's own, else the address's, which every other client
        shares (guesses from many networks together get nowhere), except for a code the
        account's own client asked for; and every client takes one of its own wrong-code
        checks for the account (10 in 15 minutes, across challenges).
        INVALID_OTP when the code is not the challenge's (counted); a right one is
        settled by the transaction that spends it (`spending`)."""
        user_id, address = challenge["user_id"], challenge["email"]
        device = None
        if user_id is not None:
            # A challenge bound to a session (a step-up, a change of address): that
            # session's own device token proves nothing its holder does not hold.
            device = await self.trust.device_of(
                client, user_id, not_session=challenge["session_id"]
            )
        if user_id is not None:
            account = str(user_id)
        elif address is not None:
            account = f"addr:{address_digest(address)}"
        else:  # pragma: no cover - a challenge from before the address was kept
            account = f"challenge:{challenge['id']}"
        key = code_check_key(account, device_budget(device) if device else client_key(client.ip))
        # Whose code lockout holds the check: a device token's own; for a code the
        # account's own client asked for, the address's on this network only (strangers
        # elsewhere cannot hold it shut); else the address's, which strangers share. The
        # same work each way (and for an unknown address).
        lock: str | None = None
        if device is not None:
            lock = f"code:{device_budget(device)}"
        elif address is not None:
            lock = code_lockout_key(address)
            if challenge["owner_client"]:
                lock = f"{lock}:{network_of(client.ip)}"
        if lock is not None:
            await self.code_lockout.reserve(lock)
        try:
            await self.code_checks.reserve(key)
        except BaseException:
            if lock is not None:
                await self.code_lockout.give_back(lock)
            raise
        if not self.challenges.email_code_matches(challenge, code):
            if lock is not None:
                until = await self.code_lockout.failed(lock)
                if until is not None:
                    await self.events.record_now(
                        self.statements,
                        EventKind.LOCKED_OUT,
                        user_id=user_id,
                        client=client,
                        email=address,
                        details={"until": until.isoformat(), "step": "email"},
                    )
            raise invalid_otp()
        return CodeCheck(key=key, lock=lock)

    @contextlib.asynccontextmanager
    async def spending(self, check: CodeCheck) -> AsyncIterator[Runner]:
        """The transaction that spends a right emailed code: its checks are settled as no
        failure (the address's code lockout cleared). Where it fails, they are given
        back: a right code is never counted as a wrong one."""
        try:
            async with self.events.transaction(self.statements) as tx:
                yield tx
                # Last: the account's lock comes first in every transaction (_LOCK_USER).
                await self.code_checks.give_back(tx, check.key)
                if check.lock is not None:
                    await self.code_lockout.succeeded(tx, check.lock)
        except BaseException:
            await self.unspent(check)
            raise

    async def unspent(self, check: CodeCheck) -> None:
        """A right code that was not spent after all: its checks are given back."""
        if check.lock is not None:
            await self.code_lockout.give_back(check.lock)
        async with self.statements.transaction() as tx:
            await self.code_checks.give_back(tx, check.key)

    async def _complete_emailed_code(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        check = await self.emailed_code_check(challenge, code, client)
        amr = merge_amr(challenge["amr"].split(), AMR_EMAIL_CODE)
        try:
            return await self._complete_emailed_code_now(challenge, amr, client, check)
        except UniqueViolation as violation:
            if "email" not in str(violation):
                raise
            # Another account took the new address between the check and the change.
            raise email_taken() from None

    async def _complete_emailed_code_now(
        self, challenge: Mapping[str, Any], amr: list[str], client: ClientInfo, check: CodeCheck
    ) -> IssuedSession | IssuedChallenge:
        async with self.spending(check) as tx:
            await self.sessions.lock_user(tx, challenge["user_id"], exclusive=True)
            user = await tx.first(_USER_BY_ID, {"user_id": challenge["user_id"]})
            if user is None:
                raise invalid_challenge()
            if not user["is_active"]:
                raise account_disabled()
            now = self.clock.now()
            asking = None
            if challenge["purpose"] == ch.CHANGE_EMAIL:
                # Only while the session that asked (with the password) is still live: a
                # logout, a revocation or a password change since then ends the request.
                # Locked (after the user row, as everywhere): a refresh of it waits, and
                # its refresh tokens are replaced below.
                asking = await tx.first(
                    LOCK_LIVE_SESSION, {"session_id": challenge["session_id"], "now": now}
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
                await self.sessions.replace_refresh_token(tx, challenge["session_id"], refresh, now)
                issued: IssuedSession | IssuedChallenge = self.sessions.issue(
                    user_view(user),
                    challenge["session_id"],
                    asking["amr"].split(),
                    refresh,
                    client,
                    auth_time=asking["auth_time"],
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
        """A verification, sign-in or step-up code: the address is proven, and the
        account signs in, or the asking session steps up (after a TOTP step where
        two-factor is on)."""
        now = self.clock.now()
        if challenge["purpose"] == ch.LOGIN and user["email_verified_at"] is None:
            await self._distrust_password(tx, user["id"])
        # A code that reached the mailbox proves the address (sign-in codes too).
        await tx.execute(_MARK_VERIFIED, {"uid": user["id"], "now": now})
        if user["email_verified_at"] is None:
            await self.events.record(
                tx, EventKind.EMAIL_VERIFIED, user_id=user["id"], client=client
            )
        intent = SIGN_IN
        if challenge["purpose"] == ch.REAUTHENTICATE:
            intent = step_up(challenge["session_id"])
        return await self.conclude(tx, user["id"], amr=amr, client=client, intent=intent)

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
                raise email_taken()
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
            user_id=user["id"],
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
        That password stops working (the account goes on without one: the owner may set
        one with changePassword or requestPasswordReset), and whatever it opened ends."""
        await tx.execute(_DISCARD_PASSWORD, {"uid": user_id, "now": self.clock.now()})
        await end_device_tokens(tx, user_id)  # ended sessions' tokens too (logged out)
        await self.sessions.end_sessions(tx, user_id, keep=None, reason="unproven_password")
        await self.challenges.void_all(tx, user_id)

    async def _recovery_code_used(self, tx: Runner, user_id: uuid.UUID, client: ClientInfo) -> None:
        user = await tx.first(_USER_BY_ID, {"user_id": user_id})
        remaining = await tx.scalars(_UNUSED_RECOVERY_CODES, {"uid": user_id})
        if user is not None:
            await self.notices.send(
                tx,
                user_id=user_id,
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
            raise account_disabled()
        now = self.clock.now()
        await tx.execute(_RESET_PASSWORD, {"uid": user_id, "new_hash": new_hash, "now": now})
        await self.sessions.end_sessions(tx, user_id, keep=None, reason="password_reset")
        await self.challenges.void_all(tx, user_id)
        await self.notices.send(
            tx, user_id=user_id, email=user["email"], template="password_reset", client=client
        )
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
        row = await tx.first(_USER_BY_ID, {"user_id": user.id})
        assert row is not None  # noqa: S101 - the row is locked by this transaction
        return user_view(row)


def _invalid_credentials() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS_MESSAGE)


def _wrong_password() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_CREDENTIALS, "The password is incorrect.", field="password"
    )
