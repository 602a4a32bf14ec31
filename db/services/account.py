"""The account's own flows by emailed codes and the signed-in user's password and
sessions: requestEmailVerification, requestLoginCode, requestPasswordReset, resendOtp,
resetPassword, changePassword, sessions, revokeSession."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, select, update

from db.errors import AuthFailure, ErrorCode, invalid_challenge, invalid_input
from db.mail.render import MAIL_LANGUAGES
from db.models import TotpCredential, User, UserRole, UserSession
from db.security.access import AccessClaims
from db.security.limiter import client_key
from db.security.tokens import new_opaque_token
from db.services import challenges as ch
from db.services.auth import AuthService
from db.services.events import EventKind
from db.services.sessions import LIVE_SESSION
from db.services.signin.conclusion import Intent
from db.services.types import (
    AMR_EMAIL_CODE,
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    SessionView,
    UserView,
    merge_amr,
)
from db.validation import (
    check_new_password,
    normalize_password,
    parse_email,
    parse_locale,
    parse_profile,
)

# A user's sessions, as listed: more than any real user has.
MAX_LISTED_SESSIONS = 500

# An account by its normalized address, with its two-factor state (confirmed, or
# pending since).
ACCOUNT_BY_EMAIL = (
    select(
        User.id,
        User.email,
        User.is_active,
        User.email_verified_at,
        User.created_at,
        TotpCredential.confirmed_at.label("otp_confirmed_at"),
        TotpCredential.created_at.label("otp_created_at"),
    )
    .outerjoin(TotpCredential, TotpCredential.user_id == User.id)
    .where(User.email_normalized == bindparam("email"))
)

_LIVE_SESSIONS = (
    select(
        UserSession.id,
        UserSession.created_at,
        UserSession.last_used_at,
        UserSession.user_agent,
        UserSession.ip,
    )
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .order_by(UserSession.created_at.desc(), UserSession.id.desc())
    .limit(MAX_LISTED_SESSIONS)
)

_REVOKE_OWN_SESSION = (
    update(UserSession)
    .where(
        UserSession.id == bindparam("session_id"),
        UserSession.user_id == bindparam("owner_id"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
    )
    .values(revoked_at=bindparam("now"), revoke_reason="revoked_by_user")
)


_PROFILE_OF = select(User.profile_json, User.locale).where(User.id == bindparam("uid"))
_SET_PROFILE = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(
        profile_json=bindparam("profile_json"),
        updated_at=bindparam("now"),
    )
)
_SET_LOCALE = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(locale=bindparam("locale"), updated_at=bindparam("now"))
)
_ROLES_OF = (
    select(UserRole.role).where(UserRole.user_id == bindparam("uid")).order_by(UserRole.role)
)


class AccountService:
    def __init__(self, *, auth: AuthService) -> None:
        self.auth = auth
        self.statements = auth.statements
        self.challenges = auth.challenges
        self.clock = auth.clock
        self.hasher = auth.hasher
        self.limiter = auth.limiter
        self.events = auth.events

    async def roles(self, user_id: uuid.UUID) -> list[str]:
        """The roles operators granted the user, sorted (User.roles: what the user's next
        access token carries)."""
        async with self.statements.connection() as conn:
            return [str(role) for role in await conn.scalars(_ROLES_OF, {"uid": user_id})]

    async def profile(self, user_id: uuid.UUID) -> tuple[str, str | None]:
        """The user's profile (JSON object text, "{}" when empty) and locale (None: the
        server's default)."""
        async with self.statements.connection() as conn:
            row = await conn.first(_PROFILE_OF, {"uid": user_id})
        if row is None:
            return "{}", None
        return row["profile_json"] or "{}", row["locale"]

    async def update_profile(
        self, *, user: UserView, profile_json: str | None, locale: str | None
    ) -> None:
        """updateProfile: replaces the profile (a JSON object, at most 4 KiB, no control
        characters) and sets the locale (one of the mails' languages; "" clears it); None
        leaves either as it is. Nothing is changed unless both are valid."""
        await self.limiter.hit("update_profile_account", str(user.id))
        stored = parse_profile(profile_json) if profile_json is not None else None
        tag = None
        if locale is not None and locale != "":
            tag = parse_locale(locale, MAIL_LANGUAGES)
        now = self.clock.now()
        async with self.statements.transaction() as tx:
            if stored is not None:
                await tx.execute(_SET_PROFILE, {"uid": user.id, "profile_json": stored, "now": now})
            if locale is not None:
                await tx.execute(_SET_LOCALE, {"uid": user.id, "locale": tag, "now": now})

    # -- codes by mail ----------------------------------------------------------------------

    async def request_code(
        self, *, email: str, purpose: str, client: ClientInfo
    ) -> IssuedChallenge:
        """An emailed sign-in or reset code. The answer has the same shape, expiry and
        work behind it whether or not the address is registered; only an active account
        gets mail."""
        limit = "request_login_code_ip" if purpose == ch.LOGIN else "request_password_reset_ip"
        await self.limiter.hit(limit, client_key(client.ip))
        address = parse_email(email)
        async with self.statements.connection() as conn:
            account = await conn.first(ACCOUNT_BY_EMAIL, {"email": address.normalized})
        recipient = account if account is not None and account["is_active"] else None
        async with self.events.transaction(self.statements) as tx:
            issued = await self.challenges.open_email(
                tx,
                purpose=purpose,
                user=recipient,
                address=address.normalized,
                amr=[],
                client=client,
            )
        self.auth.outbox.wake()
        return issued

    async def request_email_verification(
        self, *, user: UserView, claims: AccessClaims, client: ClientInfo
    ) -> IssuedChallenge:
        await self.limiter.hit("request_email_verification_ip", client_key(client.ip))
        if user.email_verified:
            raise invalid_input("This email address is already verified.")
        async with self.events.transaction(self.statements) as tx:
            issued = await self.challenges.open_email(
                tx,
                purpose=ch.VERIFY_EMAIL,
                user={"id": user.id, "email": user.email},
                address=parse_email(user.email).normalized,
                amr=list(claims.amr),
                client=client,
            )
        self.auth.outbox.wake()
        return issued

    async def resend(self, *, challenge_token: str, client: ClientInfo) -> IssuedChallenge:
        await self.limiter.hit("resend_otp_ip", client_key(client.ip))
        return await self.challenges.resend(challenge_token, client=client)

    # -- passwords --------------------------------------------------------------------------

    async def reset_password(
        self, *, challenge_token: str, code: str, new_password: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Sets a new password with an emailed reset code. With two-factor on, the new
        password waits (as a hash) for a TOTP step: a mailbox alone never takes over an
        account."""
        self.hasher.check_capacity()
        await self.limiter.hit("reset_password_ip", client_key(client.ip))
        await self.auth.limit_code_checks(challenge_token, client)
        new_password = normalize_password(new_password)
        # The policy first: a weak password costs no attempt and keeps the code usable.
        check_new_password(
            new_password, min_length=self.auth.password_min_length, field="newPassword"
        )
        challenge = await self.challenges.take_attempt(ch.TAKE_FOR_RESET, challenge_token)
        async with self.auth.recording_wrong_codes(challenge, client, step="reset"):
            check = await self.auth.emailed_code_check(challenge, code, client)
        user_id = challenge["user_id"]
        try:
            new_hash = await self.hasher.hash(new_password)
        except BaseException:
            await self.auth.unspent(check)
            raise
        amr = merge_amr(challenge["amr"].split(), AMR_EMAIL_CODE)
        async with self.auth.spending(check) as tx:
            # The account's lock first (see AuthService.lock_user), then the challenge.
            await self.auth.lock_user(tx, user_id, exclusive=True)
            if not await self.challenges.consume(tx, challenge["id"]):
                raise invalid_challenge()
            # With two-factor on, the new password waits (as a hash) for the TOTP step.
            issued = await self.auth.conclude(
                tx,
                user_id,
                amr=amr,
                client=client,
                intent=Intent(purpose=ch.RESET_PASSWORD, new_password_hash=new_hash),
            )
        self.auth.outbox.wake()
        return issued

    async def change_password(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        current_password: str | None,
        new_password: str,
        client: ClientInfo,
    ) -> IssuedSession:
        """Needs the current password, or a recent sign-in on this session (that is how
        an account without a password sets its first). Keeps this session (with a new
        refresh token: the old one is spent, not reused), ends every other one and every
        device token but this client's, and tells the owner."""
        self.hasher.check_capacity()
        await self.limiter.hit("change_password_ip", client_key(client.ip))
        await self.limiter.hit("change_password_account", str(user.id))
        new_password = normalize_password(new_password)
        checked_at = await self.auth.check_current_password(
            user=user,
            claims=claims,
            password=current_password,
            client=client,
            failure=_wrong_password,
        )
        check_new_password(
            new_password, min_length=self.auth.password_min_length, field="newPassword"
        )
        if current_password and hmac.compare_digest(
            new_password.encode(), normalize_password(current_password).encode()
        ):
            raise AuthFailure(
                ErrorCode.WEAK_PASSWORD,
                "Choose a password different from the current one.",
                field="newPassword",
            )
        new_hash = await self.hasher.hash(new_password)
        now = self.clock.now()
        refresh = new_opaque_token()
        async with self.events.transaction(self.statements) as tx:
            # The account's lock first (see AuthService.lock_user): two changes from two
            # sessions at once, or a change and a reset, queue up instead of deadlocking,
            # and a sign-in that checked the old password opens no session after this.
            await self.auth.lock_user(tx, user.id, exclusive=True)
            session = await tx.first(LIVE_SESSION, {"session_id": claims.session_id, "now": now})
            if session is None:
                raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
            changed = await self.auth.change_password_now(
                tx,
                user=user,
                session_id=claims.session_id,
                checked_at=checked_at,
                new_hash=new_hash,
                client=client,
            )
            if changed is None:
                raise _wrong_password()
            await self.auth.replace_refresh_token(tx, claims.session_id, refresh, now)
            issued = await self.auth.issue(
                changed,
                claims.session_id,
                session["amr"].split(),
                refresh,
                client,
                auth_time=session["auth_time"],
                reason="refresh",
            )
        self.auth.outbox.wake()
        return issued

    async def disable_totp(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        password: str | None,
        code: str,
        client: ClientInfo,
    ) -> None:
        """Turns two-factor off: needs the current password (or a recent sign-in on this
        session) and a current TOTP or recovery code."""
        two_factor = self.auth.two_factor
        await two_factor.limit("disable_totp_ip", user.id, client)
        credential = await two_factor.confirmed(user.id)
        await self.auth.check_current_password(
            user=user, claims=claims, password=password, client=client, failure=_wrong_password
        )
        await two_factor.disable(
            user_id=user.id,
            email=user.email,
            code=code,
            credential=credential,
            budget=await self.auth.trust.budget_of(client, user.id, not_session=claims.session_id),
            client=client,
        )

    # -- sessions ---------------------------------------------------------------------------

    async def sessions(self, *, user: UserView, claims: AccessClaims) -> list[SessionView]:
        async with self.statements.connection() as conn:
            rows = await conn.all(_LIVE_SESSIONS, {"uid": user.id, "now": self.clock.now()})
        return [_session_view(row, claims.session_id) for row in rows]

    async def revoke_session(
        self, *, user: UserView, session_id: str, client: ClientInfo | None = None
    ) -> int:
        """Ends one of the user's own sessions; another user's id (or nonsense) ends
        nothing and says nothing."""
        try:
            target = uuid.UUID(session_id)
        except ValueError:
            return 0
        async with self.events.transaction(self.statements) as tx:
            revoked = await tx.execute(
                _REVOKE_OWN_SESSION,
                {"session_id": target, "owner_id": user.id, "now": self.clock.now()},
            )
            if revoked:
                await self.events.record(
                    tx, EventKind.SESSION_REVOKED, user_id=user.id, session_id=target, client=client
                )
            return revoked


def _session_view(row: Mapping[str, Any], current: uuid.UUID) -> SessionView:
    return SessionView(
        id=row["id"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        user_agent=row["user_agent"],
        ip=row["ip"],
        current=row["id"] == current,
    )


def _wrong_password() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_CREDENTIALS, "The current password is incorrect.", field="currentPassword"
    )
