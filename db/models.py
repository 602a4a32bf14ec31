"""The tables. Timestamps that logic compares come from the injected clock."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base, UTCDateTime

USER_AGENT_MAX = 512
IP_MAX = 45  # the longest textual IPv6 address


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # As the user typed it (trimmed, NFC); mail goes here.
    email: Mapped[str] = mapped_column(String(254))
    # What uniqueness and look-ups use; the database enforces it.
    email_normalized: Mapped[str] = mapped_column(String(254), unique=True)
    # NULL for an account without a password (it signs in by emailed code): see
    # User.hasPassword. "!..." is a password nobody knows (one that must not be trusted).
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    # When the password was last set by a change or reset (not by a hash upgrade): a
    # sign-in whose password check came before it opens no session.
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    email_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Device tokens carry it: logout everywhere and a password reset raise it, which ends
    # every device token issued before.
    device_epoch: Mapped[int] = mapped_column(Integer, server_default="0")
    # The WebAuthn user handle passkeys carry: 64 random bytes, never the email or the id
    # (an authenticator may show or sync it). Assigned at the first passkey registration.
    webauthn_user_handle: Mapped[bytes | None] = mapped_column(
        LargeBinary(64), default=None, unique=True
    )
    # The user's own profile (updateProfile): a JSON object as compact text, at most 4 KiB;
    # NULL for {}. And the language of the user's mails (a BCP 47 tag among the server's);
    # NULL: the server's default.
    profile_json: Mapped[str | None] = mapped_column(Text, default=None)
    locale: Mapped[str | None] = mapped_column(String(35), default=None)
    # The language the signup request asked for (its Accept-Language, among the mail
    # languages): the mails' language while `locale` is unset. NULL: DEFAULT_LOCALE.
    signup_locale: Mapped[str | None] = mapped_column(String(35), default=None)

    sessions: Mapped[list[UserSession]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )


class UserSession(Base):
    """One sign-in; its refresh tokens are one rotating family."""

    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_user_id_revoked_at", "user_id", "revoked_at"),
        Index("ix_sessions_user_id_network_device", "user_id", "network", "device"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the session ends unless refreshed: at most SESSION_IDLE_TIMEOUT ahead of the
    # last use, never past absolute_expires_at. Every liveness check reads this column.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The absolute end (REFRESH_TOKEN_EXPIRE_DAYS after sign-in): no refresh extends it.
    absolute_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the user last proved a credential on this session (password, emailed code,
    # TOTP or recovery code; sign-in or reauthenticate, never a refresh): the access
    # token's auth_time, and what step-up (REAUTH_WINDOW) is judged by.
    auth_time: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoke_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_MAX), default=None)
    ip: Mapped[str | None] = mapped_column(String(IP_MAX), default=None)
    # How the user proved who they are: RFC 8176 values, space-separated (like a scope).
    amr: Mapped[str] = mapped_column(String(64), default="pwd")
    # What "a new device" is judged by: the user agent's family ("Firefox on Linux") and
    # the network (IPv4 /24, IPv6 /48) the session started from.
    device: Mapped[str | None] = mapped_column(String(64), default=None)
    network: Mapped[str | None] = mapped_column(String(64), default=None)

    user: Mapped[User] = relationship(back_populates="sessions")
    refresh_tokens: Mapped[list[RefreshToken]] = relationship(
        back_populates="session", cascade="all, delete-orphan", passive_deletes=True
    )


class RefreshToken(Base):
    """One generation of a session's refresh token, kept (as a digest) until the session ends,
    so that reuse of any spent generation is recognised."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        Index("ix_refresh_tokens_session_id_generation", "session_id", "generation", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(Integer)
    # SHA-256 of the token: a 256-bit random token needs no salt or slow hash.
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    session: Mapped[UserSession] = relationship(back_populates="refresh_tokens")


