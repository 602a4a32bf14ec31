"""The way in by another identity provider (Google, Apple, GitHub, any OpenID Connect issuer):
native apps' ID tokens (signInWithIdToken), what a proven identity signs in to (the web
redirect proves one too: signin/identity_redirect.py), and linking and unlinking provider
accounts. What follows a proven identity is decided by signin/conclusion.py, as for every
other way in.

The account decisions (`_decide`), each tested (tests/graph/test_identity_*.py):
- An identity already linked signs in to its account (disabled stays disabled; two-factor
  asks its step, as after a password).
- A new identity whose address the provider verified (and whose `email_verified` this
  deployment trusts: TRUST_EMAIL_VERIFIED) and which no account holds creates an account:
  address verified, no password.
- The same, where an account holds a verified address: the identity is linked to it (a
  notice mail, IDENTITY_LINKED), then it signs in.
- Where the address is not one the provider verified (or not trusted), or the account's
  address was never verified: EMAIL_TAKEN, telling the user to sign in and link from
  their settings. Never a silent merge into an unverified or unrelated account. (An
  unverified signup whose codes expired and that never signed in yields the address, as
  to a new signup; one still pending answers an unvouched address as a new unvouched
  address is answered, a VERIFY_EMAIL challenge, and mails nothing.)
- A new identity whose trusted address is that of an account which already has another
  account of the same provider linked (one per user and provider: the user's old provider
  account, say): EMAIL_TAKEN, telling the user to sign in with that one or to unlink it
  first. Never a replacement behind the user's back.
- A new identity with an unverified (or untrusted) address that no account holds creates
  the account unverified, and the address is proven by an emailed code before any session
  (whatever REQUIRE_EMAIL_VERIFICATION says): no one holds an address by a provider's word
  alone. If its owner proves the address by another way in first (a sign-in or reset
  code), the identity is dropped (db/services/signin/emailed_code.py, conclusion.py).

What a provider says is vetted before anything is kept or decided (`vetted`, the web
redirect's too): a subject holding a control or format character is refused (it names the
account, so it is never altered), an address holding one is no address, and a name loses
them. An ID token (signInWithIdToken) is spent under the digest of what the provider
signed, not of the string: an ECDSA signature has a twin (s and n - s) anyone holding the
token can write, so the string alone would let a used token in once more. Its nonce, where
the token carries a SHA-256 hex, must be the raw nonce: the hash handed back (by whoever
saw the token) is refused. A token expiring more than a day ahead is refused (providers'
live an hour or so; a spent one is remembered until it expires).

Budgets: every start, exchange and ID token counts against the client address's `login_ip`
(`start_identity_sign_in_ip` for a start); a proven identity against `login_account` under
a key of the provider account (`identity:<provider>:<digest of subject>`), which a stranger
cannot spend: nothing here is guessed, so no lockout applies, and a stranger's wrong
passwords for the address never hold a provider sign-in up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, or_, select, true, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_input
from db.mail.languages import preferred_language
from db.mail.outbox import Outbox
from db.models import Identity, Passkey, SpentIdToken, User, UserSession
from db.providers.http import ProviderUnreachable
from db.providers.oidc import CLOCK_SKEW, NAME_MAX, ProvenIdentity, TokenRejected
from db.providers.registry import IdentityProviders
from db.security.access import AccessClaims
from db.security.limiter import RateLimiter, client_key
from db.security.tokens import new_opaque_token, token_digest
from db.services import challenges as ch
from db.services.events import EventKind, SecurityEvents
from db.services.notices import Notices
from db.services.sessions import LOCK_LIVE_SESSION, Sessions
from db.services.signin.conclusion import USER_BY_ID, Conclusion
from db.services.signin.signup import ADDRESS_HOLDER, DROP_ABANDONED_SIGNUP
from db.services.types import ClientInfo, IssuedChallenge, IssuedSession, UserView, user_view
from db.session import Runner, Statements
from db.validation import parse_email

log = logging.getLogger("strawgate.identities")

# What a provider sign-in adds to a session's amr: "fed" (federated), one factor; the
# provider's own claims about how the user signed in there are not taken on its word.
AMR_FEDERATED = ["fed"]
ID_TOKEN_MAX = 16 * 1024
# The furthest ahead an ID token may expire: providers' live an hour or so (Google's and
# Microsoft's an hour, Apple's less), and a spent one is remembered until it expires.
ID_TOKEN_LONGEST = timedelta(days=1)
# What a token carries where the app hashed its nonce for the provider (Apple always).
_SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
# Never kept from a provider's answer: control and format characters (a NUL PostgreSQL
# refuses, terminal escapes, bidirectional overrides), surrogates, private use, and line
# or paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})

_IDENTITY = select(Identity.id, Identity.user_id, Identity.provider, Identity.subject).where(
    Identity.provider == bindparam("provider"), Identity.subject == bindparam("subject")
)
_IDENTITY_OF_USER = select(Identity.id, Identity.subject).where(
    Identity.user_id == bindparam("uid"), Identity.provider == bindparam("provider")
)
_ADD_IDENTITY = insert(Identity).values(
    id=bindparam("identity_id"),
    user_id=bindparam("uid"),
    provider=bindparam("provider"),
    subject=bindparam("subject"),
    email=bindparam("email"),
    name=bindparam("name"),
    created_at=bindparam("now"),
    last_used_at=bindparam("now"),
)
# The name is the first consent's (Apple sends it once): kept where the provider says none.
_USED_IDENTITY = (
    update(Identity)
    .where(Identity.id == bindparam("identity_id"))
    .values(
        last_used_at=bindparam("now"),
        email=func.coalesce(bindparam("email"), Identity.email),
        name=func.coalesce(Identity.name, bindparam("name")),
    )
)
_ADD_USER = insert(User).values(
    id=bindparam("uid"),
    email=bindparam("email"),
    email_normalized=bindparam("email_normalized"),
    password_hash=None,
    email_verified_at=bindparam("verified_at"),
    signup_locale=bindparam("signup_locale"),
    is_active=true(),
    created_at=bindparam("now"),
    updated_at=bindparam("now"),
)
_LIST_IDENTITIES = (
    select(
        Identity.provider, Identity.email, Identity.name, Identity.created_at, Identity.last_used_at
    )
    .where(Identity.user_id == bindparam("uid"))
    .order_by(Identity.created_at, Identity.id)
)
_COUNT_IDENTITIES = (
    select(func.count()).select_from(Identity).where(Identity.user_id == bindparam("uid"))
)
_COUNT_PASSKEYS = (
    select(func.count()).select_from(Passkey).where(Passkey.user_id == bindparam("uid"))
)
_END_FEDERATED_SESSIONS = (
    update(UserSession)
    .where(
        UserSession.user_id == bindparam("uid"),
        UserSession.id != bindparam("keep"),
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > bindparam("now"),
        # "fed" among the space-separated amr values.
        or_(
            UserSession.amr == "fed",
            UserSession.amr.like("fed %"),
            UserSession.amr.like("% fed"),
            UserSession.amr.like("% fed %"),
        ),
    )
    .values(revoked_at=bindparam("now"), revoke_reason="identity_unlinked")
    .returning(UserSession.id)
)
_DROP_IDENTITY = delete(Identity).where(Identity.id == bindparam("identity_id"))

_LOCK_OWN_LIVE_SESSION = LOCK_LIVE_SESSION.where(UserSession.user_id == bindparam("uid"))
_SPEND_ID_TOKEN = insert(SpentIdToken).values(
    token_hash=bindparam("token_hash"), expires_at=bindparam("expires_at")
)


class _Changed(Exception):
    """The link a sign-in found went away before the account's lock was had."""


