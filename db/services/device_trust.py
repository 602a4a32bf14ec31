"""Whether a client's device token is good for an account: its MAC and expiry (the
token's own), the account it names and that account's epoch, and the session it was
issued with (the database's). Whatever ends a session by revocation (a password change
or reset, logout everywhere, revokeSession, refresh-token reuse, an operator) ends the
device token issued with it; a session's own logout, the session cap or going idle do
not: the device is still its owner's."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import and_, bindparam, exists, literal, or_, select

from db.clock import Clock
from db.devices import network_of
from db.models import User, UserSession
from db.security.device import DeviceClaims, DeviceTokens, device_budget
from db.security.limiter import client_key
from db.services.types import ClientInfo
from db.session import Runner, Statements

# A device family and network the user signed in from within this long are "known" (no
# new-device notice; the owner's own code mails are not held to the ceiling strangers
# can spend).
KNOWN_WINDOW = timedelta(days=90)

# Endings that leave the device's token good: the owner ended the session themselves
# (logout) or made a new one past the cap. Every other revoke_reason ends it.
KEEPS_DEVICE = frozenset({"logout", "session_limit"})

_DEVICE_STATE = (
    select(User.device_epoch, UserSession.id, UserSession.revoked_at, UserSession.revoke_reason)
    .select_from(User)
    .outerjoin(
        UserSession,
        and_(UserSession.id == bindparam("sid"), UserSession.user_id == User.id),
    )
    .where(User.id == bindparam("uid"))
)


# Whether the account had a session from this network (IPv4 /24, IPv6 /48) lately, one
# that is live or ended by its owner (a session revoked for cause, e.g. a thief's,
# makes no network the owner's).
_KNOWN_NETWORK = select(
    exists()
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.network == bindparam("network"),
        UserSession.last_used_at >= bindparam("since"),
        or_(
            UserSession.revoked_at.is_(None),
            # Not IN (...): its expanding parameter cannot be compiled once for Statements.
            *(UserSession.revoke_reason == literal(reason) for reason in sorted(KEEPS_DEVICE)),
        ),
    )
    .label("known")
)


class DeviceTrust:
    def __init__(self, *, statements: Statements, tokens: DeviceTokens, clock: Clock) -> None:
        self.statements = statements
        self.tokens = tokens
        self.clock = clock

    async def is_known(
        self,
        tx: Runner,
        client: ClientInfo,
        user_id: uuid.UUID | None,
        *,
        not_session: uuid.UUID | None = None,
    ) -> bool:
        """Whether the client is the account's own: a device token good for it (see
        device_of, and `not_session`), or a network the account signed in from within
        KNOWN_WINDOW on a session not revoked for cause. Asked alike for an unknown
        address (`user_id` None: a query that finds nothing), so its cost says nothing
        about registration."""
        row = await tx.first(
            _KNOWN_NETWORK,
            {
                "uid": user_id or uuid.UUID(int=0),
                "network": network_of(client.ip),
                "since": self.clock.now() - KNOWN_WINDOW,
            },
        )
        if row is not None and row["known"]:
            return True
        if user_id is None:
            return False
        return await self.device_of(client, user_id, not_session=not_session) is not None

    async def device_of(
        self, client: ClientInfo, user_id: uuid.UUID, *, not_session: uuid.UUID | None = None
    ) -> DeviceClaims | None:
        """The client's device token when it is good for this account, else None. A token
        of another account, of an earlier epoch, or whose session was revoked, counts as
        no token at all; so does one issued with `not_session` (a step-up of a session:
        that session's own device token proves nothing its holder does not already
        hold)."""
        claims = self.tokens.check(client.device_token, user_id=user_id)
        if claims is None:
            return None  # no query for a client without a genuine token for this account
        if not_session is not None and claims.session_id == not_session:
            return None
        async with self.statements.connection() as conn:
            state = await conn.first(_DEVICE_STATE, {"uid": user_id, "sid": claims.session_id})
        if state is None or state["device_epoch"] != claims.epoch or state["id"] is None:
            return None  # the account is gone, its tokens were ended, or the session pruned
        if state["revoked_at"] is not None and state["revoke_reason"] not in KEEPS_DEVICE:
            return None
        return claims

    async def budget_of(
        self,
        client: ClientInfo,
        user_id: uuid.UUID | None,
        *,
        not_session: uuid.UUID | None = None,
    ) -> str:
        """Whose budget the client's attempts on this account spend: its device, where its
        device token is good for the account, else its address (IPv6 by /64)."""
        if user_id is not None:
            held = await self.device_of(client, user_id, not_session=not_session)
            if held is not None:
                return device_budget(held)
        return client_key(client.ip)
