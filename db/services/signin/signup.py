"""Signup: a new account, with a password (signed in at once where verification is off)
or without one (the address is proven first, by an emailed code: signin/emailed_code.py).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import bindparam, delete, exists, insert, select, true

from db.clock import Clock
from db.errors import UniqueViolation, email_taken
from db.mail.languages import preferred_language
from db.mail.outbox import Outbox
from db.models import User, UserSession
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.events import EventKind, SecurityEvents
from db.services.sessions import Sessions
from db.services.types import AMR_PASSWORD, ClientInfo, IssuedChallenge, IssuedSession, user_view
from db.session import Runner, Statements
from db.validation import check_new_password, normalize_password, parse_email

_ADD_USER = insert(User).values(
    id=bindparam("user_id"),
    email=bindparam("email"),
    email_normalized=bindparam("email_normalized"),
    password_hash=bindparam("password_hash"),
    signup_locale=bindparam("signup_locale"),
    is_active=true(),
    created_at=bindparam("now"),
    updated_at=bindparam("now"),
)

# Who holds an address: what signup (and a change of address) decides on.
ADDRESS_HOLDER = select(User.id, User.email_verified_at).where(
    User.email_normalized == bindparam("email")
)
# An unverified signup is replaced by a new signup once its code has expired (it was made
# with the account: `created_at` says when, and nothing anyone does later extends it),
# unless the account ever had a session (one made while verification was off).
DROP_ABANDONED_SIGNUP = delete(User).where(
    User.id == bindparam("uid"),
    User.email_verified_at.is_(None),
    User.created_at <= bindparam("abandoned_before"),
    ~exists().where(UserSession.user_id == User.id),
)


class Signups:
    def __init__(
        self,
        *,
        statements: Statements,
        hasher: PasswordHasher,
        clock: Clock,
        limiter: RateLimiter,
        events: SecurityEvents,
        outbox: Outbox,
        challenges: Challenges,
        sessions: Sessions,
        password_min_length: int,
        require_email_verification: bool,
    ) -> None:
        self.statements = statements
        self.hasher = hasher
        self.clock = clock
        self.limiter = limiter
        self.events = events
        self.outbox = outbox
        self.challenges = challenges
        self.sessions = sessions
        self.password_min_length = password_min_length
        self.require_email_verification = require_email_verification

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
            # The mails' language until the user sets a locale (None: DEFAULT_LOCALE).
            "signup_locale": preferred_language(client.accept_language),
            "now": now,
        }
        try:
            async with self.events.transaction(self.statements) as tx:
                if existing is not None:
                    # A pending signup: replaced once its codes have expired; until then
                    # the answer looks the same and no mail goes out.
                    dropped = await tx.execute(
                        DROP_ABANDONED_SIGNUP,
                        {
                            "uid": existing["id"],
                            "abandoned_before": now - self.challenges.email_lifetime,
                        },
                    )
                    if not dropped:
                        return await self._pending_signup(tx, address.normalized, amr, client)
                    await self.events.user_deleted(tx, existing["id"], reason="abandoned_signup")
                # The unique index decides between concurrent signups; the check above
                # only spares a hash in the common case.
                await tx.execute(_ADD_USER, add_user)
                await self.events.record(
                    tx,
                    EventKind.SIGNUP,
                    user_id=add_user["user_id"],
                    client=client,
                    # Not proven yet: user.email_verified follows when it is.
                    webhook={"email": address.address, "email_verified": False},
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
