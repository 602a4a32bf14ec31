"""Configuration from the environment (and an optional `.env`), read with pydantic-settings."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import logging
import math
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from db.security.jwks import ASYMMETRIC_ALGORITHMS, KeySetError, SigningKey, load_keys
from db.security.passwords import usable_cpus
from db.security.tokens import derive_key

log = logging.getLogger("strawgate.settings")

# The value `.env.example` ships with; production refuses to start with it.
SECRET_KEY_PLACEHOLDER = "change-me-to-a-random-string-of-at-least-32-characters"  # noqa: S105
MIN_SECRET_KEY_LENGTH = 32
# What makes a SECRET_KEY guessable (see secret_key_weakness): words of placeholders and
# examples, fewer distinct characters than this, less Shannon entropy per character than
# this (estimated from the key's own character frequencies: a random hex key has about
# 3.6 bits, a random url-safe one over 4.5), or at least this share of neighbouring
# characters equal or consecutive ("aaaa", "abcd", "4321"). A million random 32-character
# hex keys all pass these bounds.
PLACEHOLDER_WORDS = (
    "change-me",
    "change_me",
    "changeme",
    "example",
    "secret-key",
    "secret_key",
    "placeholder",
)
MIN_SECRET_KEY_DISTINCT = 8
MIN_SECRET_KEY_BITS_PER_CHARACTER = 2.5
MAX_SECRET_KEY_RUN_SHARE = 0.75
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/strawgate.db"
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "ES256", "RS256")


class ConfigError(RuntimeError):
    """The configuration cannot run safely; the message says which setting and why."""


def secret_key_weakness(key: str) -> str | None:
    """Why a SECRET_KEY is guessable ("must be at least 32 characters long", ...), or None."""
    if len(key) < MIN_SECRET_KEY_LENGTH:
        return f"must be at least {MIN_SECRET_KEY_LENGTH} characters long"
    if key == SECRET_KEY_PLACEHOLDER:
        return "is still the .env.example placeholder"
    lowered = key.lower()
    for word in PLACEHOLDER_WORDS:
        if word in lowered:
            return f'looks like a placeholder (it contains "{word}")'
    if len(set(key)) < MIN_SECRET_KEY_DISTINCT:
        return f"has fewer than {MIN_SECRET_KEY_DISTINCT} different characters"
    if key in (key + key)[1:-1]:
        return "is one shorter text repeated"
    counts = Counter(key).values()
    bits = -sum(n / len(key) * math.log2(n / len(key)) for n in counts)
    if bits < MIN_SECRET_KEY_BITS_PER_CHARACTER:
        return (
            f"is low in entropy (under {MIN_SECRET_KEY_BITS_PER_CHARACTER} bits a character"
            " by its character frequencies)"
        )
    runs = sum(1 for a, b in itertools.pairwise(key) if abs(ord(a) - ord(b)) <= 1)
    if runs >= MAX_SECRET_KEY_RUN_SHARE * (len(key) - 1):
        return "is mostly runs of repeated or consecutive characters (like aaaa or 1234)"
    return None


def generate_secret_key() -> str:
    """A new SECRET_KEY: 64 url-safe characters (384 random bits) that production accepts."""
    while True:
        key = secrets.token_urlsafe(48)
        if secret_key_weakness(key) is None:
            return key


def generate_encryption_key() -> str:
    """A new Fernet key for ENCRYPTION_KEYS."""
    return Fernet.generate_key().decode("ascii")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = timedelta(days=3650)


def parse_duration(value: object) -> timedelta:
    """A duration as operators write one: "14d", "12h", "30m", "90s", or plain seconds;
    0 turns the rule off where the setting says so."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (text := value.strip().lower()):
        unit = _DURATION_UNITS.get(text[-1])
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            raise ValueError(f"not a duration: {value!r} (e.g. 14d, 12h, 30m, 90s)") from None
    else:
        raise ValueError(f"not a duration: {value!r} (e.g. 14d, 12h, 30m, 90s)")
    if not 0 <= seconds <= MAX_DURATION.total_seconds():  # NaN and infinities too
        raise ValueError(f"a duration from 0 to {MAX_DURATION.days} days: {value!r}")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


# libpq's sslmode values, which asyncpg's ssl takes as they are (the same TLS checks).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_POSTGRES_OPTIONS = frozenset(
    {"ssl", "target_session_attrs", "host", "prepared_statement_cache_size"}
)
# libpq's certificate options: asyncpg reads these from the environment only.
_LIBPQ_FILE_OPTIONS = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}
_DATABASE_URL_EXAMPLE = (
    "e.g. postgresql://user:password@host:5432/strawgate or sqlite:///./var/strawgate.db"
)


def normalize_database_url(value: str) -> str:
    """DATABASE_URL as it runs (postgres:// on asyncpg, sslmode as ssl); ValueError otherwise."""
    text = value.strip()
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ValueError(f"DATABASE_URL is not a database URL ({_DATABASE_URL_EXAMPLE})") from None
    driver = url.drivername.lower()
    backend = driver.partition("+")[0]
    if driver == "sqlite+aiosqlite":
        return text
    if driver == "sqlite":
        return _render(url.set(drivername="sqlite+aiosqlite"))
    if backend == "sqlite":
        raise ValueError(
            f"DATABASE_URL: the driver {driver} is not supported: write sqlite:///path"
            " (Strawgate runs SQLite on aiosqlite)"
        )
    if backend in ("postgres", "postgresql") and driver not in (
        "postgres",
        "postgresql",
        "postgresql+asyncpg",
    ):
        raise ValueError(
            f"DATABASE_URL: the driver {driver} is not supported: write postgresql://"
            " (Strawgate runs PostgreSQL on asyncpg)"
        )
    if backend not in ("postgres", "postgresql"):
        raise ValueError(
            f"DATABASE_URL: {backend} is not supported, only PostgreSQL or SQLite"
            f" ({_DATABASE_URL_EXAMPLE})"
        )
    query = dict(url.query)
    if any(isinstance(item, tuple) for name, item in query.items() if name != "host"):
        raise ValueError("DATABASE_URL gives an option more than once")
    sslmode = query.pop("sslmode", None)
    if sslmode is not None:
        if query.get("ssl", sslmode) != sslmode:
            raise ValueError("DATABASE_URL sets both sslmode and ssl, differently: keep one")
        query["ssl"] = sslmode
    if query.get("ssl", SSL_MODES[0]) not in SSL_MODES:
        raise ValueError(f"DATABASE_URL: sslmode (or ssl) must be one of {', '.join(SSL_MODES)}")
    binding = query.pop("channel_binding", "prefer")
    if binding == "require":
        raise ValueError(
            "DATABASE_URL: channel_binding=require is not supported by asyncpg (the driver);"
            " remove it to connect without channel binding"
        )
    if binding not in ("disable", "prefer"):
        raise ValueError("DATABASE_URL: channel_binding must be disable, prefer or require")
    if query.get("target_session_attrs", "any") not in _SESSION_ATTRS:
        raise ValueError(
            f"DATABASE_URL: target_session_attrs must be one of {', '.join(_SESSION_ATTRS)}"
        )
    if not str(query.get("prepared_statement_cache_size", "0")).isdigit():
        raise ValueError("DATABASE_URL: prepared_statement_cache_size must be a number")
    for option, variable in _LIBPQ_FILE_OPTIONS.items():
        if option in query:
            raise ValueError(
                f"DATABASE_URL: asyncpg (the driver) takes no {option} in the URL; set"
                f" {variable} in the environment to the file instead"
            )
    for option in ("connect_timeout", "timeout", "command_timeout"):
        if option in query:
            raise ValueError(f"DATABASE_URL: {option} is not read from the URL; set DB_TIMEOUT")
    unknown = sorted(set(query) - _POSTGRES_OPTIONS)
    if unknown:
        raise ValueError(
            f"DATABASE_URL: unsupported option(s) {', '.join(unknown)} (it takes sslmode or"
            " ssl, target_session_attrs, host, prepared_statement_cache_size)"
        )
    if driver == "postgresql+asyncpg" and query == dict(url.query):
        return text
    return _render(url.set(drivername="postgresql+asyncpg", query=query))


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