@dataclass(frozen=True, slots=True)
class LinkedIdentityView:
    provider: str
    email: str | None
    name: str | None
    linked_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class ProviderView:
    id: str
    name: str
    supports_id_token: bool


class IdentitySignIns:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        limiter: RateLimiter,
        events: SecurityEvents,
        outbox: Outbox,
        notices: Notices,
        sessions: Sessions,
        conclusion: Conclusion,
        providers: IdentityProviders,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.limiter = limiter
        self.events = events
        self.outbox = outbox
        self.notices = notices
        self.sessions = sessions
        self.conclusion = conclusion
        self.providers = providers

    def list_providers(self) -> list[ProviderView]:
        return [
            ProviderView(id=c.id, name=c.name, supports_id_token=c.supports_id_token)
            for c in self.providers.configs.values()
        ]

    # -- native apps -------------------------------------------------------------------

    async def sign_in_with_id_token(
        self,
        *,
        provider_id: str,
        id_token: str,
        nonce: str | None,
        name: str | None,
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """signInWithIdToken: a provider's ID token from its native SDK, checked (keys,
        issuer, audience among the provider's client ids, expiry at most a day ahead, the
        nonce raw or hashed: where the token carries a SHA-256, only what it is the hash
        of), vetted, spent (no token signs in twice, however its signature is written),
        then the account decisions."""
        await self.limiter.hit("login_ip", client_key(client.ip))
        provider = self.providers.oidc(provider_id)
        if len(id_token) > ID_TOKEN_MAX:
            raise invalid_input("idToken is too long.", "idToken")
        if nonce is not None and not 1 <= len(nonce) <= 512:
            raise invalid_input("nonce must be 1 to 512 characters.", "nonce")
        try:
            claims = await provider.verify(
                id_token, audiences=provider.config.audiences, nonce=nonce, hashed_nonce=True
            )
            identity = vetted(provider.identity(claims, name=shown_name(name)))
        except TokenRejected as exc:
            log.info("identity provider %s: an ID token refused: %s", provider_id, exc.reason)
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                f"This ID token is not valid for {provider.config.name}.",
                field="idToken",
            ) from None
        except ProviderUnreachable as exc:
            log.warning("identity provider %s: %r", provider_id, str(exc))
            raise provider_error(provider.config.name) from None
        if nonce is not None and claims.get("nonce") == nonce and _SHA256_HEX.fullmatch(nonce):
            # The token carries a SHA-256, and the nonce given is that hash, not what it is
            # the hash of: someone who saw the token, not the app that made the nonce.
            log.info("identity provider %s: an ID token refused: its nonce's hash", provider_id)
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                "nonce must be the raw nonce the app made, not the SHA-256 the token carries.",
                field="nonce",
            )
        now = self.clock.now()
        if claims["exp"] > (now + ID_TOKEN_LONGEST).timestamp():
            log.info("identity provider %s: an ID token refused: expires too late", provider_id)
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                f"This ID token is not valid for {provider.config.name}.",
                field="idToken",
            )
        expires = datetime.fromtimestamp(claims["exp"], tz=now.tzinfo) + CLOCK_SKEW
        try:
            async with self.statements.standalone() as tx:
                await tx.execute(
                    _SPEND_ID_TOKEN, {"token_hash": spent_digest(id_token), "expires_at": expires}
                )
        except UniqueViolation:
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN, "This ID token was used already.", field="idToken"
            ) from None
        return await self.sign_in(identity, client)

    # -- the account decisions ---------------------------------------------------------

    async def sign_in(
        self, identity: ProvenIdentity, client: ClientInfo, *, counted: bool = False
    ) -> IssuedSession | IssuedChallenge:
        """The account decisions for a proven identity (`counted`: its `login_account`
        hit was taken already, before what proved it was spent)."""
        if not counted:
            await self.count(identity)
        try:
            issued = await self._decide(identity, client)
        except (UniqueViolation, _Changed):
            # A first sign-in of the same identity (or address) raced this one and won, or
            # the link it found changed (unlinked, its account deleted) before the
            # account's lock was had: decided again, on what is there now.
            issued = await self._decide(identity, client)
        self.outbox.wake()
        return issued

    async def count(self, identity: ProvenIdentity) -> None:
        """A proven identity's sign-in against `login_account`, under a key of the provider
        account (RATE_LIMITED over it)."""
        await self.limiter.hit("login_account", identity_key(identity))

    async def _decide(
        self, identity: ProvenIdentity, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        config = self.providers.get(identity.provider).config
        now = self.clock.now()
        async with self.events.transaction(self.statements) as tx:
            linked = await tx.first(
                _IDENTITY, {"provider": identity.provider, "subject": identity.subject}
            )
            if linked is not None:
                await self.sessions.lock_user(tx, linked["user_id"], exclusive=True)
                # Read again under the account's lock: an unlink or a deletion may have
                # committed in between (both take that lock first).
                again = await tx.first(
                    _IDENTITY, {"provider": identity.provider, "subject": identity.subject}
                )
                if again is None or again["user_id"] != linked["user_id"]:
                    raise _Changed
                await tx.execute(
                    _USED_IDENTITY,
                    {
                        "identity_id": linked["id"],
                        "now": now,
                        "email": identity.email,
                        "name": identity.name,
                    },
                )
                return await self.conclusion.conclude(
                    tx,
                    linked["user_id"],
                    amr=AMR_FEDERATED,
                    client=client,
                    verify_address=True,
                    address_required=True,
                )
            if identity.email is None:
                raise AuthFailure(
                    ErrorCode.PROVIDER_ERROR,
                    f"{config.name} did not share an email address; allow it to, or sign in"
                    " another way.",
                )
            try:
                address = parse_email(identity.email)
            except AuthFailure:
                raise AuthFailure(
                    ErrorCode.PROVIDER_ERROR,
                    f"{config.name} gave an address that cannot receive mail.",
                ) from None
            trusted = identity.email_verified and config.trust_email_verified
            holder = await tx.first(ADDRESS_HOLDER, {"email": address.normalized})
            if holder is not None and holder["email_verified_at"] is None:
                # A signup that never proved the address and never signed in yields it,
                # once its codes have expired (as to a new signup).
                dropped = await tx.execute(
                    DROP_ABANDONED_SIGNUP,
                    {
                        "uid": holder["id"],
                        "abandoned_before": now - self.conclusion.challenges.email_lifetime,
                    },
                )
                if dropped:
                    await self.events.user_deleted(tx, holder["id"], reason="abandoned_signup")
                holder = None if dropped else holder
                if holder is not None and not trusted:
                    # A pending signup, to a party no provider vouched for: the answer a
                    # new unvouched address gets (a code to prove it), and as for a
                    # signup on a pending address, no mail goes out: whether an address
                    # has a pending signup is not told to whoever typed it.
                    return await self.conclusion.challenges.open_email(
                        tx,
                        purpose=ch.VERIFY_EMAIL,
                        user=None,
                        address=address.normalized,
                        amr=AMR_FEDERATED,
                        client=client,
                    )
            if holder is None:
                user_id = uuid.uuid4()
                await tx.execute(
                    _ADD_USER,
                    {
                        "uid": user_id,
                        "email": address.address,
                        "email_normalized": address.normalized,
                        "verified_at": now if trusted else None,
                        "signup_locale": preferred_language(client.accept_language),
                        "now": now,
                    },
                )
                await self.events.record(
                    tx,
                    EventKind.SIGNUP,
                    user_id=user_id,
                    client=client,
                    details={"provider": identity.provider},
                    webhook={"email": address.address, "email_verified": bool(trusted)},
                )
                if trusted:
                    await self.events.record(
                        tx,
                        EventKind.EMAIL_VERIFIED,
                        user_id=user_id,
                        client=client,
                        webhook={"email": address.address},
                    )
                await self._add_identity(tx, user_id, identity, now)
                # An address the provider did not vouch for is proven here first.
                return await self.conclusion.conclude(
                    tx,
                    user_id,
                    amr=AMR_FEDERATED,
                    client=client,
                    verify_address=True,
                    address_required=True,
                )
            if not trusted or holder["email_verified_at"] is None:
                raise AuthFailure(
                    ErrorCode.EMAIL_TAKEN,
                    f"An account with this email address already exists. Sign in to it, then"
                    f" link {config.name} from your account settings.",
                )
            await self.sessions.lock_user(tx, holder["id"], exclusive=True)
            if (
                await tx.first(
                    _IDENTITY, {"provider": identity.provider, "subject": identity.subject}
                )
                is not None
            ):
                # A first sign-in of this same identity, in parallel, linked it since it
                # was looked for above: decided again, it is found linked.
                raise _Changed
            if (
                await tx.first(
                    _IDENTITY_OF_USER, {"uid": holder["id"], "provider": identity.provider}
                )
                is not None
            ):
                # One per user and provider: another account of this provider is linked
                # (the user's former one, say), and is not replaced behind their back.
                raise AuthFailure(
                    ErrorCode.EMAIL_TAKEN,
                    f"The account with this email address has another {config.name} account"
                    f" linked. Sign in with that one, or sign in another way and unlink it"
                    f" from your account settings first.",
                )
            await self._add_identity(tx, holder["id"], identity, now)
            await self._linked(tx, holder["id"], identity, config.name, client)
            return await self.conclusion.conclude(
                tx, holder["id"], amr=AMR_FEDERATED, client=client, verify_address=True
            )

    async def _add_identity(
        self, tx: Runner, user_id: uuid.UUID, identity: ProvenIdentity, now: datetime
    ) -> None:
        await tx.execute(
            _ADD_IDENTITY,
            {
                "identity_id": uuid.uuid4(),
                "uid": user_id,
                "provider": identity.provider,
                "subject": identity.subject,
                "email": identity.email,
                "name": identity.name,
                "now": now,
            },
        )

    async def _linked(
        self,
        tx: Runner,
        user_id: uuid.UUID,
        identity: ProvenIdentity,
        name: str,
        client: ClientInfo,
    ) -> None:
        user = await tx.first(USER_BY_ID, {"user_id": user_id})
        assert user is not None  # noqa: S101 - locked by the caller
        await self.notices.send(
            tx,
            user_id=user_id,
            email=user["email"],
            template="identity_linked",
            client=client,
            provider=name,
            # Which provider account: the owner tells their own from a stranger's.
            account=identity.email,
        )
        await self.events.record(
            tx,
            EventKind.IDENTITY_LINKED,
            user_id=user_id,
            client=client,
            details={"provider": identity.provider},
        )

    # -- linking from the account ------------------------------------------------------

    async def link(
        self,
        identity: ProvenIdentity,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        client: ClientInfo,
    ) -> IssuedSession:
        config = self.providers.get(identity.provider).config
        now = self.clock.now()
        try:
            async with self.events.transaction(self.statements) as tx:
                user = await self.sessions.lock_user(tx, user_id, exclusive=True)
                if user is None or not user["is_active"]:
                    raise AuthFailure(
                        ErrorCode.INVALID_TOKEN, "This session has ended; sign in again."
                    )
                session = await tx.first(
                    _LOCK_OWN_LIVE_SESSION, {"session_id": session_id, "uid": user_id, "now": now}
                )
                if session is None:
                    raise AuthFailure(
                        ErrorCode.INVALID_TOKEN, "This session has ended; sign in again."
                    )
                linked = await tx.first(
                    _IDENTITY, {"provider": identity.provider, "subject": identity.subject}
                )
                if linked is not None and linked["user_id"] != user_id:
                    raise AuthFailure(
                        ErrorCode.IDENTITY_ALREADY_LINKED,
                        f"That {config.name} account is linked to another user.",
                    )
                if linked is None:
                    own = await tx.first(
                        _IDENTITY_OF_USER, {"uid": user_id, "provider": identity.provider}
                    )
                    if own is not None:
                        raise invalid_input(
                            f"Your account already has a {config.name} account linked;"
                            " unlink it first.",
                            "provider",
                        )
                    await self._add_identity(tx, user_id, identity, now)
                    await self._linked(tx, user_id, identity, config.name, client)
                else:
                    await tx.execute(
                        _USED_IDENTITY,
                        {
                            "identity_id": linked["id"],
                            "now": now,
                            "email": identity.email,
                            "name": identity.name,
                        },
                    )
                current = await tx.first(USER_BY_ID, {"user_id": user_id})
                assert current is not None  # noqa: S101 - locked above
                refresh = new_opaque_token()
                await self.sessions.replace_refresh_token(tx, session_id, refresh, now)
                issued = await self.sessions.issue(
                    user_view(current),
                    session_id,
                    session["amr"].split(),
                    refresh,
                    client,
                    auth_time=session["auth_time"],
                    reason="refresh",
                )
        except UniqueViolation as violation:
            if "user_id_provider" in str(violation):
                # A link of another account of this provider to the same user won a race.
                raise invalid_input(
                    f"Your account already has a {config.name} account linked; unlink it first.",
                    "provider",
                ) from None
            raise AuthFailure(
                ErrorCode.IDENTITY_ALREADY_LINKED,
                f"That {config.name} account is linked to another user.",
            ) from None
        self.outbox.wake()
        return issued

    async def unlink(
        self, *, user: UserView, claims: AccessClaims, provider_id: str, client: ClientInfo
    ) -> UserView:
        """unlinkIdentity (a recent sign-in): refused where no other way in would be left:
        a password, a passkey, another identity, or the emailed code to a verified address."""
        self.sessions.require_recent(claims)
        config = self.providers.get(provider_id).config
        async with self.events.transaction(self.statements) as tx:
            locked = await self.sessions.lock_user(tx, user.id, exclusive=True)
            if locked is None:
                raise AuthFailure(ErrorCode.INVALID_TOKEN, "This session has ended; sign in again.")
            own = await tx.first(_IDENTITY_OF_USER, {"uid": user.id, "provider": provider_id})
            if own is None:
                raise invalid_input(f"No {config.name} account is linked to yours.", "provider")
            current = await tx.first(USER_BY_ID, {"user_id": user.id})
            assert current is not None  # noqa: S101 - locked above
            others = await tx.scalars(_COUNT_IDENTITIES, {"uid": user.id})
            passkeys = await tx.scalars(_COUNT_PASSKEYS, {"uid": user.id})
            ways_in = (
                bool(current["has_password"])
                or passkeys[0] > 0
                or others[0] > 1
                or current["email_verified_at"] is not None
            )
            if not ways_in:
                raise invalid_input(
                    f"{config.name} is the only way into this account: set a password or add a"
                    " passkey first.",
                    "provider",
                )
            await tx.execute(_DROP_IDENTITY, {"identity_id": own["id"]})
            # Whoever signed in through that provider account (taken over, say) is out
            # too: every other session a provider sign-in opened ends (which provider's is
            # not kept on a session, so any provider's); the asking session goes on.
            await self.sessions.lock_sessions(tx, user.id)
            ended = await tx.scalars(
                _END_FEDERATED_SESSIONS,
                {"uid": user.id, "keep": claims.session_id, "now": self.clock.now()},
            )
            await self.events.sessions_ended(tx, user.id, ended, "identity_unlinked")
            await self.notices.send(
                tx,
                user_id=user.id,
                email=current["email"],
                template="identity_unlinked",
                client=client,
                provider=config.name,
            )
            await self.events.record(
                tx,
                EventKind.IDENTITY_UNLINKED,
                user_id=user.id,
                session_id=claims.session_id,
                client=client,
                details={"provider": provider_id},
            )
        self.outbox.wake()
        return user_view(current)

    async def identities_of(self, user_id: uuid.UUID) -> list[LinkedIdentityView]:
        async with self.statements.connection() as conn:
            rows = await conn.all(_LIST_IDENTITIES, {"uid": user_id})
        return [
            LinkedIdentityView(
                provider=row["provider"],
                email=row["email"],
                name=row["name"],
                linked_at=row["created_at"],
                last_used_at=row["last_used_at"],
            )
            for row in rows
        ]


def vetted(identity: ProvenIdentity) -> ProvenIdentity:
    """What a provider said, as it may be kept (a provider may be odd, compromised, or let
    its users write what they like): TokenRejected for a subject holding a control or
    format character (it names the account, so it is never altered); an address holding
    one is no address (a linked identity keeps the one it had; a new one has none to go
    by); a name loses them (a NUL would fail the write; an escape or an override would
    show something else than it is)."""
    if _has_refused(identity.subject):
        raise TokenRejected("sub holds control or format characters")
    email = identity.email
    if email is not None and _has_refused(email):
        email = None
    return dataclasses.replace(
        identity,
        email=email,
        email_verified=identity.email_verified and email is not None,
        name=shown_name(identity.name),
    )


def shown_name(text: str | None) -> str | None:
    """A name without control or format characters (whitespace ones become spaces),
    runs of spaces made one, at most NAME_MAX characters; None where nothing is left."""
    if not text:
        return None
    kept = "".join(
        " " if char.isspace() else char
        for char in text
        if char.isspace() or unicodedata.category(char) not in _REFUSED_CATEGORIES
    )
    return " ".join(kept.split())[:NAME_MAX] or None


def _has_refused(text: str) -> bool:
    return any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in text)


def spent_digest(id_token: str) -> bytes:
    """What a spent ID token is remembered by: the digest of what its provider signed (the
    header and the claims), not of the whole string. An ECDSA signature has a twin (s and
    n - s) that anyone holding the token can write and that verifies just the same; what
    was signed cannot be written another way (the signature covers those exact bytes)."""
    return token_digest(id_token.rpartition(".")[0])


def identity_key(identity: ProvenIdentity) -> str:
    digest = hashlib.sha256(identity.subject.encode("utf-8")).hexdigest()[:32]
    return f"identity:{identity.provider}:{digest}"


def provider_error(name: str) -> AuthFailure:
    return AuthFailure(ErrorCode.PROVIDER_ERROR, f"{name} cannot be reached right now; try again.")
