"""What follows a proven credential: the one place every way in hands over to.

Each way in (signin/password.py, signin/emailed_code.py, signin/second_factor.py,
signin/passkey.py, signin/identity.py) proves its credential, takes the account's lock and calls
`Conclusion.conclude` in the same transaction; what conclude decides is listed in its
docstring. It knows nothing of how a credential is checked; no way in opens a session or
renews its auth_time itself (but a signup signed in at once, where verification is off: a
new account has nothing to ask).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, account_disabled, invalid_challenge
from db.models import Identity, User, UserSession
from db.security.tokens import new_opaque_token
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.events import EventKind, SecurityEvents
from db.services.notices import Notices
from db.services.passkey_options import PasskeyOptions
from db.services.sessions import (
    HAS_PASSWORD,
    LOCK_LIVE_SESSION,
    OTP_CONFIRMED,
    ROLES,
    WITH_TOTP,
    Sessions,
)
from db.services.types import ClientInfo, IssuedChallenge, IssuedSession, merge_amr, user_view
from db.session import Runner
from db.validation import parse_email

USER_BY_ID = (
    select(
        User.id,
        User.email,
        User.email_verified_at,
        User.created_at,
        User.is_active,
        User.device_epoch,
        OTP_CONFIRMED,
        HAS_PASSWORD,
        ROLES,
    )
    .outerjoin(*WITH_TOTP)
    .where(User.id == bindparam("user_id"))
)

# A new password; password_changed_at is what sign-ins in flight re-check. On a reset,
# unconditionally, and the address counts as verified (on a change, see
# signin/password.py).
NEW_PASSWORD: dict[str, Any] = {
    "password_hash": bindparam("new_hash"),
    "password_changed_at": bindparam("now"),
    "updated_at": bindparam("now"),
}
_RESET_PASSWORD = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(
        **NEW_PASSWORD,
        email_verified_at=func.coalesce(User.email_verified_at, bindparam("now")),
        # A reset ends every device token too: whoever reset may be the only owner left.
        device_epoch=User.device_epoch + 1,
    )
)

# Provider accounts linked while nobody had proven the account's address (a provider that
# did not vouch for it: signin/identity.py): dropped when the address is proven by another
# way in (a sign-in or reset code), which is its owner, who may not be who linked them.
DROP_UNPROVEN_IDENTITIES = delete(Identity).where(Identity.user_id == bindparam("uid"))

_LOCK_OWN_LIVE_SESSION = LOCK_LIVE_SESSION.where(UserSession.user_id == bindparam("uid"))
# A credential proven again on the session (reauthenticate).
_REAUTHENTICATED = (
    update(UserSession)
    .where(UserSession.id == bindparam("session_id"))
    .values(auth_time=bindparam("now"), last_used_at=bindparam("now"), amr=bindparam("amr"))
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


class Conclusion:
    def __init__(
        self,
        *,
        clock: Clock,
        sessions: Sessions,
        challenges: Challenges,
        notices: Notices,
        events: SecurityEvents,
        require_email_verification: bool,
        passkey_options: PasskeyOptions | None = None,
    ) -> None:
        self.clock = clock
        self.passkey_options = passkey_options
        self.sessions = sessions
        self.challenges = challenges
        self.notices = notices
        self.events = events
        self.require_email_verification = require_email_verification

    async def conclude(
        self,
        tx: Runner,
        user_id: uuid.UUID,
        *,
        amr: list[str],
        client: ClientInfo,
        intent: Intent = SIGN_IN,
        verify_address: bool = False,
        address_required: bool = False,
    ) -> IssuedSession | IssuedChallenge:
        """What follows a proven credential, whichever way in proved it (password, emailed
        code, TOTP or recovery code): refuse a disabled account; ask for the address to be
        proven (`verify_address`: a password sign-in, where verification is required; an
        identity provider's, with `address_required`, whatever the setting says);
        ask for the TOTP step where two-factor is on and `amr` has no second factor; else
        act on the intent: reset the password, renew a session (step-up) or open one.
        The caller holds the account's lock (lock_user) in `tx`.

        What it decides, in `tx`, here or in what it calls:
        - the second step: the address's code (VERIFY_EMAIL), then the TOTP step where
          two-factor is on (Challenges.open_email, Challenges.open_totp), offering the
          user's passkeys as another answer to it after a password, after an identity
          provider, or in a step-up (PasskeyOptions.for_user);
        - a reset: the new password, every session and pending step ended, the notice
          and PASSWORD_RESET (reset_password_now);
        - a step-up: the session's new `auth_time` and `amr`, new tokens,
          REAUTHENTICATED (_renew);
        - a sign-in: the session with its `auth_time`, the session cap
          (MAX_SESSIONS_PER_USER), LOGIN_SUCCEEDED and the new-device notice
          (Sessions.open_session).
        Lockout and budgets are the way in's: spent before the credential is checked,
        settled after (Passwords.acting and EmailedCodes.spending, last in this same
        transaction: the account's lock comes first in every transaction;
        TwoFactor.check_code for a TOTP or recovery code).

        The row is read here, in a statement of its own after the lock: a statement that
        waited for a lock sees the other tables (the roles, the TOTP credential) as they
        were when it started, so a role taken away while this sign-in waited would still
        be in its token."""
        user = await tx.first(USER_BY_ID, {"user_id": user_id})
        if user is None:
            raise invalid_challenge()
        if not user["is_active"]:
            raise account_disabled()
        if (
            verify_address
            and (self.require_email_verification or address_required)
            and user["email_verified_at"] is None
        ):
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
            step = await self.challenges.open_totp(
                tx,
                user_id=user_id,
                purpose=intent.purpose,
                amr=amr,
                client=client,
                pending_password_hash=intent.new_password_hash,
                session_id=intent.session_id,
            )
            if self.passkey_options is None or not (
                "pwd" in amr or "fed" in amr or intent.purpose == ch.REAUTHENTICATE
            ):
                return step
            # A party that proved the password or an identity provider's sign-in (or
            # holds the session it steps up) may answer the step with one of the user's
            # passkeys instead (finishPasskeyLogin): offered there only, never after an
            # emailed code alone (whose challenge must not tell whether an address is
            # registered or has passkeys).
            offered = await self.passkey_options.for_user(tx, user_id, step.challenge_token)
            return dataclasses.replace(step, passkey_options_json=offered)
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
        return await self.sessions.issue(
            user_view(user), session_id, merged, refresh, client, auth_time=now, reason="step-up"
        )

    async def reset_password_now(
        self, tx: Runner, *, user_id: uuid.UUID, new_hash: str, client: ClientInfo
    ) -> Mapping[str, Any]:
        """Sets a password proven by a reset code (and the TOTP step, where two-factor is
        on): the address counts as verified, every session and pending step ends, and the
        owner is told. Returns the user. The caller holds the user's lock (lock_user)."""
        user = await tx.first(USER_BY_ID, {"user_id": user_id})
        if user is None:
            raise invalid_challenge()
        if not user["is_active"]:
            raise account_disabled()
        now = self.clock.now()
        if user["email_verified_at"] is None:
            await tx.execute(DROP_UNPROVEN_IDENTITIES, {"uid": user_id})
        await tx.execute(_RESET_PASSWORD, {"uid": user_id, "new_hash": new_hash, "now": now})
        await self.sessions.end_sessions(tx, user_id, keep=None, reason="password_reset")
        await self.challenges.void_all(tx, user_id)
        await self.notices.send(
            tx, user_id=user_id, email=user["email"], template="password_reset", client=client
        )
        await self.events.record(tx, EventKind.PASSWORD_RESET, user_id=user_id, client=client)
        if user["email_verified_at"] is None:
            await self.events.record(
                tx,
                EventKind.EMAIL_VERIFIED,
                user_id=user_id,
                client=client,
                webhook={"email": user["email"]},
            )
        # As the reset left it (verified, a new device epoch): read, not recomputed.
        changed = await tx.first(USER_BY_ID, {"user_id": user_id})
        assert changed is not None  # noqa: S101 - the row is locked by this transaction
        return changed
