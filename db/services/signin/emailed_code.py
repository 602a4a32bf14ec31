"""The way in by emailed code: checking one (code lockout, per-client budget, then the
comparison), and completing it: a sign-in or verification (the address proven; a
password nobody proved distrusted), a step-up, or a change of address. The reset code is
completed in db/services/account.py through the same check. What follows a right code is
decided by signin/conclusion.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update

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
from db.models import Challenge, User
from db.security.access import AccessClaims
from db.security.device import device_budget
from db.security.limiter import RateLimiter, client_key
from db.security.tokens import new_opaque_token
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
from db.services.notices import Notices
from db.services.passkey_options import CEREMONY_LIFETIME, CREDENTIALS, PASSKEY, descriptors
from db.services.sessions import LOCK_LIVE_SESSION, Sessions, end_device_tokens
from db.services.signin.conclusion import (
    DROP_UNPROVEN_IDENTITIES,
    SIGN_IN,
    USER_BY_ID,
    Conclusion,
    step_up,
)
from db.services.signin.signup import ADDRESS_HOLDER, DROP_ABANDONED_SIGNUP
from db.services.types import (
    AMR_EMAIL_CODE,
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    UserView,
    merge_amr,
    user_view,
)
from db.session import Runner, Statements
from db.validation import parse_email

# Passkey-only step-ups (reauthenticate, emailCode: false) waiting at once, per session: a
# bound on the rows one session can make.
MAX_PENDING_REAUTHENTICATIONS = 5
_PENDING_REAUTHENTICATIONS = select(func.count(Challenge.id)).where(
    Challenge.session_id == bindparam("sid"),
    Challenge.method == PASSKEY,
    Challenge.purpose == ch.REAUTHENTICATE,
    Challenge.consumed_at.is_(None),
    Challenge.expires_at > bindparam("now"),
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

# An address proven by a sign-in code, on an account whose password nobody proved: the
# password was set by whoever signed up with the address, who may not be its owner. The
# account goes on without one.
_DISCARD_PASSWORD = (
    update(User)
    .where(User.id == bindparam("uid"))
    .values(password_hash=None, password_changed_at=bindparam("now"), updated_at=bindparam("now"))
)


@dataclass(frozen=True, slots=True)
class CodeCheck:
    """A right emailed code, not spent yet: its wrong-code check (per account and client)
    and its reservation with the address's code lockout (None for a device token's
    holder), settled by the transaction that spends it (see EmailedCodes.spending)."""

    key: str
    lock: str | None


class EmailedCodes:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        limiter: RateLimiter,
        trust: DeviceTrust,
        code_lockout: Lockout,
        code_checks: CodeChecks,
        events: SecurityEvents,
        outbox: Outbox,
        challenges: Challenges,
        notices: Notices,
        sessions: Sessions,
        conclusion: Conclusion,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.limiter = limiter
        self.trust = trust
        self.code_lockout = code_lockout
        self.code_checks = code_checks
        self.events = events
        self.outbox = outbox
        self.challenges = challenges
        self.notices = notices
        self.sessions = sessions
        self.conclusion = conclusion

    async def reauthenticate(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        address: str,
        email_code: bool,
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """Step-up on this session by a code mailed to the address (completed by
        verify_otp, then the TOTP step where two-factor is on), or by one of the user's
        passkeys (finishPasskeyLogin; the challenge carries their options). With
        `email_code` false nothing is mailed and only a passkey answers it: refused
        (INVALID_INPUT) for a user without passkeys, whom nothing could answer."""
        if email_code:
            await self.limiter.hit("request_login_code_ip", client_key(client.ip))
        else:
            # A passkey ceremony's start, spending what startPasskeyLogin spends.
            await self.limiter.hit("start_passkey_login_ip", client_key(client.ip))
        options = self.conclusion.passkey_options
        async with self.events.transaction(self.statements) as tx:
            credentials = []
            if options is not None and options.relying_party is not None:
                credentials = await tx.all(CREDENTIALS, {"uid": user.id})
            if not email_code:
                if not credentials:
                    raise invalid_input(
                        "Give your password, or ask for a code by mail (emailCode: true).",
                        field="password",
                    )
                # The account's lock first (as in every transaction): the count below
                # holds against this session's concurrent requests.
                if await self.sessions.lock_user(tx, user.id, exclusive=True) is None:
                    raise AuthFailure(
                        ErrorCode.INVALID_TOKEN, "This session has ended; sign in again."
                    )
                pending = await tx.scalars(
                    _PENDING_REAUTHENTICATIONS,
                    {"sid": claims.session_id, "now": self.clock.now()},
                )
                if pending and int(pending[0]) >= MAX_PENDING_REAUTHENTICATIONS:
                    raise AuthFailure(
                        ErrorCode.RATE_LIMITED,
                        "Too many passkey step-ups under way; finish one, or wait.",
                        retry_after=int(CEREMONY_LIFETIME.total_seconds()),
                    )
                token = await self.challenges.open_passkey(
                    tx,
                    purpose=ch.REAUTHENTICATE,
                    user_id=user.id,
                    email=address,
                    client=client,
                    session_id=claims.session_id,
                )
                # Reported as the step-up's emailed kind: the contract's OtpMethod has no
                # passkey member; no code was mailed and verifyOtp refuses its token.
                issued = IssuedChallenge(
                    challenge_token=token,
                    method=ch.EMAIL,
                    purpose=ch.REAUTHENTICATE,
                    expires_in=int(CEREMONY_LIFETIME.total_seconds()),
                )
            else:
                issued = await self.challenges.open_email(
                    tx,
                    purpose=ch.REAUTHENTICATE,
                    user={"id": user.id, "email": user.email},
                    address=address,
                    amr=[],
                    client=client,
                    session_id=claims.session_id,
                )
            if credentials and options is not None:
                issued = dataclasses.replace(
                    issued,
                    passkey_options_json=options.request(
                        issued.challenge_token, descriptors(credentials)
                    ),
                )
        self.outbox.wake()
        return issued

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
        async with self.statements.standalone() as tx:
            await self.code_checks.give_back(tx, check.key)

    async def complete(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        check = await self.emailed_code_check(challenge, code, client)
        amr = merge_amr(challenge["amr"].split(), AMR_EMAIL_CODE)
        try:
            return await self._complete_now(challenge, amr, client, check)
        except UniqueViolation as violation:
            if "email" not in str(violation):
                raise
            # Another account took the new address between the check and the change.
            raise email_taken() from None

    async def _complete_now(
        self, challenge: Mapping[str, Any], amr: list[str], client: ClientInfo, check: CodeCheck
    ) -> IssuedSession | IssuedChallenge:
        async with self.spending(check) as tx:
            await self.sessions.lock_user(tx, challenge["user_id"], exclusive=True)
            user = await tx.first(USER_BY_ID, {"user_id": challenge["user_id"]})
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
                issued: IssuedSession | IssuedChallenge = await self.sessions.issue(
                    user_view(user),
                    challenge["session_id"],
                    asking["amr"].split(),
                    refresh,
                    client,
                    auth_time=asking["auth_time"],
                    reason="refresh",
                )
            else:
                issued = await self._sign_in(tx, challenge, user, amr, client)
        self.outbox.wake()
        return issued

    async def _sign_in(
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
                tx,
                EventKind.EMAIL_VERIFIED,
                user_id=user["id"],
                client=client,
                webhook={"email": user["email"]},
            )
        intent = SIGN_IN
        if challenge["purpose"] == ch.REAUTHENTICATE:
            intent = step_up(challenge["session_id"])
        return await self.conclusion.conclude(tx, user["id"], amr=amr, client=client, intent=intent)

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
                DROP_ABANDONED_SIGNUP,
                {"uid": holder["id"], "abandoned_before": self.clock.now()},
            )
            if not dropped:
                raise email_taken()
            await self.events.user_deleted(tx, holder["id"], reason="abandoned_signup")
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
            # Whole (the trail's details are cut at 200 characters).
            webhook={"email": address.address, "previous_email": user["email"]},
        )
        changed = await tx.first(USER_BY_ID, {"user_id": user["id"]})
        assert changed is not None  # noqa: S101 - the row is locked by this transaction
        return changed

    async def _distrust_password(self, tx: Runner, user_id: uuid.UUID) -> None:
        """The owner of the address signs in by code to an account nobody had verified:
        whoever signed up chose its password, and may not be the owner (pre-hijacking).
        That password stops working (the account goes on without one: the owner may set
        one with changePassword or requestPasswordReset), provider accounts linked to it
        are unlinked, and whatever it opened ends."""
        await tx.execute(_DISCARD_PASSWORD, {"uid": user_id, "now": self.clock.now()})
        await tx.execute(DROP_UNPROVEN_IDENTITIES, {"uid": user_id})
        await end_device_tokens(tx, user_id)  # ended sessions' tokens too (logged out)
        await self.sessions.end_sessions(tx, user_id, keep=None, reason="unproven_password")
        await self.challenges.void_all(tx, user_id)