class TotpCredential(Base):
    """A user's authenticator secret: pending until confirmed, then two-factor is on."""

    __tablename__ = "totp_credentials"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    # Fernet token (ENCRYPTION_KEYS): a database dump alone yields no working code.
    secret_sealed: Mapped[str] = mapped_column(String(255))
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The last accepted time step: no step at or before it is accepted again.
    last_step: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RecoveryCode(Base):
    """A single-use recovery code, stored as an argon2id hash."""

    __tablename__ = "recovery_codes"
    __table_args__ = (Index("ix_recovery_codes_user_id_lookup", "user_id", "lookup"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # 16 bits of a keyed hash of the code: picks the one hash to verify, reveals ~nothing.
    lookup: Mapped[int] = mapped_column(Integer)
    code_hash: Mapped[str] = mapped_column(String(255))
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Challenge(Base):
    """A pending step: a TOTP code after a password, or an emailed code (verification,
    sign-in, password reset). One for an unknown address (user_id NULL) looks the same
    from outside and never succeeds."""

    __tablename__ = "challenges"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # SHA-256 of the challenge token (256 random bits).
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    purpose: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Factors proven before this step (RFC 8176), and the client that started it.
    amr: Mapped[str] = mapped_column(String(64), default="pwd")
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_MAX), default=None)
    ip: Mapped[str | None] = mapped_column(String(IP_MAX), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Emailed codes: HMAC-SHA-256 of the current code under a key derived from SECRET_KEY
    # with this challenge's id as context; how often it was re-sent, and when last.
    code_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), default=None)
    resends: Mapped[int] = mapped_column(Integer, server_default="0")
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # A change of address: the new address, where the code went (CHANGE_EMAIL).
    new_email: Mapped[str | None] = mapped_column(String(254), default=None)
    # ... and the session that asked for it, which must still be live to complete it.
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    # The normalized address the challenge was opened for (an emailed code's): wrong
    # codes count per account and client, and an unknown address counts like a known one.
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    # Asked for by one of the account's own clients (a device token good for it, or a
    # network it signed in from lately): the address's code lockout, which strangers can
    # hold shut, does not hold its code up (its token went to that client only).
    owner_client: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # A password reset waiting for its TOTP step: the new password's hash.
    pending_password_hash: Mapped[str | None] = mapped_column(String(255), default=None)


class Passkey(Base):
    """A WebAuthn credential (a passkey) registered to a user: its public key, never
    anything secret (the private key never leaves the authenticator)."""

    __tablename__ = "passkeys"
    __table_args__ = (Index("ix_passkeys_user_id_created_at", "user_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The authenticator's credential ID (at most 1023 bytes): what a sign-in names, looked
    # up by the unique index, across all users.
    credential_id: Mapped[bytes] = mapped_column(LargeBinary(1023), unique=True)
    # The COSE public key, as the authenticator gave it.
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    # The authenticator's signature counter (0 for synced passkeys, which do not count).
    sign_count: Mapped[int] = mapped_column(BigInteger)
    # The authenticator's make (all zeroes where it does not say).
    aaguid: Mapped[str] = mapped_column(String(36))
    # How the browser can reach it ("internal hybrid usb"), space-separated.
    transports: Mapped[str | None] = mapped_column(String(255), default=None)
    # The WebAuthn flags: may be synced (BE), and is synced now (BS; may change at sign-in).
    backup_eligible: Mapped[bool] = mapped_column(Boolean)
    backed_up: Mapped[bool] = mapped_column(Boolean)
    # "platform" or "cross-platform", where the browser said; and whether the user was
    # verified (PIN, biometrics) at registration.
    attachment: Mapped[str | None] = mapped_column(String(16), default=None)
    user_verified: Mapped[bool] = mapped_column(Boolean)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class UserRole(Base):
    """A role an operator granted a user (`strawgate users roles add`): access tokens carry
    the user's roles as the "roles" claim, from the next sign-in or refresh."""

    __tablename__ = "user_roles"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Who granted it (the operator's name, as the events name them).
    granted_by: Mapped[str] = mapped_column(String(128))


class Identity(Base):
    """A provider account linked to a user (Google, Apple, GitHub, ...): signing in with it
    signs in to this user. One per provider and subject, and one per user and provider."""

    __tablename__ = "identities"
    __table_args__ = (
        Index("ix_identities_provider_subject", "provider", "subject", unique=True),
        Index("ix_identities_user_id_provider", "user_id", "provider", unique=True),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The provider's id as configured (IDENTITY_PROVIDERS__<ID>), and its subject (`sub`,
    # GitHub's numeric user id): what the provider account is known by.
    provider: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(255))
    # What the provider said at the last sign-in, for the user's own list (never decides
    # anything after the first: the subject does).
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    # The name given at the first consent (Apple sends it once), kept.
    name: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class IdentityFlow(Base):
    """One web redirect through a provider (GET /auth/<provider>/authorize), then its result
    waiting for exchangeSignInCode. Holds digests only: the state, the browser's binding
    cookie and the one-time code travel in URLs and cookies; the nonce and the PKCE verifier
    sent to the provider are derived from the state (a key of the server's), never stored."""

    __tablename__ = "identity_flows"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # SHA-256 of the `state` sent to the provider (256 random bits).
    state_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    # SHA-256 of the browser binding (the strawgate_oauth cookie) that started it.
    browser_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    provider: Mapped[str] = mapped_column(String(32))
    # SIGN_IN, or LINK (startIdentityLink: the user and the session that asked).
    purpose: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), default=None, index=True
    )
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    # One of AUTH_REDIRECT_URLS, and the app's PKCE challenge (S256) for the exchange.
    redirect_to: Mapped[str] = mapped_column(String(2048))
    # Unique: a challenge serves one flow (one copied from a victim's URL starts none).
    code_challenge: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The provider step must come back by then; the state is spent when it does.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    returned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Once the provider step succeeded: SHA-256 of the one-time code (60 s, single use)
    # and who the provider said signed in.
    code_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), default=None, unique=True)
    code_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    subject: Mapped[str | None] = mapped_column(String(255), default=None)
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    email_verified: Mapped[bool] = mapped_column(Boolean, server_default=false())
    name: Mapped[str | None] = mapped_column(String(255), default=None)
    exchanged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class SpentIdToken(Base):
    """An ID token signInWithIdToken took: its SHA-256, kept until the token expires, so
    that no token signs in twice."""

    __tablename__ = "spent_id_tokens"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class OutboxMail(Base):
    """A mail to send, written in the transaction that causes it. Pending while
    next_attempt_at is set; a sender leases it (claimed_until) rather than holding a
    transaction open across the SMTP exchange."""

    __tablename__ = "outbox"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # The account that caused the mail (no foreign key: a last notice outlives it). Mail
    # belongs to an account, not to an address: an address changes hands.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None, index=True)
    recipient: Mapped[str] = mapped_column(String(254))
    template: Mapped[str] = mapped_column(String(64))
    # JSON: what the template shows, nothing secret.
    context: Mapped[str] = mapped_column(Text)
    # JSON of the secrets (a code), Fernet-encrypted (ENCRYPTION_KEYS); erased once the
    # mail is sent or the secret has expired.
    secrets_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    secrets_expire_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # Set while the mail waits to be sent; NULL once sent or given up.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claim_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(String(255), default=None)
    # The language the mail is written in (one of the mail languages), chosen when it is
    # queued; NULL: DEFAULT_LOCALE.
    language: Mapped[str | None] = mapped_column(String(35), default=None)