class RateLimits(BaseModel):
    """Per-operation budgets in the `limits` library's notation ("30/minute", "5 per 15
    minutes"), each set by RATE_LIMITS__<NAME> (e.g. RATE_LIMITS__LOGIN_IP=60/minute).
    _ip: per client address (IPv4 whole, IPv6 by /64); _account: per target account
    (normalized email); _session: per session (refresh family); _challenge: per
    challenge and client; _mail: mails sent per account (over it the answer looks the
    same and no mail goes out)."""

    model_config = ConfigDict(use_attribute_docstrings=True)  # the docs read them

    signup_ip: str = "20/hour"
    """`signup` per client address."""
    login_ip: str = "30/minute"
    """`login`, `finishPasskeyLogin`, `signInWithIdToken` and `exchangeSignInCode` per client
    address."""
    start_passkey_login_ip: str = "30/minute"
    """`startPasskeyLogin`, and `reauthenticate` without a mail (`emailCode: false`), per client
    address (`finishPasskeyLogin` counts as `login`)."""
    login_account: str = "20/minute"
    """`login` and refused `finishPasskeyLogin` answers per target account (normalized email, else
    `passkey:` and the credential ID's digest), or per device token for its holder; provider
    sign-ins per provider account (`identity:<provider>:` and the subject's digest)."""
    verify_otp_ip: str = "30/minute"
    """`verifyOtp` per client address."""
    verify_otp_challenge: str = "5/minute"
    """Code checks (`verifyOtp`, `resetPassword`) per challenge and client (its device token, else
    its address)."""
    refresh_ip: str = "300/minute"
    """`refresh` per client address."""
    refresh_session: str = "60/minute"
    """Rotations per session (a retry inside the reuse interval does not count)."""
    request_login_code_ip: str = "10/hour"
    """`requestLoginCode` per client address."""
    request_password_reset_ip: str = "10/hour"  # noqa: S105 - a rate
    """`requestPasswordReset` per client address."""
    request_email_verification_ip: str = "10/hour"
    """`requestEmailVerification` per client address."""
    code_mail_client: str = "5/hour"
    """Mails carrying a code to one address, per requesting network (IPv4 /24, IPv6 /64). Every code
    mail counts (`signup`, `login` of an unverified account, `requestLoginCode`,
    `requestPasswordReset`, `requestEmailVerification`, `changeEmail`, `reauthenticate`,
    `resendOtp`); over it the answer is the same and no mail goes out."""
    code_mail_account: str = "60/hour"
    """Mails carrying a code to one address from all networks together: the bound on a mail flood to
    an address; over it, the same answer and no mail. It is above ten networks' worth, so
    strangers on fewer networks cannot keep the owner's code from being mailed; the owner's own
    clients (a known network, a device token) are counted but not held to it."""
    resend_otp_ip: str = "20/hour"
    """`resendOtp` per client address."""
    reset_password_ip: str = "20/hour"  # noqa: S105 - a rate
    """`resetPassword` per client address."""
    change_password_ip: str = "20/hour"  # noqa: S105 - a rate
    """`changePassword` per client address."""
    change_password_account: str = "10/hour"  # noqa: S105 - a rate
    """`changePassword` per account."""
    confirm_totp_ip: str = "30/hour"
    """`confirmTotp` per client address."""
    disable_totp_ip: str = "30/hour"
    """`disableTotp` per client address."""
    regenerate_recovery_codes_ip: str = "30/hour"
    """`regenerateRecoveryCodes` per client address."""
    totp_account: str = "20/hour"
    """`confirmTotp`, `disableTotp` and `regenerateRecoveryCodes` per account."""
    change_email_ip: str = "20/hour"
    """`changeEmail` per client address (its code mail counts towards the code-mail budgets too)."""
    change_email_account: str = "10/hour"
    """`changeEmail` per account."""
    delete_account_ip: str = "20/hour"
    """`deleteAccount` per client address."""
    delete_account_account: str = "10/hour"
    """`deleteAccount` per account."""
    export_account_account: str = "10/hour"
    """`exportAccount` per account."""
    update_profile_account: str = "60/hour"
    """`updateProfile` per account."""
    start_identity_sign_in_ip: str = "30/minute"
    """Provider sign-ins and links started (`/auth/<provider>/authorize`, `startIdentityLink`) per
    client address (`exchangeSignInCode` and `signInWithIdToken` count as `login`)."""

    @field_validator("*")
    @classmethod
    def _parses(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"not a rate limit: {value!r} (e.g. 30/minute)") from None
        return value


PROVIDER_ID = re.compile(r"[a-z][a-z0-9_]{0,31}")


