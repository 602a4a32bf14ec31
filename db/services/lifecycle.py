"""The account's own lifecycle: a change of address (completed by verifyOtp, see
EmailedCodes._change_email_now in db/services/signin/emailed_code.py), an export of
everything held about the user, and the deletion of the account."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, case, delete, func, null, or_, select, update
from webauthn.helpers import bytes_to_base64url

from db.errors import AuthFailure, ErrorCode
from db.models import (
    Challenge,
    Identity,
    LoginThrottle,
    OutboxMail,
    Passkey,
    RecoveryCode,
    SecurityEvent,
    TotpCredential,
    User,
    UserRole,
    UserSession,
)
from db.security.access import AccessClaims
from db.security.limiter import client_key
from db.services import challenges as ch
from db.services.account import AccountService
from db.services.events import EventKind
from db.services.lockout import code_lockout_key
from db.services.mfa import Claim
from db.services.sessions import LIVE_SESSION
from db.services.signin.signup import ADDRESS_HOLDER
from db.services.types import AMR_PASSWORD, ClientInfo, IssuedChallenge, UserView, merge_amr
from db.session import Runner
from db.validation import parse_email

EXPORT_FORMAT = "strawgate-account-export/1"

# -- the export: every column that is not a secret, a hash or a token ------------------------

_EXPORT_USER = select(
    User.id,
    User.email,
    User.email_verified_at,
    User.is_active,
    User.created_at,
    User.updated_at,
    User.password_changed_at,
    User.profile_json,
    User.locale,
    User.signup_locale,
).where(User.id == bindparam("uid"))
_EXPORT_TOTP = select(TotpCredential.created_at, TotpCredential.confirmed_at).where(
    TotpCredential.user_id == bindparam("uid")
)
_EXPORT_RECOVERY_CODES = select(
    func.count(RecoveryCode.id).label("total"),
    func.count(RecoveryCode.used_at).label("used"),
).where(RecoveryCode.user_id == bindparam("uid"))
_EXPORT_SESSIONS = (
    select(
        UserSession.id,
        UserSession.created_at,
        UserSession.last_used_at,
        UserSession.expires_at,
        UserSession.absolute_expires_at,
        UserSession.revoked_at,
        UserSession.revoke_reason,
        UserSession.user_agent,
        UserSession.ip,
        UserSession.amr,
        UserSession.device,
        UserSession.network,
    )
    .where(UserSession.user_id == bindparam("uid"))
    .order_by(UserSession.created_at.desc(), UserSession.id.desc())
)
_EXPORT_EVENTS = (
    select(
        SecurityEvent.id,
        SecurityEvent.at,
        SecurityEvent.kind,
        SecurityEvent.session_id,
        SecurityEvent.ip,
        SecurityEvent.user_agent,
        SecurityEvent.details,
    )
    .where(SecurityEvent.user_id == bindparam("uid"))
    .order_by(SecurityEvent.id.desc())
)
_EXPORT_CHALLENGES = (
    select(
        Challenge.id,
        Challenge.purpose,
        Challenge.method,
        Challenge.created_at,
        Challenge.expires_at,
        Challenge.consumed_at,
        Challenge.attempts,
        Challenge.new_email,
        Challenge.ip,
        Challenge.user_agent,
    )
    .where(Challenge.user_id == bindparam("uid"))
    .order_by(Challenge.created_at.desc())
)
# The account's own mail: what it caused, to whichever address (never what another
# account caused at an address this one once held or asked for).
_EXPORT_MAIL = (
    select(
        OutboxMail.id,
        OutboxMail.recipient,
        OutboxMail.template,
        OutboxMail.created_at,
        OutboxMail.sent_at,
        OutboxMail.failed_at,
    )
    .where(OutboxMail.user_id == bindparam("uid"))
    .order_by(OutboxMail.created_at.desc())
)
# Passkeys without their public keys (not the user's to read back, and of no use to them).
_EXPORT_ROLES = (
    select(UserRole.role, UserRole.granted_at)
    .where(UserRole.user_id == bindparam("uid"))
    .order_by(UserRole.role)
)
_EXPORT_IDENTITIES = (
    select(
        Identity.provider,
        Identity.subject,
        Identity.email,
        Identity.name,
        Identity.created_at,
        Identity.last_used_at,
    )
    .where(Identity.user_id == bindparam("uid"))
    .order_by(Identity.created_at, Identity.id)
)
_EXPORT_PASSKEYS = (
    select(
        Passkey.id,
        Passkey.name,
        Passkey.credential_id,
        Passkey.aaguid,
        Passkey.transports,
        Passkey.attachment,
        Passkey.backup_eligible,
        Passkey.backed_up,
        Passkey.created_at,
        Passkey.last_used_at,
    )
    .where(Passkey.user_id == bindparam("uid"))
    .order_by(Passkey.created_at.desc(), Passkey.id.desc())
)
_EXPORT_THROTTLE = select(
    LoginThrottle.failures, LoginThrottle.last_failure_at, LoginThrottle.locked_until
).where(LoginThrottle.email == bindparam("email"))

# -- deletion ------------------------------------------------------------------------------

# The audit trail stays (it outlives what it mentions), with nothing left that names or
# locates the person: the random user id no longer points anywhere. The account's own
# events, and failed sign-ins at its addresses while no account held them (except at an
# address another account holds now: those are the trail of that account's address).
_ANONYMISE_EVENTS = (
    update(SecurityEvent)
    .where(
        or_(
            SecurityEvent.user_id == bindparam("uid"),
            and_(SecurityEvent.user_id.is_(None), SecurityEvent.email == bindparam("address")),
        )
    )
    .values(
        ip=None,
        user_agent=None,
        email=None,
        # An address change's details name the old address.
        details=case(
            (SecurityEvent.kind == EventKind.EMAIL_CHANGED.value, null()),
            else_=SecurityEvent.details,
        ),
    )
)
_EMAIL_CHANGES = select(SecurityEvent.details).where(
    SecurityEvent.user_id == bindparam("uid"),
    SecurityEvent.kind == EventKind.EMAIL_CHANGED.value,
)
_TWO_FACTOR_ON = select(TotpCredential.user_id).where(
    TotpCredential.user_id == bindparam("uid"), TotpCredential.confirmed_at.is_not(None)
)
_DROP_MAIL = delete(OutboxMail).where(OutboxMail.user_id == bindparam("uid"))
_DROP_THROTTLES = delete(LoginThrottle).where(
    or_(LoginThrottle.email == bindparam("email"), LoginThrottle.email.startswith(bindparam("otp")))
)
# The address's code lockouts (its own, and per network of the account's own clients).
_DROP_CODE_LOCKOUTS = delete(LoginThrottle).where(LoginThrottle.email.startswith(bindparam("key")))
_LIVE_SESSIONS = select(UserSession.id).where(
    UserSession.user_id == bindparam("uid"),
    UserSession.revoked_at.is_(None),
    UserSession.expires_at > bindparam("now"),
)
# Sessions, refresh tokens, the TOTP secret, recovery codes and challenges go with the
# row (ON DELETE CASCADE).
_DROP_USER = delete(User).where(User.id == bindparam("uid"))


class LifecycleService:
    def __init__(self, *, account: AccountService) -> None:
        self.account = account
        self.auth = account.auth
        self.statements = account.statements
        self.clock = account.clock
        self.hasher = account.hasher
        self.limiter = account.limiter
        self.events = account.events

    # -- change of address --------------------------------------------------------------------

    async def change_email(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        new_email: str,
        password: str | None,
        code: str | None = None,
        client: ClientInfo,
    ) -> IssuedChallenge:
        """Mails a code to the new address; verifyOtp with it moves the account there.
        Needs the password (a wrong one counts like a failed login) or a recent sign-in
        on this session, an address signup would take, and, where two-factor is on and
        this session signed in without it, a current TOTP or recovery code. The challenge
        is bound to this session."""
        self.hasher.check_capacity()
        await self.limiter.hit("change_email_ip", client_key(client.ip))
        await self.limiter.hit("change_email_account", str(user.id))
        try:
            address = parse_email(new_email)
        except AuthFailure as failure:
            raise AuthFailure(failure.code, failure.message, field="newEmail") from None
        password_set_at = await self._check_password(user, claims, password, client)
        if address.normalized == parse_email(user.email).normalized:
            raise AuthFailure(
                ErrorCode.INVALID_INPUT, "This is already your email address.", field="newEmail"
            )
        async with self.statements.connection() as conn:
            holder = await conn.first(ADDRESS_HOLDER, {"email": address.normalized})
        # Signup's rule: a verified registration (any, without verification) is taken;
        # an unproven one yields to whoever proves the mailbox (see _change_email_now).
        if holder is not None and (
            holder["email_verified_at"] is not None or not self.auth.require_email_verification
        ):
            raise AuthFailure(
                ErrorCode.EMAIL_TAKEN,
                "An account with this email address already exists.",
                field="newEmail",
            )
        second_factor = "mfa" in claims.amr
        if not second_factor and await self.auth.two_factor.is_on(user.id):
            await self._check_second_factor(user, claims, code, client)
            second_factor = True
        async with self.events.transaction(self.statements) as tx:
            await self._still_as_checked(tx, user, claims, password_set_at, second_factor)
            issued = await self.auth.challenges.open_email(
                tx,
                purpose=ch.CHANGE_EMAIL,
                user={"id": user.id, "email": user.email},
                address=parse_email(user.email).normalized,
                # "mfa" where a code was checked here: verifyOtp refuses a change asked
                # without a second factor once two-factor is on.
                amr=merge_amr(
                    list(claims.amr), [*AMR_PASSWORD, *(["mfa"] if second_factor else [])]
                ),
                client=client,
                new_email=address.address,
                session_id=claims.session_id,
            )
        self.auth.outbox.wake()
        return issued

    async def _check_password(
        self, user: UserView, claims: AccessClaims, password: str | None, client: ClientInfo
    ) -> datetime | None:
        """The account's password, as a sign-in checks it (lockout, budgets; a wrong one
        counts), or, omitted, a recent sign-in on this session. Returns when the password
        was set (see _still_as_checked)."""
        return await self.auth.check_current_password(
            user=user, claims=claims, password=password, client=client, failure=_wrong_password
        )

    async def _check_second_factor(
        self,
        user: UserView,
        claims: AccessClaims,
        code: str | None,
        client: ClientInfo,
        claim: Claim | None = None,
    ) -> None:
        """A current TOTP code or an unused recovery code, spent (in `claim`'s
        transaction where one is given)."""
        if not code or not code.strip():
            raise _second_factor_needed()

        async def lock(tx: Runner) -> None:
            await self.auth.lock_user(tx, user.id, exclusive=True)

        await self.auth.two_factor.check_code(
            user_id=user.id,
            code=code,
            recovery=True,
            claim=claim,
            lock=lock if claim is not None else None,
            # The asking session's own device token proves nothing beyond the session.
            client=await self.auth.trust.budget_of(client, user.id, not_session=claims.session_id),
        )

    async def _still_as_checked(
        self,
        tx: Runner,
        user: UserView,
        claims: AccessClaims,
        password_set_at: datetime | None,
        second_factor: bool,
    ) -> None:
        """Under the user's lock, first in the transaction that acts: what was checked
        before it still holds. The asking session is live, the password is the one
        checked (a change in between ends the request), and two-factor was not turned on
        in between without its code."""
        locked = await self.auth.lock_user(tx, user.id, exclusive=True)
        session = await tx.first(
            LIVE_SESSION, {"session_id": claims.session_id, "now": self.clock.now()}
        )
        if session is None:
            raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
        # As a sign-in re-checks it: a change or reset sets password_changed_at (a hash
        # upgrade does not).
        if locked is None or locked["password_changed_at"] != password_set_at:
            raise _wrong_password()
        if not second_factor and await tx.first(_TWO_FACTOR_ON, {"uid": user.id}) is not None:
            raise _second_factor_needed()

    # -- export -------------------------------------------------------------------------------

    async def export(self, *, user: UserView, claims: AccessClaims) -> tuple[datetime, str]:
        """Everything held about the user, as one JSON document: never a secret, a hash
        or a token (those columns are not even read)."""
        await self.limiter.hit("export_account_account", str(user.id))
        now = self.clock.now()
        uid = {"uid": user.id}
        async with self.statements.connection() as conn:
            profile = await conn.first(_EXPORT_USER, uid)
            if profile is None:
                raise AuthFailure(ErrorCode.INVALID_TOKEN, "This account no longer exists.")
            totp = await conn.first(_EXPORT_TOTP, uid)
            codes = await conn.first(_EXPORT_RECOVERY_CODES, uid)
            sessions = await conn.all(_EXPORT_SESSIONS, uid)
            events = await conn.all(_EXPORT_EVENTS, uid)
            challenges = await conn.all(_EXPORT_CHALLENGES, uid)
            previous = await _previous_addresses(conn, user.id)
            mail = await conn.all(_EXPORT_MAIL, uid)
            passkeys = await conn.all(_EXPORT_PASSKEYS, uid)
            identities = await conn.all(_EXPORT_IDENTITIES, uid)
            roles = await conn.all(_EXPORT_ROLES, uid)
            throttle = await conn.first(
                _EXPORT_THROTTLE, {"email": parse_email(profile["email"]).normalized}
            )
        document = {
            "format": EXPORT_FORMAT,
            "generatedAt": now,
            "profile": {
                "id": profile["id"],
                "email": profile["email"],
                "emailVerifiedAt": profile["email_verified_at"],
                "active": profile["is_active"],
                "createdAt": profile["created_at"],
                "updatedAt": profile["updated_at"],
                "passwordChangedAt": profile["password_changed_at"],
                "previousEmails": list(dict.fromkeys(previous)),
                # updateProfile's: the user's own profile (an object) and mail language.
                "profile": orjson.loads(profile["profile_json"] or "{}"),
                "locale": profile["locale"],
                # What the signup's Accept-Language asked for: the mails' language
                # while `locale` is unset.
                "signupLocale": profile["signup_locale"],
            },
            "twoFactor": {
                "enabled": totp is not None and totp["confirmed_at"] is not None,
                "enrolledAt": totp["confirmed_at"] if totp is not None else None,
                "recoveryCodes": {
                    "total": codes["total"] if codes else 0,
                    "used": codes["used"] if codes else 0,
                },
            },
            "passkeys": [
                {
                    "id": row["id"],
                    "name": row["name"],
                    "credentialId": bytes_to_base64url(bytes(row["credential_id"])),
                    "aaguid": row["aaguid"],
                    "transports": (row["transports"] or "").split(),
                    "attachment": row["attachment"],
                    "backupEligible": row["backup_eligible"],
                    "backedUp": row["backed_up"],
                    "createdAt": row["created_at"],
                    "lastUsedAt": row["last_used_at"],
                }
                for row in passkeys
            ],
            # Granted by operators (who granted them is the operators' record, not shown).
            "roles": [{"role": row["role"], "grantedAt": row["granted_at"]} for row in roles],
            # The provider accounts linked: the provider's subject is what it knows the
            # user by (no token of the provider's is ever kept).
            "identities": [
                {
                    "provider": row["provider"],
                    "subject": row["subject"],
                    "email": row["email"],
                    "name": row["name"],
                    "linkedAt": row["created_at"],
                    "lastUsedAt": row["last_used_at"],
                }
                for row in identities
            ],
            "sessions": [
                {
                    "id": row["id"],
                    "current": row["id"] == claims.session_id,
                    "live": row["revoked_at"] is None and row["expires_at"] > now,
                    "createdAt": row["created_at"],
                    "lastUsedAt": row["last_used_at"],
                    "expiresAt": row["expires_at"],
                    "absoluteExpiresAt": row["absolute_expires_at"],
                    "endedAt": row["revoked_at"],
                    "endReason": row["revoke_reason"],
                    "userAgent": row["user_agent"],
                    "ipAddress": row["ip"],
                    "device": row["device"],
                    "network": row["network"],
                    "authenticationMethods": row["amr"].split(),
                }
                for row in sessions
            ],
            "securityEvents": [
                {
                    "id": row["id"],
                    "at": row["at"],
                    "kind": row["kind"],
                    "sessionId": row["session_id"],
                    "ipAddress": row["ip"],
                    "userAgent": row["user_agent"],
                    "details": orjson.loads(row["details"]) if row["details"] else {},
                }
                for row in events
            ],
            "challenges": [
                {
                    "id": row["id"],
                    "purpose": row["purpose"],
                    "method": row["method"],
                    "createdAt": row["created_at"],
                    "expiresAt": row["expires_at"],
                    "usedAt": row["consumed_at"],
                    "attempts": row["attempts"],
                    "newEmail": row["new_email"],
                    "ipAddress": row["ip"],
                    "userAgent": row["user_agent"],
                }
                for row in challenges
            ],
            "mail": [
                {
                    "id": row["id"],
                    "kind": row["template"],
                    "to": row["recipient"],
                    "queuedAt": row["created_at"],
                    "sentAt": row["sent_at"],
                    "failedAt": row["failed_at"],
                }
                for row in mail
            ],
            "signInThrottle": _throttle(throttle),
        }
        # default=str: asyncpg's UUIDs are not the standard library's.
        text = orjson.dumps(
            document, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z
        ).decode()
        return now, text

    # -- deletion -----------------------------------------------------------------------------

    async def delete(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        password: str | None,
        code: str | None,
        client: ClientInfo,
    ) -> None:
        """Deletes the account: needs the password (or a recent sign-in on this session)
        and, with two-factor on, a current or recovery code. Every session ends with it;
        the audit trail stays, anonymised; a last notice goes to the address. A wrong
        password or code changes nothing."""
        self.hasher.check_capacity()
        await self.limiter.hit("delete_account_ip", client_key(client.ip))
        await self.limiter.hit("delete_account_account", str(user.id))
        password_set_at = await self._check_password(user, claims, password, client)
        second_factor = await self.auth.two_factor.is_on(user.id)

        async def delete_now(tx: Runner, method: str = "") -> bool:
            await self._still_as_checked(tx, user, claims, password_set_at, second_factor)
            await self._delete_now(tx, user, client)
            return True

        if second_factor:
            # The code is spent in the transaction that deletes.
            await self._check_second_factor(user, claims, code, client, claim=delete_now)
        else:
            async with self.events.transaction(self.statements) as tx:
                await delete_now(tx)
        self.auth.outbox.wake()

    async def _delete_now(self, tx: Runner, user: UserView, client: ClientInfo) -> None:
        """In the transaction holding the user's lock (see _still_as_checked)."""
        profile = await tx.first(_EXPORT_USER, {"uid": user.id})
        if profile is None:  # pragma: no cover - the lock holder saw the session live
            raise AuthFailure(ErrorCode.INVALID_TOKEN, "This account no longer exists.")
        email = profile["email"]
        normalized = parse_email(email).normalized
        now = self.clock.now()
        await self.auth.lock_sessions(tx, user.id)
        ended = await tx.scalars(_LIVE_SESSIONS, {"uid": user.id, "now": now})
        await self.events.sessions_ended(tx, user.id, ended, "account_deleted")
        for address in {normalized, *map(_normalized, await _previous_addresses(tx, user.id))}:
            holder = await tx.first(ADDRESS_HOLDER, {"email": address})
            if holder is None or holder["id"] == user.id:
                await tx.execute(_ANONYMISE_EVENTS, {"uid": user.id, "address": address})
        # Its own mail, to whichever address (mail others caused stays theirs).
        await tx.execute(_DROP_MAIL, {"uid": user.id})
        await tx.execute(_DROP_THROTTLES, {"email": normalized, "otp": f"otp:{user.id}:"})
        await tx.execute(_DROP_CODE_LOCKOUTS, {"key": code_lockout_key(normalized)})
        # The last notice is in the language of the account's mails: read while it exists.
        language = await self.auth.outbox.language_of(tx, user.id)
        await tx.execute(_DROP_USER, {"uid": user.id})
        # The trail's last word on the account: when, and how many sessions it ended.
        await self.events.record(
            tx,
            EventKind.ACCOUNT_DELETED,
            user_id=user.id,
            details={"sessions": len(ended)},
        )
        # The last word: it outlives the account, and belongs to no one.
        await self.auth.notices.send(
            tx,
            user_id=None,
            email=email,
            template="account_deleted",
            client=client,
            language=language,
        )


def _normalized(address: str) -> str:
    try:
        return parse_email(address).normalized
    except AuthFailure:  # pragma: no cover - every stored address was parsed once
        return address


async def _previous_addresses(tx: Runner, user_id: Any) -> list[str]:
    """The addresses the account moved away from (its EMAIL_CHANGED events say)."""
    rows = await tx.all(_EMAIL_CHANGES, {"uid": user_id})
    found = []
    for row in rows:
        details = orjson.loads(row["details"]) if row["details"] else {}
        if isinstance(details.get("previous"), str):
            found.append(details["previous"])
    return found


def _wrong_password() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_CREDENTIALS, "The password is incorrect.", field="password"
    )


def _second_factor_needed() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_OTP,
        "Two-factor sign-in is on: enter a code from your authenticator app or a recovery code.",
        field="code",
    )


def _throttle(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "failures": row["failures"],
        "lastFailureAt": row["last_failure_at"],
        "lockedUntil": row["locked_until"],
    }