class WebhookEvent(Base):
    """One webhook event (db/webhooks), written in the transaction of the change it reports:
    it exists exactly when the change committed. `payload` is the body every endpoint gets,
    never a secret."""

    __tablename__ = "webhook_events"

    # Increasing in insertion order: the order each endpoint receives its events in.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # The `webhook-id` receivers deduplicate by ("msg_" and its hex), the same on every retry.
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    type: Mapped[str] = mapped_column(String(64))
    # No foreign key: user.deleted outlives the account.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None, index=True)
    # JSON, Standard Webhooks' shape: {"type", "timestamp", "data"}.
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # PostgreSQL: the id of the transaction that wrote it (pg_current_xact_id()); an
    # event is handed out only once no transaction that began before it is still open, so
    # one committed later with a lower seq is never overtaken. NULL on SQLite (one writer).
    txid: Mapped[int | None] = mapped_column(BigInteger, default=None)


class WebhookDelivery(Base):
    """One event to one endpoint: pending while next_attempt_at is set; a dispatcher leases
    it (claimed_until, claim_id) rather than holding a transaction open across the request.
    Delivered (delivered_at), or given up (failed_at: the dead letter, which
    `strawgate webhooks replay` sends again)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # Each endpoint's pending deliveries in order: the head is the next to send.
        Index(
            "ix_webhook_deliveries_pending",
            "endpoint",
            "event_seq",
            postgresql_where=text("next_attempt_at IS NOT NULL"),
            sqlite_where=text("next_attempt_at IS NOT NULL"),
        ),
    )

    event_seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("webhook_events.seq", ondelete="CASCADE"),
        primary_key=True,
    )
    # The endpoint's URL, as configured in WEBHOOK_ENDPOINTS.
    endpoint: Mapped[str] = mapped_column(String(2048), primary_key=True)
    # When it was queued, or queued again (`strawgate webhooks replay`): WEBHOOK_GIVE_UP_HOURS
    # count from here.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claim_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The last answer's HTTP status (NULL: none, e.g. a timeout) and what went wrong.
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(String(255), default=None)


class SecurityEvent(Base):
    """One security-relevant event (append-only): never a secret."""

    __tablename__ = "security_events"
    __table_args__ = (Index("ix_security_events_user_id_id", "user_id", "id"),)

    # Increasing: the cursor of the user's newest-first pages.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    # No foreign keys: the trail outlives what it mentions.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    ip: Mapped[str | None] = mapped_column(String(IP_MAX), default=None)
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_MAX), default=None)
    # For a failed login: the normalized email, only when it is a valid address.
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    # JSON: what else is worth knowing (a reason, a count), never a secret.
    details: Mapped[str | None] = mapped_column(Text, default=None)


class LoginThrottle(Base):
    """Failure counts under a key: failed sign-ins per normalized email, registered or
    not (the lockout's steps: db/services/lockout.py), and wrong codes per account and
    client ("otp:<user id>:<client>": the window's start in last_failure_at)."""

    __tablename__ = "login_throttles"

    email: Mapped[str] = mapped_column(String(254), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Sign-ins whose password is being checked right now (reserved before the hash), and
    # when the last was reserved: with the failures they are held under the threshold,
    # so parallel guesses cannot outrun the lockout. Stale after a minute (a process that
    # died mid-check).
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")
    in_flight_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