class IdentityProviderSettings(BaseModel):
    """One identity provider, `IDENTITY_PROVIDERS__<ID>__<FIELD>` (e.g.
    IDENTITY_PROVIDERS__GOOGLE__CLIENT_ID). The ids `google`, `apple`, `microsoft`, `github`
    and `gitlab` are presets that know their issuer and endpoints; any other id is an OpenID
    Connect provider found by discovery at its `ISSUER`."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    issuer: str | None = None
    """The OpenID Connect issuer (`https://id.example.com`): its
    `/.well-known/openid-configuration` names the endpoints and keys. Required for a provider
    that is not a preset; for `microsoft`, a tenant's
    (`https://login.microsoftonline.com/<tenant id>/v2.0`) instead of any account's (`common`)."""
    name: str | None = None
    """Shown on the sign-in buttons (`identityProviders`). Presets: Google, Apple, Microsoft,
    GitHub, GitLab; others: the id."""
    client_id: str = ""
    """The client (app) id registered at the provider for the web redirect; also an accepted
    `aud` of ID tokens."""
    client_secret: SecretStr | None = None
    """The client secret of the web redirect. Apple: the private key (`.p8` PEM text) of a Sign in
    with Apple key, from which Strawgate signs the client-secret JWT (with `TEAM_ID` and `KEY_ID`),
    renewed before it expires. Unset: this provider takes ID tokens only (native apps)."""
    scopes: str | None = None
    """Space-separated scopes asked for. Presets: their own (`openid email profile`; Apple
    `openid name email`; GitHub `read:user user:email`)."""
    trust_email_verified: bool | None = None
    """Whether the provider's `email_verified` proves the address, so that an identity can sign in
    to the existing account with that address. Presets: true for `google`, `apple` and `github`
    (its emails API's `verified`), false for `microsoft`, `gitlab` and generic providers."""
    native_client_ids: str = ""
    """Comma-separated client ids of the native apps (iOS, Android) whose ID tokens
    `signInWithIdToken` takes: the `aud` those tokens carry, besides `CLIENT_ID`."""
    team_id: str | None = None
    """Apple only: the Apple Developer team id (the client-secret JWT's issuer)."""
    key_id: str | None = None
    """Apple only: the id of the Sign in with Apple key in `CLIENT_SECRET`."""
    api_url: str | None = None
    """GitHub only: the REST API (`https://api.github.com`; GitHub Enterprise Server:
    `https://github.example.com/api/v3`)."""
    web_url: str | None = None
    """GitHub only: where its authorize and token endpoints live (`https://github.com`; GitHub
    Enterprise Server: `https://github.example.com`)."""


def check_webhook_secret(raw: str) -> None:
    """ValueError unless `raw` is a Standard Webhooks secret: whsec_ and the base64 of 24 to
    64 bytes (the message never repeats the secret)."""
    if not raw.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret holds 24 to 64 bytes")


