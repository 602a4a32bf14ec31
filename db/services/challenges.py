"""Challenges: a pending step that a code completes. TOTP after a password (or after a
reset code, when two-factor is on), and emailed codes for verification, sign-in and
password reset. Every challenge is bound to its purpose: each completing operation takes
attempts only on the pairings it completes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import LargeBinary, and_, bindparam, func, insert, null, or_, select, update
from sqlalchemy.sql import Executable

from db.clock import Clock
from db.devices import network_of
from db.errors import AuthFailure, ErrorCode, invalid_challenge
from db.mail.outbox import Outbox
from db.models import IP_MAX, Challenge, User
from db.security.codes import email_code_digest, email_code_matches, new_email_code
from db.security.limiter import RateLimiter, network_key
from db.security.tokens import looks_like_opaque_token, new_opaque_token, token_digest
from db.services.device_trust import DeviceTrust
from db.services.passkey_options import CEREMONY_LIFETIME, PASSKEY, PASSKEY_LOGIN
from db.services.types import ClientInfo, IssuedChallenge
from db.session import Runner, Statements
from db.validation import clean_user_agent, parse_email

MAX_CHALLENGE_ATTEMPTS = 5
MAX_RESENDS = 3
RESEND_INTERVAL = timedelta(minutes=1)

TOTP = "TOTP"
EMAIL = "EMAIL"
LOGIN = "LOGIN"
VERIFY_EMAIL = "VERIFY_EMAIL"
RESET_PASSWORD = "RESET_PASSWORD"  # noqa: S105 - a purpose
CHANGE_EMAIL = "CHANGE_EMAIL"
REAUTHENTICATE = "REAUTHENTICATE"

# The mail that carries each purpose's code.
CODE_TEMPLATES = {
    VERIFY_EMAIL: "verify_email",
    LOGIN: "login_code",
    RESET_PASSWORD: "password_reset_code",
    CHANGE_EMAIL: "change_email_code",
    REAUTHENTICATE: "reauthenticate_code",
}

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
    code_hash=bindparam("code_hash"),
    sent_at=bindparam("sent_at"),
    pending_password_hash=bindparam("pending_password_hash"),
    new_email=bindparam("new_email"),
    session_id=bindparam("session_id"),
    email=bindparam("email"),
    owner_client=bindparam("owner_client"),
)


def _take_attempt(pairings: Any) -> Executable:
    """Every code checked against a challenge first takes one of its attempts, in one
    write, so parallel guesses cannot pass the cap; a challenge out of attempts, used,
    expired or of another purpose gives none (and is left as it was)."""
    return (
        update(Challenge)
        .where(
            Challenge.token_hash == bindparam("digest"),
            Challenge.consumed_at.is_(None),
            Challenge.expires_at > bindparam("now"),
            Challenge.attempts < MAX_CHALLENGE_ATTEMPTS,
            pairings,
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
            Challenge.code_hash,
            Challenge.pending_password_hash,
            Challenge.new_email,
            Challenge.session_id,
            Challenge.email,
            Challenge.owner_client,
        )
    )


# verifyOtp completes TOTP steps (after a password or a reset code) and emailed sign-in,
# verification, change-of-address and step-up codes; resetPassword completes emailed
# reset codes only.
TAKE_FOR_VERIFY_OTP = _take_attempt(
    or_(
        Challenge.method == TOTP,
        # Not IN (...): its expanding parameter cannot be compiled once for Statements.
        and_(
            Challenge.method == EMAIL,
            or_(
                Challenge.purpose == LOGIN,
                Challenge.purpose == VERIFY_EMAIL,
                Challenge.purpose == CHANGE_EMAIL,
                Challenge.purpose == REAUTHENTICATE,
            ),
        ),
    )
)
# finishPasskeyLogin completes passkey sign-in ceremonies, passkey-only step-ups, TOTP
# steps (after a proven first factor) and emailed step-up codes: never a registration
# ceremony, an emailed sign-in, verification, reset or change-of-address code.
TAKE_FOR_PASSKEY = _take_attempt(
    or_(
        and_(
            Challenge.method == PASSKEY,
            or_(Challenge.purpose == PASSKEY_LOGIN, Challenge.purpose == REAUTHENTICATE),
        ),
        Challenge.method == TOTP,
        and_(Challenge.method == EMAIL, Challenge.purpose == REAUTHENTICATE),
    )
)
TAKE_FOR_RESET = _take_attempt(and_(Challenge.method == EMAIL, Challenge.purpose == RESET_PASSWORD))

# A challenge used up (see Challenges.consume); RETURNING nothing when it was already.
CONSUME = (
    update(Challenge)
    .where(Challenge.id == bindparam("challenge_id"), Challenge.consumed_at.is_(None))
    .values(consumed_at=bindparam("now"))
    .returning(Challenge.id)
)

# A password change or reset ends every pending step of the user.
_VOID_ALL = (
    update(Challenge)
    .where(
        Challenge.user_id == bindparam("owner_id"),
        Challenge.consumed_at.is_(None),
        Challenge.expires_at > bindparam("now"),
    )
    .values(consumed_at=bindparam("now"))
)

_FOR_RESEND = (
    select(
        Challenge.id,
        Challenge.user_id,
        Challenge.purpose,
        Challenge.method,
        Challenge.attempts,
        Challenge.expires_at,
        Challenge.consumed_at,
        Challenge.resends,
        Challenge.sent_at,
        Challenge.new_email,
        Challenge.session_id,
        Challenge.email.label("address"),
        User.email,
        User.is_active,
    )
    .outerjoin(User, User.id == Challenge.user_id)
    .where(Challenge.token_hash == bindparam("digest"))
    .with_for_update(of=Challenge)
)

_RESEND = (
    update(Challenge)
    .where(Challenge.id == bindparam("challenge_id"))
    .values(
        code_hash=func.coalesce(bindparam("new_code_hash", type_=LargeBinary), Challenge.code_hash),
        resends=Challenge.resends + 1,
        sent_at=bindparam("now"),
    )
)


# What an unmailed challenge's code is compared with: no HMAC output is all zeroes.
_NO_DIGEST = bytes(32)


@dataclass(frozen=True, slots=True)
class MailDecision:
    send: bool  # within the budgets: the code is mailed
    owner_client: bool  # asked for by one of the account's own clients


class MailBudget:
    """Every mail that carries a code counts against two budgets of its recipient
    address: one per requesting network, so a stranger's requests spend their own
    network's share and not the owner's, and a ceiling over all networks, which bounds a
    mail flood to the address. The account's own clients (a device token good for it, or
    a network it signed in from lately on a session not revoked for cause) are counted
    too but not held to the ceiling, so strangers on however many networks cannot keep
    the owner's code from them; they share one budget per /24 or /48, so a known network
    is one budget however many /64s it holds. Over a budget, the answer looks the same
    and no mail goes out."""

    def __init__(self, limiter: RateLimiter, trust: DeviceTrust) -> None:
        self.limiter = limiter
        self.trust = trust

    async def decide(
        self,
        tx: Runner,
        address: str,
        client: ClientInfo,
        user_id: uuid.UUID | None,
        *,
        not_session: uuid.UUID | None = None,
    ) -> MailDecision:
        """Counts a code mail to `address` (normalized) asked for by `client`. `user_id`:
        the account whose own address it is (None for an unknown address, and for an
        address the account only asked to move to: nobody's own clients there)."""
        # The same work whoever asks (the query runs for an unknown address too).
        owner = await self.trust.is_known(tx, client, user_id, not_session=not_session)
        network = network_of(client.ip) if owner else network_key(client.ip)
        if not await self.limiter.hit_quietly("code_mail_client", f"{address}|{network}"):
            return MailDecision(send=False, owner_client=owner)
        # Counted for everyone, held to it only by strangers.
        within = await self.limiter.hit_quietly("code_mail_account", address)
        return MailDecision(send=within or owner, owner_client=owner)


class Challenges:
    def __init__(
        self,
        *,
        statements: Statements,
        outbox: Outbox,
        clock: Clock,
        secret: str,
        email_lifetime: timedelta,
        totp_lifetime: timedelta,
        mail_budget: MailBudget,
    ) -> None:
        self.mail_budget = mail_budget
        self.statements = statements
        self.outbox = outbox
        self.clock = clock
        self._secret = secret
        self.email_lifetime = email_lifetime
        self.totp_lifetime = totp_lifetime

    async def open_email(
        self,
        tx: Runner,
        *,
        purpose: str,
        user: Mapping[str, Any] | None,
        address: str,
        amr: list[str],
        client: ClientInfo,
        new_email: str | None = None,
        session_id: uuid.UUID | None = None,
    ) -> IssuedChallenge:
        """A challenge completed by a code mailed to `user` (id, email) in this transaction
        (for a change of address, to `new_email` instead), bound to `session_id` where one
        asked. `address`: the normalized address it is for. Without a user (an unknown
        address), or over the address's mail budget, the challenge is made just the same
        and mailed nowhere, and no code completes it: a code nobody was sent must not be
        guessable either."""
        now = self.clock.now()
        challenge_id = uuid.uuid4()
        code = new_email_code()
        expires_at = now + self.email_lifetime
        recipient = (new_email or user["email"]) if user is not None else None
        # Counted for unknown addresses too: the same work either way.
        budget_key = parse_email(new_email).normalized if new_email else address
        owner = user["id"] if user is not None and new_email is None else None
        decision = await self.mail_budget.decide(
            tx, budget_key, client, owner, not_session=session_id
        )
        if not decision.send:
            recipient = None
        token = await self._insert(
            tx,
            challenge_id=challenge_id,
            user_id=user["id"] if user is not None else None,
            purpose=purpose,
            method=EMAIL,
            amr=amr,
            client=client,
            expires_at=expires_at,
            code_hash=email_code_digest(self._secret, challenge_id, code)
            if recipient is not None
            else None,
            new_email=new_email,
            session_id=session_id,
            email=address,
            owner_client=decision.owner_client and recipient is not None,
        )
        if user is not None and recipient is not None:
            await self._mail_code(tx, user["id"], recipient, purpose, code, expires_at)
        else:
            # The same work as queueing the mail: the answer's timing reveals nothing.
            await self.outbox.decoy(tx, secrets={"code": code})
        return IssuedChallenge(
            challenge_token=token,
            method=EMAIL,
            purpose=purpose,
            expires_in=int(self.email_lifetime.total_seconds()),
        )

    async def open_totp(
        self,
        tx: Runner,
        *,
        user_id: uuid.UUID,
        purpose: str,
        amr: list[str],
        client: ClientInfo,
        pending_password_hash: str | None = None,
        session_id: uuid.UUID | None = None,
    ) -> IssuedChallenge:
        """A TOTP step (after a first factor), for `purpose`, bound to `session_id` where
        it renews a session (REAUTHENTICATE)."""
        token = await self._insert(
            tx,
            challenge_id=uuid.uuid4(),
            user_id=user_id,
            purpose=purpose,
            method=TOTP,
            amr=amr,
            client=client,
            expires_at=self.clock.now() + self.totp_lifetime,
            pending_password_hash=pending_password_hash,
            session_id=session_id,
        )
        return IssuedChallenge(
            challenge_token=token,
            method=TOTP,
            purpose=purpose,
            expires_in=int(self.totp_lifetime.total_seconds()),
        )

    async def open_passkey(
        self,
        tx: Runner,
        *,
        purpose: str,
        user_id: uuid.UUID | None,
        email: str | None,
        client: ClientInfo,
        session_id: uuid.UUID | None = None,
    ) -> str:
        """A passkey ceremony (method PASSKEY) for `purpose`: a sign-in (PASSKEY_LOGIN;
        `user_id` where it was started with an account's address, `email` the normalized
        address given), or a step-up answered only by a passkey (REAUTHENTICATE, bound to
        `session_id`). Five minutes; returns its token."""
        return await self._insert(
            tx,
            challenge_id=uuid.uuid4(),
            user_id=user_id,
            purpose=purpose,
            method=PASSKEY,
            amr=[],
            client=client,
            expires_at=self.clock.now() + CEREMONY_LIFETIME,
            session_id=session_id,
            email=email,
        )

    async def _insert(
        self,
        tx: Runner,
        *,
        challenge_id: uuid.UUID,
        user_id: uuid.UUID | None,
        purpose: str,
        method: str,
        amr: list[str],
        client: ClientInfo,
        expires_at: Any,
        code_hash: bytes | None = None,
        pending_password_hash: str | None = None,
        new_email: str | None = None,
        session_id: uuid.UUID | None = None,
        email: str | None = None,
        owner_client: bool = False,
    ) -> str:
        now = self.clock.now()
        token = new_opaque_token()  # 256 bits; stored only as its SHA-256
        await tx.execute(
            _ADD_CHALLENGE,
            {
                "challenge_id": challenge_id,
                "token_hash": token_digest(token),
                "user_id": user_id,
                "purpose": purpose,
                "method": method,
                "amr": " ".join(amr),
                "user_agent": clean_user_agent(client.user_agent),
                "ip": client.ip[:IP_MAX] if client.ip else None,
                "now": now,
                "expires_at": expires_at,
                "code_hash": code_hash,
                # Every emailed challenge looks sent (resendOtp's wait applies alike).
                "sent_at": now if method == EMAIL else None,
                "pending_password_hash": pending_password_hash,
                "new_email": new_email,
                "session_id": session_id,
                "email": email,
                "owner_client": owner_client,
            },
        )
        return token

    async def _mail_code(
        self,
        tx: Runner,
        user_id: uuid.UUID,
        email: str,
        purpose: str,
        code: str,
        expires_at: Any,
    ) -> None:
        await self.outbox.enqueue(
            tx,
            user_id=user_id,
            recipient=email,
            template=CODE_TEMPLATES[purpose],
            context={"minutes": int(self.email_lifetime.total_seconds() // 60)},
            secrets={"code": code},
            secrets_expire_at=expires_at,
        )

    # -- completing -------------------------------------------------------------------------

    async def take_attempt(
        self, statement: Executable, token: str, *, on: Runner | None = None
    ) -> Mapping[str, Any]:
        """Takes one attempt of the challenge `token` names, if `statement`'s pairings
        allow; INVALID_TOKEN otherwise (nothing taken). Committed by itself: on a
        connection of its own, or `on` one from Statements.standalone()."""
        if not token or not looks_like_opaque_token(token):
            raise invalid_challenge()
        params = {"digest": token_digest(token), "now": self.clock.now()}
        if on is not None:
            challenge = await on.first(statement, params)
        else:
            async with self.statements.standalone() as tx:
                challenge = await tx.first(statement, params)
        if challenge is None:
            raise invalid_challenge()
        return challenge

    def email_code_matches(self, challenge: Mapping[str, Any], code: str) -> bool:
        """Whether `code` is the challenge's current emailed code. A challenge whose code
        was mailed nowhere (an unknown address, a mail budget spent) never matches, after
        the same work."""
        digest = challenge["code_hash"]
        matches = email_code_matches(self._secret, challenge["id"], code, digest or _NO_DIGEST)
        return matches and digest is not None and challenge["user_id"] is not None

    async def consume(self, tx: Runner, challenge_id: uuid.UUID) -> bool:
        """Marks it used; False when a concurrent request used it first."""
        used = await tx.first(CONSUME, {"challenge_id": challenge_id, "now": self.clock.now()})
        return used is not None

    async def void_all(self, tx: Runner, user_id: uuid.UUID) -> None:
        await void_pending(tx, user_id, self.clock.now())

    # -- resending --------------------------------------------------------------------------

    async def resend(self, token: str, *, client: ClientInfo) -> IssuedChallenge:
        """A new code for the same emailed challenge (the old one stops working), keeping
        its attempts and expiry: at most MAX_RESENDS times, once a minute."""
        if not token or not looks_like_opaque_token(token):
            raise invalid_challenge()
        now = self.clock.now()
        async with self.statements.transaction() as tx:
            row = await tx.first(_FOR_RESEND, {"digest": token_digest(token)})
            if (
                row is None
                or row["method"] != EMAIL
                or row["consumed_at"] is not None
                or row["expires_at"] <= now
                or row["attempts"] >= MAX_CHALLENGE_ATTEMPTS
            ):
                raise invalid_challenge()
            remaining = row["expires_at"] - now
            if row["resends"] >= MAX_RESENDS:
                raise _too_many_resends(remaining)
            if row["sent_at"] is not None and now - row["sent_at"] < RESEND_INTERVAL:
                wait = RESEND_INTERVAL - (now - row["sent_at"])
                raise AuthFailure(
                    ErrorCode.RATE_LIMITED,
                    "A code was sent a moment ago; wait before asking for another.",
                    retry_after=max(1, math.ceil(wait.total_seconds())),
                )
            code = new_email_code()
            # A change of address: the new one.
            recipient = (row["new_email"] or row["email"]) if row["user_id"] is not None else None
            budget_key = recipient or row["address"] or str(row["id"])
            if recipient is not None:
                budget_key = parse_email(recipient).normalized
            # Counted for unknown addresses too: the same work either way. An address
            # the account only asked to move to has none of the account's clients.
            owner = row["user_id"] if row["new_email"] is None else None
            decision = await self.mail_budget.decide(
                tx, budget_key, client, owner, not_session=row["session_id"]
            )
            if not decision.send or not row["is_active"]:
                recipient = None
            await tx.execute(
                _RESEND,
                {
                    "challenge_id": row["id"],
                    # Not mailed: the code already mailed (if any) stays the one.
                    "new_code_hash": email_code_digest(self._secret, row["id"], code)
                    if recipient is not None
                    else None,
                    "now": now,
                },
            )
            if recipient is not None:
                await self._mail_code(
                    tx, row["user_id"], recipient, row["purpose"], code, row["expires_at"]
                )
            else:
                await self.outbox.decoy(tx, secrets={"code": code})
        self.outbox.wake()
        return IssuedChallenge(
            challenge_token=token,
            method=EMAIL,
            purpose=row["purpose"],
            expires_in=max(1, math.ceil(remaining.total_seconds())),
        )


def _too_many_resends(remaining: timedelta) -> AuthFailure:
    return AuthFailure(
        ErrorCode.RATE_LIMITED,
        "No more codes for this request; start again when it expires.",
        retry_after=max(1, math.ceil(remaining.total_seconds())),
    )


async def void_pending(tx: Runner, user_id: uuid.UUID, now: Any) -> int:
    """Every pending challenge of the user stops working; how many."""
    return await tx.execute(_VOID_ALL, {"owner_id": user_id, "now": now})