class WebhookEndpointSettings(BaseModel):
    """One endpoint of `WEBHOOK_ENDPOINTS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """Where the events are POSTed: HTTPS to a public address (see `WEBHOOK_ALLOW_PRIVATE`)."""
    secrets: list[SecretStr] = Field(min_length=1)
    """Standard Webhooks secrets (`whsec_` and base64 of 24 to 64 random bytes): every request
    is signed with each (`webhook-signature` holds one signature per secret), so during a
    rotation list the new one beside the old until the receiver has switched."""
    events: list[str] | None = None
    """The event types this endpoint gets (`user.created`, ...); unset: all of them."""

    @field_validator("secrets")
    @classmethod
    def _secrets_are_standard(cls, value: list[SecretStr]) -> list[SecretStr]:
        for secret in value:
            check_webhook_secret(secret.get_secret_value())
        return value

    @field_validator("events")
    @classmethod
    def _events_are_known(cls, value: list[str] | None) -> list[str] | None:
        from db.webhooks.catalogue import EVENT_TYPES

        for event in value or ():
            if event not in EVENT_TYPES:
                raise ValueError(
                    f"unknown webhook event {event!r} (known: {', '.join(EVENT_TYPES)})"
                )
        return value

    def wants(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        env_nested_delimiter="__",
        use_attribute_docstrings=True,  # each field's docstring: its description (the docs)
        # A value that does not parse is never repeated in the error: DATABASE_URL and
        # REDIS_URL may hold a password.
        hide_input_in_errors=True,
    )

    environment: Literal["development", "production"] = "production"
    """`development` or `production`. Production refuses to start without a good `SECRET_KEY`,
    `ENCRYPTION_KEYS`, `MAIL_SERVER` and a public `PRODUCT_URL`, turns GraphiQL, introspection
    and the demo page off and sends `Strict-Transport-Security`; `./scripts/run` sets
    `development`."""
    database_url: str = DEFAULT_DATABASE_URL
    """URL of the database: the embedded SQLite file by default; PostgreSQL as
    `postgresql://user:password@host:5432/database` (`postgres://` and `postgresql+asyncpg://`
    too: it runs on asyncpg). Query options: `sslmode` (or `ssl`: `disable`, `allow`, `prefer`,
    `require`, `verify-ca`, `verify-full`), `target_session_attrs`, `host` (several hosts),
    `prepared_statement_cache_size`; any other is refused at start (certificate files go in
    `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGSSLCRL`; timeouts in `DB_TIMEOUT`). SQLite:
    `sqlite:///path` (or `sqlite+aiosqlite:///path`)."""
    secret_key: SecretStr | None = None
    """At least 32 characters. Keys the refresh-token chain, the digests of emailed codes and the
    device tokens, and signs HS* access tokens (with its UTF-8 bytes). Production refuses a
    missing, short or guessable key: one containing `change-me`, `changeme`, `example`,
    `secret-key` or `placeholder`, with fewer than 8 different characters, one text repeated,
    under 2.5 bits of entropy a character, or mostly runs like `aaaa` or `1234`; make one with
    `strawgate keys generate --secret-key`. Unset in development: a key is generated once, stored in
    `secret_key` (mode 0600) beside the SQLite file and reused, so sessions survive restarts.
    Changing it ends every session and device token."""
    algorithm: str = "HS256"
    """JWT algorithm of the access tokens: `HS256`, `HS384`, `HS512` (keyed with `SECRET_KEY`), or
    `ES256`, `RS256` (private keys in `JWT_KEYS`, public keys at `/.well-known/jwks.json`)."""
    jwt_keys: SecretStr | None = None
    """For `ES256`/`RS256`: a JSON Web Key Set of private keys, inline or a path to a file; the
    first signs, every one verifies. Required with those algorithms (no server starts without a
    usable key); make a key with `strawgate keys generate --alg ES256`."""
    access_token_expire_minutes: int = Field(15, ge=1, le=24 * 60)
    """Access-token lifetime, in minutes."""
    refresh_token_expire_days: int = Field(30, ge=1, le=3650)
    """Absolute session lifetime, in days from sign-in (rotation does not extend it)."""
    refresh_token_reuse_interval: int = Field(10, ge=0, le=300)
    """Seconds in which a just-rotated refresh token presented again gets the same successor (racing
    tabs and retries do not log the user out)."""
    refresh_token_transport: Literal["body", "cookie"] = "body"  # noqa: S105 - a mode
    """Where refresh tokens travel: the answer's body (`body`, mobile apps), or the
    `strawgate_refresh` HttpOnly cookie scoped to `/graphql` that JavaScript never sees
    (`cookie`, browsers; every POST then needs the `X-Requested-With` header and an allowed
    `Origin`: the CSRF defence)."""
    jwt_issuer: str = "strawgate"
    """`iss` of the access tokens, checked on every request."""
    jwt_audience: str = "strawgate"
    """`aud` of the access tokens, checked on every request."""

    # GraphQL edge.
    graphiql: bool | None = None
    """Serve GraphiQL at `GET /graphql`. Unset: on in development, off in production."""
    introspection: bool | None = None
    """Answer introspection queries (and give "did you mean" suggestions). Unset: on in development,
    off in production."""
    max_query_depth: int = Field(10, ge=1)
    """Deepest nesting of selections a GraphQL document may have (in every environment)."""
    max_aliases: int = Field(15, ge=0)
    """Most aliased fields in a GraphQL document."""
    max_query_tokens: int = Field(2000, ge=10)
    """Most tokens in a GraphQL document."""
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    """Larger request bodies get 413 (counted over the streamed body, not taken from
    `Content-Length`)."""
    http_header_timeout: Duration = Field(
        timedelta(seconds=30), gt=timedelta(0), le=timedelta(hours=1)
    )
    """Time for a request's line and headers to arrive whole, counted from the connection's opening
    or, on a kept-alive connection, from the end of the previous response; else the connection is
    closed (with a 408 if part of a request came). A bound on the whole, not on the pauses
    between reads. Only under `strawgate serve` (a bare `uvicorn graph.app:app` gets the body
    bound only)."""
    http_body_timeout: Duration = Field(
        timedelta(seconds=30), gt=timedelta(0), le=timedelta(hours=1)
    )
    """Time for a request's body to arrive whole, counted from the end of its headers; else the
    connection is closed with a 408. A bound on the whole, not on the pauses between reads."""
    http_max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    """Most bytes of a request's line and headers, counted as they arrive (a body does not count):
    past it, 431 and the connection is closed. Only under `strawgate serve`."""

    # Passwords.
    password_min_length: int = Field(8, ge=8, le=256)
    """Shortest password accepted (NIST SP 800-63B: no composition rules; at most 256
    characters)."""
    argon2_memory_cost: int = Field(19 * 1024, ge=8 * 1024)
    """argon2id memory, in KiB (OWASP: 19 MiB). Raising a parameter upgrades each hash at its next
    sign-in."""
    argon2_time_cost: int = Field(2, ge=1)
    """argon2id iterations."""
    argon2_parallelism: int = Field(1, ge=1)
    """argon2id lanes."""
    password_hash_workers: int = Field(default_factory=usable_cpus, ge=1)
    """Password-hashing threads. Unset: the CPUs this process may use. When more than four times
    this many hashes wait, `login` and `signup` answer `RATE_LIMITED` with `retryAfter: 1`
    instead of queueing."""

    # Database.
    db_pool_size: int = Field(40, ge=1)
    """PostgreSQL connections of the request path's pool, per process (plus at most 10 for
    everything else): at least the concurrent requests a process serves, or requests queue for a
    connection; and the pool times workers times instances within the server's `max_connections`."""
    db_timeout: float = Field(5.0, gt=0)
    """Seconds to connect, to wait for a pooled connection or to run a statement before the request
    fails with `SERVICE_UNAVAILABLE`."""
    auto_migrate: bool | None = None
    """Apply pending migrations at start. Unset: on for SQLite only (PostgreSQL is migrated by
    `strawgate migrate`, a deploy step)."""

    # Two-factor.
    encryption_keys: SecretStr | None = None
    """Comma-separated Fernet keys that encrypt the TOTP secrets and the codes waiting in the
    outbox; the first encrypts, every one decrypts (rotate with `strawgate rotate-keys`).
    Required in production; make one with `strawgate keys generate --encryption-key`. Unset in
    development: one is derived from `SECRET_KEY`."""
    totp_issuer: str = "Strawgate"
    """The issuer authenticator apps show."""
    otp_challenge_minutes: int = Field(5, ge=1, le=60)
    """Lifetime of a TOTP challenge (the second step of a sign-in), in minutes."""
    webauthn_rp_id: str | None = Field(None, max_length=253)
    """Passkeys: the relying party ID, the host name passkeys are bound to (`example.com`; a
    passkey made for it also works on its subdomains). Unset: passkeys are off, and their
    operations answer `INVALID_INPUT`. It cannot change later without losing every passkey."""
    webauthn_rp_name: str | None = Field(None, min_length=1, max_length=64)
    """Passkeys: the name authenticators show beside the account. Unset: `PRODUCT_NAME`."""
    webauthn_origins: str = ""
    """Passkeys: the origins a passkey may be used from, comma-separated, each `https://host[:port]`
    whose host is `WEBAUTHN_RP_ID` or a subdomain of it, or an Android app's
    `android:apk-key-hash:<base64url SHA-256 of its signing certificate>`. `http://` only in
    development, and only for `localhost` or a loopback address. Unset: `https://<WEBAUTHN_RP_ID>`."""
    webauthn_related_origins: str = ""
    """Passkeys on several sites (WebAuthn Level 3 related origin requests): comma-separated
    `https://host[:port]` origins on other domains that may use `WEBAUTHN_RP_ID`'s passkeys.
    They are accepted like `WEBAUTHN_ORIGINS` and listed at `/.well-known/webauthn`, which
    browsers fetch from the RP ID's host (serve it there: Strawgate's host must be the RP
    ID's, or proxy that path to Strawgate)."""
    webauthn_android_apps: str = ""
    """Passkeys in Android apps: comma-separated `package.name:SHA256_FINGERPRINT` (the
    signing certificate's SHA-256 as `keytool` prints it, `AB:CD:...`). Each app's
    `android:apk-key-hash:` origin is accepted, and `/.well-known/assetlinks.json` lists them
    (Digital Asset Links: the app may use the RP ID's credentials) where Strawgate serves the
    RP ID's host."""
    webauthn_apple_app_ids: str = ""
    """Passkeys in iOS and macOS apps: comma-separated app IDs (`TEAMID.com.example.app`),
    listed as `webcredentials` at `/.well-known/apple-app-site-association` where Strawgate
    serves the RP ID's host (the app's Associated Domains entitlement names
    `webcredentials:<RP ID>`)."""

    # Identity providers (sign in with Google, Apple, GitHub, ...).
    public_url: str | None = None
    """Strawgate's own external URL (`https://auth.example.com`, no path): the base of the URL
    providers return to, `<PUBLIC_URL>/auth/<provider>/callback`, which is the redirect URL to
    register with each provider. Never derived from a request's Host header. Required with
    `IDENTITY_PROVIDERS`."""
    auth_redirect_urls: str = ""
    """Comma-separated URLs of your apps that a provider sign-in may return to
    (`/auth/<provider>/authorize?redirect_to=...`, `startIdentityLink`): matched exactly (scheme,
    host, port, path and query); anything else is refused with 400 and never redirected to.
    An app's custom scheme (`com.example.app:/auth`) may be listed."""
    identity_providers: dict[str, IdentityProviderSettings] = Field(default_factory=dict)
    """The providers users may sign in with, one group of variables each:
    `IDENTITY_PROVIDERS__<ID>__CLIENT_ID` and the rest (see the identity-provider settings)."""
    identity_providers_allow_insecure: bool = False
    """Allow providers on private, loopback or link-local addresses, and plain-HTTP provider
    URLs to those addresses only (tests; a provider on your own network): plain HTTP to a
    public address stays refused, where the connection is made. Off, every discovery, token,
    user-info and key URL must be HTTPS to a public address (what a forged setting or a
    provider's document points to cannot reach the internal network). Logs a warning at
    start when on."""
    identity_provider_timeout: float = Field(5.0, gt=0, le=30)
    """Seconds for one request to a provider (discovery, keys, token, user info) before it counts
    as failed (`PROVIDER_ERROR`)."""

    # Webhooks and the claims hook.
    webhook_endpoints: list[WebhookEndpointSettings] = Field(default_factory=list)
    """JSON: `[{"url": "https://...", "secrets": ["whsec_..."], "events": ["user.created"]}]`
    (no `events`: every type). Each committed change is delivered to each endpoint that wants
    it, at least once, signed per Standard Webhooks, in commit order per endpoint."""
    webhook_allow_private: bool = False
    """Allow webhook endpoints and the claims hook on private, loopback or link-local addresses,
    and over plain HTTP to them (tests; a receiver on your own network), never over plain HTTP
    to a public address. Off, they must be HTTPS to a public address. Logs a warning at start
    in production when on."""
    webhook_timeout: float = Field(10.0, gt=0, le=60)
    """Seconds for one delivery (connect, send, the answer's status) before it counts as failed
    and is retried."""
    webhook_retry_max_seconds: int = Field(300, ge=1, le=3600)
    """The cap of the retry backoff of a failed delivery (from 1 s, doubling, a little jitter):
    while an endpoint fails, it is tried again at least this often."""
    webhook_give_up_hours: int = Field(24, ge=1)
    """A delivery not made this many hours after it was queued (or replayed) is given up: a dead
    letter, kept for `strawgate webhooks replay` until `WEBHOOK_RETENTION_DAYS`. Deliveries to an
    endpoint a server does not have in its `WEBHOOK_ENDPOINTS` are left to those that have it
    until this old."""
    webhook_retention_days: int = Field(7, ge=1)
    """Webhook events delivered or given up everywhere are deleted this many days old (dead
    letters included: replay them before)."""
    claims_hook: str | None = None
    """A Python callable, `module:function` (async), that adds claims to every access token
    (for deployments that install Strawgate as a package). Takes precedence over
    `CLAIMS_HOOK_URL`."""
    claims_hook_url: str | None = None
    """An HTTPS endpoint that adds claims to every access token: POSTed the user, roles, `amr`,
    session and reason, signed like the webhooks with `CLAIMS_HOOK_SECRET`; it answers
    `{"claims": {...}}` within 2 s, or the sign-in or refresh fails (`SERVICE_UNAVAILABLE`)."""
    claims_hook_secret: SecretStr | None = None
    """The Standard Webhooks secret (`whsec_...`) the claims hook's requests are signed with.
    Required with `CLAIMS_HOOK_URL`."""
    claims_hook_timeout: float = Field(2.0, gt=0, le=2.0)
    """Seconds the claims hook has to answer (at most 2) before the sign-in or refresh fails."""

    # Email ownership and emailed codes.
    require_email_verification: bool = True
    """Signup, and the login of an unverified account, answer an emailed-code challenge: an
    unverified account never gets a session. An account without a password proves its address
    either way."""
    email_code_minutes: int = Field(10, ge=1, le=60)
    """Lifetime of an emailed code, in minutes."""
    unverified_account_days: int = Field(7, ge=1)
    """Unverified signups are deleted this many days old."""

    # Mail, with fastapi-mail's own variable names.
    mail_server: str | None = None
    """The SMTP server. Required in production. Unset in development: mails (codes included) are
    printed to the log by the DEVELOPMENT console backend, which production cannot use."""
    mail_port: int = Field(587, ge=1, le=65535)
    """The SMTP server's port."""
    mail_username: str = ""
    """The SMTP user name."""
    mail_password: SecretStr = SecretStr("")
    """The SMTP password."""
    mail_from: str | None = None
    """The sender's address; required with `MAIL_SERVER`."""
    mail_from_name: str | None = None
    """The sender's display name. Unset: `PRODUCT_NAME`."""
    mail_starttls: bool = True
    """Upgrade the SMTP connection with STARTTLS."""
    mail_ssl_tls: bool = False
    """Speak TLS to the SMTP server from the start (implicit TLS, usually port 465)."""
    use_credentials: bool = True
    """Log in to the SMTP server with `MAIL_USERNAME` and `MAIL_PASSWORD`."""
    validate_certs: bool = True
    """Check the SMTP server's TLS certificate."""
    mail_timeout: float = Field(15.0, gt=0, le=120)
    """Seconds for the whole SMTP exchange of one mail (connect to QUIT) before the send counts as
    failed and is retried."""
    mail_template_folder: Path | None = None
    """Your own mail templates, tried before the built-in ones (same file names as in
    `db/mail/templates/<language>/`): a file in its folder `<language>/` (`de/login_code.txt`)
    serves that language, one at its top (`login_code.txt`) every language."""
    default_locale: str = "en"
    """The language of the mails of a user who chose none (`updateProfile`'s `locale`) and whose
    signup asked for none of the mail languages (its `Accept-Language`): one of `en`, `de`, `fr`,
    `es` (checked at start)."""
    product_name: str = "Strawgate"
    """What mails call the product."""
    product_url: str = "http://127.0.0.1:8000"
    """Where the product lives: links in mails point here. Production refuses one on this
    machine (`localhost`, `127.0.0.1`, `::1`): set the address users reach."""
    security_url: str | None = None
    """The page where users review their sessions and security settings, linked from security
    notices. Unset: `PRODUCT_URL`. Production refuses one on this machine, as for `PRODUCT_URL`."""

    # The outbox and its sender.
    mail_poll_seconds: float = Field(5.0, gt=0, le=5)
    """The mail sender's polling interval, besides its wake-ups (in-process on commit, and by
    `LISTEN/NOTIFY` on PostgreSQL)."""
    mail_batch_size: int = Field(20, ge=1, le=500)
    """Mails a sender claims at once."""
    mail_lease_seconds: int = Field(60, ge=5)
    """A sender's lease on the mails it claimed: at least twice `MAIL_TIMEOUT` (checked at start); a
    send starts only with `MAIL_TIMEOUT` of the lease left, so no lease runs out mid-send."""
    mail_retry_max_seconds: int = Field(300, ge=1)
    """The cap of the retry backoff (from 1 s, doubling) of a mail the mail server refused or timed
    out."""
    mail_give_up_hours: int = Field(24, ge=1)
    """An undelivered mail is dropped this many hours old (a code mail as soon as its code
    expires)."""
    outbox_retention_days: int = Field(7, ge=1)
    """Sent and dropped outbox rows are deleted this many days old."""
    housekeeping_seconds: int = Field(60, ge=1)
    """Interval of the housekeeping pass (one process at a time: an advisory lock on PostgreSQL)."""
    housekeeping_sweep_seconds: int = Field(3600, ge=0, le=86400)
    """How often a process's housekeeping also sweeps the tables no index serves (expired
    challenges, abandoned signups, ended sessions, spent refresh generations), reading them
    whole; its first pass always does (0: every pass). Such a row stays at most this much
    past its retention."""

    # Abuse resistance.
    redis_url: SecretStr | None = None
    """Redis for the rate-limit counters, shared by every process (`redis://host:6379/0`,
    `rediss://` for TLS, `unix:///path/redis.sock`; a URL that does not parse is refused at
    start). Unset:
    each process counts in its own memory, right for one process only (`strawgate serve --workers
    N` refuses to start without it)."""
    redis_key_prefix: str = Field("strawgate", min_length=1, max_length=64)
    """Prefix of every key in Redis (several deployments may share one Redis)."""
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    """The per-operation budgets, one variable each: `RATE_LIMITS__<NAME>`."""
    rate_limiting: bool = True
    """Off only where a gateway in front limits instead (or to measure what limits cost); the
    lockout stays on either way."""
    lockout_threshold: int = Field(5, ge=1)
    """Failed sign-ins in a row for one normalized email (registered or not) from which each further
    one locks the address."""
    lockout_base_seconds: int = Field(30, ge=1)
    """The first lock step, in seconds; it doubles with every further failure."""
    lockout_max_seconds: int = Field(900, ge=1)
    """The longest lock step, in seconds."""
    lockout_reset_seconds: int = Field(3600, ge=60)
    """Seconds without a failure after which the count is forgotten (a successful sign-in clears it
    at once)."""
    code_lockout_threshold: int = Field(10, ge=1, le=1000)
    """Wrong emailed codes in a row per address, from clients without a device token for the account
    and from all networks together, from which each further one locks code checks for the address
    by the lockout's steps (the right code too). A right code clears it; only a day without a
    wrong one forgets it. A device, and each network the account signed in from, have code
    lockouts of their own."""
    device_token_days: int = Field(90, ge=1, le=365)
    """Lifetime of a device token: proof that a client signed in to the account before, which gives
    it a budget of its own, out of the reach of strangers' lockouts."""
    device_token_transport: Literal["body", "cookie"] = "body"  # noqa: S105 - a mode
    """How device tokens travel: in the answer (`body`, mobile apps) or as the `strawgate_device`
    HttpOnly cookie (`cookie`, browsers)."""
    device_cookie_samesite: Literal["strict", "lax", "none"] = "strict"
    """The `SameSite` attribute of the device cookie."""
    metrics_allow_networks: str = "127.0.0.1/32,::1/128"
    """`GET /metrics` answers only from these networks (comma-separated CIDRs), or to a bearer of
    `METRICS_TOKEN`; anyone else gets 404."""
    metrics_token: SecretStr | None = None
    """A bearer token that may read `/metrics` from any network."""
    cors_allow_origins: str = ""
    """Exact origins allowed cross-origin access, comma-separated; none by default."""
    max_query_bytes: int = Field(16 * 1024, ge=256)
    """Largest GraphQL query text, in bytes."""
    batching: bool = False
    """Accept batches of operations (a JSON array of requests), run one after another."""
    max_batch_size: int = Field(10, ge=1, le=100)
    """Most operations in one batch."""
    session_idle_timeout: Duration = timedelta(days=14)
    """A session whose refresh token goes unused this long ends: each refresh moves its end this far
    ahead, never past `REFRESH_TOKEN_EXPIRE_DAYS`. `0`: no idle timeout."""
    reauth_window: Duration = timedelta(minutes=10)
    """Step-up: the operations that change how the account signs in (two-factor, password, address,
    deletion) need a credential proven on the session within this window, else
    `REAUTHENTICATION_REQUIRED` (the client calls `reauthenticate`, then repeats)."""
    max_sessions_per_user: int = Field(50, ge=1, le=10_000)
    """Live sessions per user; a new sign-in ends the oldest."""
    security_event_retention_days: int = Field(365, ge=1)
    """Days the audit trail (security events) is kept."""
    session_retention_days: int = Field(30, ge=1)
    """Days ended sessions, and the spent refresh-token generations of live ones, are kept (a spent
    token older than that answers `INVALID_TOKEN` instead of ending its session)."""
    challenge_retention_days: int = Field(1, ge=1)
    """Days expired challenges are kept."""
    support_contact: str | None = None
    """Where users get help (an address or a URL), named in the mails about a change of address and
    a deletion. Unset: a reply to `MAIL_FROM`."""

    log_level: str = "INFO"
    """Level of Strawgate's own loggers."""
    log_format: Literal["json", "text"] | None = None
    """`json`: one JSON object a line (`at`, `level`, `logger`, `message`, `request_id`); `text`:
    readable lines with the request id in brackets. Unset: `json` in production, `text` in
    development."""

    @field_validator("claims_hook_secret")
    @classmethod
    def _claims_hook_secret_is_standard(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_webhook_secret(value.get_secret_value())
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _usable_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value().strip() if value is not None else ""
        if not text:
            return None
        from db.security.limiter import redis_url_problem

        problem = redis_url_problem(text)
        if problem is not None:
            raise ValueError(f"REDIS_URL {problem}")
        return SecretStr(text)

    @field_validator("reauth_window")
    @classmethod
    def _reauth_window_bounds(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(days=1):
            raise ValueError("REAUTH_WINDOW must be from 1 second to 1 day")
        return value

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"ALGORITHM must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
        return value

    @property
    def json_logs(self) -> bool:
        if self.log_format is None:
            return self.is_production
        return self.log_format == "json"

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.cors_allow_origins.split(",") if origin.strip()]

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).get_backend_name() == "sqlite"

    @property
    def graphiql_enabled(self) -> bool:
        return (not self.is_production) if self.graphiql is None else self.graphiql

    @property
    def introspection_enabled(self) -> bool:
        return (not self.is_production) if self.introspection is None else self.introspection

    @property
    def migrates_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    def sqlite_path(self) -> Path | None:
        """The file of a SQLite database, or None for PostgreSQL and in-memory SQLite."""
        url = make_url(self.database_url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return Path(url.database)

    def secret(self) -> str:
        if self.secret_key is None:  # pragma: no cover - prepare() always fills it
            raise ConfigError("SECRET_KEY is not set")
        return self.secret_key.get_secret_value()

    def signing_keys(self) -> list[SigningKey] | None:
        """The asymmetric keys (None for HS*); ConfigError when they cannot sign."""
        if self.algorithm not in ASYMMETRIC_ALGORITHMS:
            return None
        if self.jwt_keys is None or not self.jwt_keys.get_secret_value().strip():
            raise ConfigError(
                f"ALGORITHM={self.algorithm} needs JWT_KEYS (a JSON Web Key Set, or a path to "
                f"one); make a key with: strawgate keys generate --alg {self.algorithm}"
            )
        try:
            return load_keys(self.jwt_keys.get_secret_value(), self.algorithm)
        except KeySetError as exc:
            raise ConfigError(str(exc)) from None

    def prepare(self) -> Settings:
        """Check what production needs and fill in development defaults; returns self."""
        self.signing_keys()  # an asymmetric ALGORITHM without a usable key never starts
        key = self.secret_key.get_secret_value() if self.secret_key else None
        if self.is_production:
            if not key:
                raise ConfigError(
                    "SECRET_KEY must be set in production; make one with: strawgate keys"
                    " generate --secret-key"
                )
            if (weakness := secret_key_weakness(key)) is not None:
                raise ConfigError(
                    f"SECRET_KEY {weakness}; make one with: strawgate keys generate --secret-key"
                )
            self._check_encryption_keys(required=True)
            if not self.mail_server:
                raise ConfigError(
                    "MAIL_SERVER must be set in production (codes and notices go out by mail)"
                )
            self._check_mail()
            self._check_public_urls()
            self.relying_party()
            self._check_identity_providers()
            self._check_webhooks()
            self._check_claims_hook()
            if self.is_sqlite:
                log.warning("Production on SQLite: one server process only; use PostgreSQL")
            return self
        if not key:
            self.secret_key = SecretStr(load_or_create_dev_secret(self._dev_secret_path()))
        elif (weakness := secret_key_weakness(key)) is not None:
            log.warning("SECRET_KEY %s; production would refuse to start with it", weakness)
        self._check_encryption_keys(required=False)
        self._check_mail()
        self.relying_party()
        self._check_identity_providers()
        self._check_webhooks()
        self._check_claims_hook()
        return self

    def _check_claims_hook(self) -> None:
        from db.security.claims_hook import check_claims_hook

        check_claims_hook(self)

    def _check_webhooks(self) -> None:
        from db.webhooks.outbound import check_endpoints

        check_endpoints(self)

    def _check_identity_providers(self) -> None:
        from db.providers.config import provider_configs, redirect_urls

        provider_configs(self)
        redirect_urls(self)

    def relying_party(self) -> RelyingParty | None:
        """The passkeys' relying party, None where WEBAUTHN_RP_ID is unset; ConfigError
        for an RP ID or an origin that cannot work."""
        rp_id = (self.webauthn_rp_id or "").strip().lower().rstrip(".")
        if not rp_id:
            if self.webauthn_origins.strip():
                raise ConfigError(
                    "WEBAUTHN_ORIGINS is set without WEBAUTHN_RP_ID (passkeys need both)"
                )
            return None
        local = not self.is_production
        problem = _rp_id_problem(rp_id, local=local)
        if problem is not None:
            raise ConfigError(f"WEBAUTHN_RP_ID {problem}")
        given = _comma_list(self.webauthn_origins)
        origins = [_webauthn_origin(origin, rp_id, local=local) for origin in given]
        related = tuple(
            _webauthn_origin(origin, rp_id, local=local, related=True)
            for origin in _comma_list(self.webauthn_related_origins)
        )
        android = tuple(_android_app(entry) for entry in _comma_list(self.webauthn_android_apps))
        apple = tuple(_apple_app_id(entry) for entry in _comma_list(self.webauthn_apple_app_ids))
        return RelyingParty(
            id=rp_id,
            name=self.webauthn_rp_name or self.product_name,
            origins=tuple(
                dict.fromkeys(
                    [
                        *(origins or [f"https://{rp_id}"]),
                        *related,
                        *(app.origin for app in android),
                    ]
                )
            ),
            related_origins=related,
            android_apps=android,
            apple_app_ids=apple,
        )

    def _check_mail(self) -> None:
        if self.mail_server and not self.mail_from:
            raise ConfigError("MAIL_FROM must be set with MAIL_SERVER (the sender's address)")
        if self.mail_lease_seconds < 2 * self.mail_timeout:
            raise ConfigError(
                "MAIL_LEASE_SECONDS must be at least twice MAIL_TIMEOUT: a send must end well"
                " within the lease, or another process could send the same mail again"
            )
        if self.mail_template_folder is not None and not self.mail_template_folder.is_dir():
            raise ConfigError(f"MAIL_TEMPLATE_FOLDER {self.mail_template_folder} is not a folder")
        from db.mail.languages import MAIL_LANGUAGES

        if self.default_locale not in MAIL_LANGUAGES:
            raise ConfigError(
                f"DEFAULT_LOCALE must be one of the mail languages ({', '.join(MAIL_LANGUAGES)}),"
                f" not {self.default_locale!r}"
            )

    def _check_public_urls(self) -> None:
        for name, url in (("PRODUCT_URL", self.product_url), ("SECURITY_URL", self.security_url)):
            host = _loopback_host(url) if url else None
            if host is not None:
                raise ConfigError(
                    f"{name} points to this machine ({host}): links in mails would lead"
                    f" nowhere; set it to the address users reach (e.g. {name}="
                    "https://auth.your-domain.com)"
                )

    def _check_encryption_keys(self, *, required: bool) -> None:
        if self.encryption_keys is None or not self.encryption_keys.get_secret_value().strip():
            if required:
                raise ConfigError(
                    "ENCRYPTION_KEYS must be set in production (comma-separated Fernet keys);"
                    " make one with: strawgate keys generate --encryption-key"
                )
            return
        try:
            parse_fernet_keys(self.encryption_keys.get_secret_value())
        except ValueError as exc:
            raise ConfigError(f"ENCRYPTION_KEYS: {exc}") from None

    def fernet_keys(self) -> list[str]:
        """The configured Fernet keys; in development without any, one derived from
        SECRET_KEY (so encrypted secrets survive restarts with the kept key)."""
        if self.encryption_keys is not None and self.encryption_keys.get_secret_value().strip():
            return parse_fernet_keys(self.encryption_keys.get_secret_value())
        derived = derive_key(self.secret(), "fernet")
        return [base64.urlsafe_b64encode(derived).decode("ascii")]

    def _dev_secret_path(self) -> Path:
        db_file = self.sqlite_path()
        folder = db_file.parent if db_file is not None else Path("var")
        return folder / "secret_key"


@dataclass(frozen=True, slots=True)
class RelyingParty:
    """Passkeys' WebAuthn relying party (WEBAUTHN_*), as checked at start."""

    id: str
    name: str
    # Every origin an answer may come from: WEBAUTHN_ORIGINS (or https://<id>), the related
    # origins and the Android apps' apk-key-hash origins.
    origins: tuple[str, ...]
    related_origins: tuple[str, ...] = ()
    android_apps: tuple[AndroidApp, ...] = ()
    apple_app_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AndroidApp:
    """An Android app that may use the RP ID's passkeys (WEBAUTHN_ANDROID_APPS)."""

    package: str
    fingerprint: str  # the signing certificate's SHA-256, AB:CD:... (uppercase)

    @property
    def origin(self) -> str:
        """The origin its answers carry: android:apk-key-hash:<base64url SHA-256>."""
        digest = bytes.fromhex(self.fingerprint.replace(":", ""))
        return _APK_KEY_HASH + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


_ANDROID_PACKAGE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)+")
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")
_APPLE_APP_ID = re.compile(r"[A-Z0-9]{10}\.[A-Za-z0-9][A-Za-z0-9.-]*")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _android_app(entry: str) -> AndroidApp:
    package, _, fingerprint = entry.partition(":")
    if not _ANDROID_PACKAGE.fullmatch(package) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ConfigError(
            "WEBAUTHN_ANDROID_APPS: each entry is package.name:SHA256_FINGERPRINT (the signing"
            " certificate's SHA-256 as keytool prints it: 32 hex pairs separated by colons)"
        )
    return AndroidApp(package=package, fingerprint=fingerprint.upper())


def _apple_app_id(entry: str) -> str:
    if not _APPLE_APP_ID.fullmatch(entry):
        raise ConfigError(
            "WEBAUTHN_APPLE_APP_IDS: each entry is an app ID, TEAMID.bundle.id (a 10-character"
            " team ID, a dot, the bundle ID)"
        )
    return entry


_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_APK_KEY_HASH = "android:apk-key-hash:"
_APK_KEY_HASH_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")  # a SHA-256, base64url unpadded


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rp_id_problem(rp_id: str, *, local: bool) -> str | None:
    """Why `rp_id` (lowercase) cannot be an RP ID, else None: a host name (an IP address
    only for a loopback one in development, which some browsers accept on this machine)."""
    if local and _is_loopback(rp_id):
        return None
    labels = rp_id.split(".")
    if all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
        return None
    return f"must be a host name such as example.com (no scheme, port or path), not {rp_id!r}"


def _webauthn_origin(origin: str, rp_id: str, *, local: bool, related: bool = False) -> str:
    """`origin` as browsers write it in clientDataJSON (scheme and host lowercase, no
    default port), or ConfigError where it cannot be one of the RP ID's origins (a
    `related` origin: an https origin on another site, WEBAUTHN_RELATED_ORIGINS)."""
    setting = "WEBAUTHN_RELATED_ORIGINS" if related else "WEBAUTHN_ORIGINS"
    if origin.startswith(_APK_KEY_HASH) and not related:
        # An Android app's signing certificate: not a web origin, so no host to match.
        if not _APK_KEY_HASH_VALUE.fullmatch(origin[len(_APK_KEY_HASH) :]):
            raise ConfigError(
                f"WEBAUTHN_ORIGINS: {origin!r} must be android:apk-key-hash: and the base64url"
                " SHA-256 of the app's signing certificate (43 characters, no padding)"
            )
        return origin
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        parts, port = None, None
    host = (parts.hostname or "") if parts is not None else ""
    scheme = parts.scheme.lower() if parts is not None else ""
    if (
        parts is None
        or scheme not in ("https", "http")
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"{setting}: {origin!r} is not an origin (https://host or https://host:port)"
        )
    if related and scheme != "https":
        raise ConfigError(f"{setting}: {origin!r} must use https")
    if scheme == "http" and not (local and _is_loopback(host)):
        raise ConfigError(
            f"{setting}: {origin!r} must use https (http only for localhost in development)"
        )
    if related and (host == rp_id or host.endswith("." + rp_id)):
        raise ConfigError(
            f"{setting}: {origin!r} is on WEBAUTHN_RP_ID {rp_id}: list it in WEBAUTHN_ORIGINS"
        )
    if not related and host != rp_id and not host.endswith("." + rp_id):
        raise ConfigError(
            f"WEBAUTHN_ORIGINS: {origin!r} is not on WEBAUTHN_RP_ID {rp_id} or a subdomain of it"
        )
    shown = f"[{host}]" if ":" in host else host
    default_port = 443 if scheme == "https" else 80
    return f"{scheme}://{shown}" + (f":{port}" if port is not None and port != default_port else "")


def _loopback_host(url: str) -> str | None:
    """The host of `url` when it is this machine (localhost, a loopback or unspecified
    address), else None."""
    try:
        host = (urlsplit(url.strip()).hostname or "").rstrip(".")
    except ValueError:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return host if address.is_loopback or address.is_unspecified else None


def parse_fernet_keys(value: str) -> list[str]:
    keys = [part.strip() for part in value.split(",") if part.strip()]
    if not keys:
        raise ValueError("no key given")
    for key in keys:
        try:
            Fernet(key.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError("each key must be a Fernet key (32 url-safe base64 bytes)") from None
    return keys


def load_or_create_dev_secret(path: Path) -> str:
    """Reuse the development key kept at `path`, or create it once (mode 0600).

    A key that changed on every restart would end every session. Several workers may
    start at once: the key is written to a private temporary file and linked into
    place, so a reader never sees a half-written key and exactly one key wins.
    """
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
    if key:
        log.info("Using the development SECRET_KEY stored in %s", path.resolve())
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another worker won the race; use its key
    finally:
        tmp.unlink()
    log.warning(
        "No SECRET_KEY set: generated a development key and stored it in %s", path.resolve()
    )
    return path.read_text(encoding="utf-8").strip()
