"""Configuration from the environment (and an optional `.env`), read with pydantic-settings."""

from __future__ import annotations

import base64
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from cryptography.fernet import Fernet
from pydantic import BaseModel, BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from db.security.jwks import ASYMMETRIC_ALGORITHMS, KeySetError, SigningKey, load_keys
from db.security.passwords import usable_cpus
from db.security.tokens import derive_key

log = logging.getLogger("strawgate.settings")

# The value `.env.example` ships with; production refuses to start with it.
SECRET_KEY_PLACEHOLDER = "change-me-to-a-random-string-of-at-least-32-characters"  # noqa: S105
MIN_SECRET_KEY_LENGTH = 32
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/strawgate.db"
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "ES256", "RS256")


class ConfigError(RuntimeError):
    """The configuration cannot run safely; the message says which setting and why."""


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


class RateLimits(BaseModel):
    """Per-operation budgets in the `limits` library's notation ("30/minute", "5 per 15
    minutes"), each set by RATE_LIMITS__<NAME> (e.g. RATE_LIMITS__LOGIN_IP=60/minute).
    _ip: per client address (IPv4 whole, IPv6 by /64); _account: per target account
    (normalized email); _session: per session (refresh family); _challenge: per
    challenge and client; _mail: mails sent per account (over it the answer looks the
    same and no mail goes out)."""

    signup_ip: str = "20/hour"
    login_ip: str = "30/minute"
    login_account: str = "20/minute"
    verify_otp_ip: str = "30/minute"
    verify_otp_challenge: str = "5/minute"
    refresh_ip: str = "300/minute"
    refresh_session: str = "60/minute"
    request_login_code_ip: str = "10/hour"
    request_password_reset_ip: str = "10/hour"  # noqa: S105 - a rate
    request_email_verification_ip: str = "10/hour"
    # Mails that carry a code, to one address: per requesting network (IPv4 /24, IPv6
    # /64), and a ceiling over every network (the bound on a mail flood to one address).
    # The ceiling is above ten networks' worth: strangers on fewer networks cannot keep
    # the owner's code from being mailed.
    code_mail_client: str = "5/hour"
    code_mail_account: str = "60/hour"
    resend_otp_ip: str = "20/hour"
    reset_password_ip: str = "20/hour"  # noqa: S105 - a rate
    change_password_ip: str = "20/hour"  # noqa: S105 - a rate
    change_password_account: str = "10/hour"  # noqa: S105 - a rate
    confirm_totp_ip: str = "30/hour"
    disable_totp_ip: str = "30/hour"
    regenerate_recovery_codes_ip: str = "30/hour"
    totp_account: str = "20/hour"
    change_email_ip: str = "20/hour"
    change_email_account: str = "10/hour"
    delete_account_ip: str = "20/hour"
    delete_account_account: str = "10/hour"
    export_account_account: str = "10/hour"

    @field_validator("*")
    @classmethod
    def _parses(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"not a rate limit: {value!r} (e.g. 30/minute)") from None
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        env_nested_delimiter="__",
    )

    environment: Literal["development", "production"] = "production"
    database_url: str = DEFAULT_DATABASE_URL
    secret_key: SecretStr | None = None
    algorithm: str = "HS256"
    # ES256/RS256: a JSON Web Key Set (inline, or a path to a file) of private keys; the
    # first signs, every one verifies (see db/security/jwks.py for rotation).
    jwt_keys: SecretStr | None = None
    access_token_expire_minutes: int = Field(15, ge=1, le=24 * 60)
    refresh_token_expire_days: int = Field(30, ge=1, le=3650)
    refresh_token_reuse_interval: int = Field(10, ge=0, le=300)
    # Where refresh tokens travel: the answer's body (mobile apps), or an HttpOnly cookie
    # scoped to /graphql that JavaScript never sees (browsers; every POST then needs the
    # X-Requested-With header and an allowed Origin: the CSRF defence).
    refresh_token_transport: Literal["body", "cookie"] = "body"  # noqa: S105 - a mode
    jwt_issuer: str = "strawgate"
    jwt_audience: str = "strawgate"

    # GraphQL edge. None means "on in development, off in production".
    graphiql: bool | None = None
    introspection: bool | None = None
    max_query_depth: int = Field(10, ge=1)
    max_aliases: int = Field(15, ge=0)
    max_query_tokens: int = Field(2000, ge=10)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    # Slow clients: a request's line and headers must arrive whole within the first
    # (counted from the connection's opening, or from the end of the previous response
    # on a kept-alive one), its body whole within the second (counted from the end of
    # its headers); else the connection is closed, with a 408 if part of a request came.
    # Bounds on the whole, not on the pauses between reads. The header bound holds only
    # under `strawgate serve` (graph/protocols.py).
    http_header_timeout: Duration = Field(
        timedelta(seconds=30), gt=timedelta(0), le=timedelta(hours=1)
    )
    http_body_timeout: Duration = Field(
        timedelta(seconds=30), gt=timedelta(0), le=timedelta(hours=1)
    )
    # At most this many bytes of a request's line and headers (counted as they arrive;
    # a body does not count): past it, 431 and the connection is closed. Only under
    # `strawgate serve` (graph/protocols.py), like the header bound above.
    http_max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)

    # Passwords.
    password_min_length: int = Field(8, ge=8, le=256)
    argon2_memory_cost: int = Field(19 * 1024, ge=8 * 1024)  # KiB (OWASP: 19 MiB)
    argon2_time_cost: int = Field(2, ge=1)
    argon2_parallelism: int = Field(1, ge=1)
    password_hash_workers: int = Field(default_factory=usable_cpus, ge=1)

    # Database.
    # Connections of the request path's pool (per process): at least the concurrent
    # requests a process serves, or requests queue for a connection.
    db_pool_size: int = Field(40, ge=1)
    db_timeout: float = Field(5.0, gt=0)
    auto_migrate: bool | None = None  # None: on for the embedded SQLite default only

    # Two-factor. ENCRYPTION_KEYS: comma-separated Fernet keys; the first encrypts, every
    # one decrypts (rotate with `strawgate rotate-keys`). Required in production; in
    # development derived from SECRET_KEY.
    encryption_keys: SecretStr | None = None
    totp_issuer: str = "Strawgate"
    otp_challenge_minutes: int = Field(5, ge=1, le=60)

    # Email ownership and emailed codes.
    require_email_verification: bool = True
    email_code_minutes: int = Field(10, ge=1, le=60)
    unverified_account_days: int = Field(7, ge=1)

    # Mail, with fastapi-mail's own variable names. Without MAIL_SERVER (development
    # only) mails are printed by the console backend.
    mail_server: str | None = None
    mail_port: int = Field(587, ge=1, le=65535)
    mail_username: str = ""
    mail_password: SecretStr = SecretStr("")
    mail_from: str | None = None
    mail_from_name: str | None = None
    mail_starttls: bool = True
    mail_ssl_tls: bool = False
    use_credentials: bool = True
    validate_certs: bool = True
    # The whole SMTP exchange of one mail (connect to QUIT) before it counts as failed.
    mail_timeout: float = Field(15.0, gt=0, le=120)
    # The operator's own templates, tried before the built-in ones (same file names).
    mail_template_folder: Path | None = None
    product_name: str = "Strawgate"
    # Where the product lives: links in mails point here.
    product_url: str = "http://127.0.0.1:8000"
    # The page where users review their sessions and security settings (default product_url).
    security_url: str | None = None

    # The outbox and its sender.
    mail_poll_seconds: float = Field(5.0, gt=0, le=5)
    mail_batch_size: int = Field(20, ge=1, le=500)
    mail_lease_seconds: int = Field(60, ge=5)
    mail_retry_max_seconds: int = Field(300, ge=1)  # the backoff's cap
    mail_give_up_hours: int = Field(24, ge=1)  # an undelivered mail is dropped this old
    outbox_retention_days: int = Field(7, ge=1)
    housekeeping_seconds: int = Field(60, ge=1)

    # Abuse resistance. REDIS_URL: counters shared by every process (memory otherwise,
    # which serves one process only).
    redis_url: SecretStr | None = None
    # Prefix of every key in Redis (several deployments may share one Redis).
    redis_key_prefix: str = Field("strawgate", min_length=1, max_length=64)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    # Off only where a gateway in front limits instead (or to measure what limits cost);
    # the lockout stays on either way.
    rate_limiting: bool = True
    # Lockout per normalized email (registered or not): after LOCKOUT_THRESHOLD failures
    # each further one locks for a step that doubles from LOCKOUT_BASE_SECONDS up to
    # LOCKOUT_MAX_SECONDS; a success, or LOCKOUT_RESET_SECONDS without a failure, resets.
    lockout_threshold: int = Field(5, ge=1)
    lockout_base_seconds: int = Field(30, ge=1)
    lockout_max_seconds: int = Field(900, ge=1)
    lockout_reset_seconds: int = Field(3600, ge=60)
    # Wrong emailed codes per address, from clients without a device token for the
    # account, all networks together: from the CODE_LOCKOUT_THRESHOLD-th on, each locks
    # code checks for the address by the lockout's steps (guessing a six-digit code from
    # many networks at once gets nowhere); a right code clears it.
    code_lockout_threshold: int = Field(10, ge=1, le=1000)
    # Device tokens: proof a client signed in to an account before (its own budget).
    device_token_days: int = Field(90, ge=1, le=365)
    device_token_transport: Literal["body", "cookie"] = "body"  # noqa: S105 - a mode
    device_cookie_samesite: Literal["strict", "lax", "none"] = "strict"
    # GET /metrics: only from these networks (comma-separated CIDRs), or with this bearer.
    metrics_allow_networks: str = "127.0.0.1/32,::1/128"
    metrics_token: SecretStr | None = None
    # HTTP: cross-origin access only for these origins (comma-separated; none by default).
    cors_allow_origins: str = ""
    # GraphQL: the query text's size, and batches of operations (off unless set).
    max_query_bytes: int = Field(16 * 1024, ge=256)
    batching: bool = False
    max_batch_size: int = Field(10, ge=1, le=100)
    # Session lifetime: besides the absolute REFRESH_TOKEN_EXPIRE_DAYS, a session whose
    # refresh token goes unused this long ends (0: no idle timeout); and at most this
    # many live sessions per user (a new one ends the oldest).
    session_idle_timeout: Duration = timedelta(days=14)
    # Step-up: operations that change how the account signs in (two-factor, password,
    # address, deletion) need a credential proven on this session within this window
    # (else REAUTHENTICATION_REQUIRED: reauthenticate, then repeat).
    reauth_window: Duration = timedelta(minutes=10)
    max_sessions_per_user: int = Field(50, ge=1, le=10_000)
    # Retentions (days) of the audit trail, of ended sessions, and of expired challenges.
    security_event_retention_days: int = Field(365, ge=1)
    session_retention_days: int = Field(30, ge=1)
    challenge_retention_days: int = Field(1, ge=1)
    # Where users get help (an address or a URL), named in the mail telling the old
    # address of a change of address. Default: a reply to MAIL_FROM.
    support_contact: str | None = None

    log_level: str = "INFO"
    # json: one JSON object a line; text: readable lines. Default: json in production.
    log_format: Literal["json", "text"] | None = None

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
                raise ConfigError("SECRET_KEY must be set in production")
            if len(key) < MIN_SECRET_KEY_LENGTH:
                raise ConfigError(
                    f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters long"
                )
            if key == SECRET_KEY_PLACEHOLDER:
                raise ConfigError("SECRET_KEY is still the .env.example placeholder")
            self._check_encryption_keys(required=True)
            if not self.mail_server:
                raise ConfigError(
                    "MAIL_SERVER must be set in production (codes and notices go out by mail)"
                )
            self._check_mail()
            if self.is_sqlite:
                log.warning("Production on SQLite: one server process only; use PostgreSQL")
            return self
        if not key:
            self.secret_key = SecretStr(load_or_create_dev_secret(self._dev_secret_path()))
        elif len(key) < MIN_SECRET_KEY_LENGTH or key == SECRET_KEY_PLACEHOLDER:
            log.warning("SECRET_KEY is weak; production would refuse to start with it")
        self._check_encryption_keys(required=False)
        self._check_mail()
        return self

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

    def _check_encryption_keys(self, *, required: bool) -> None:
        if self.encryption_keys is None or not self.encryption_keys.get_secret_value().strip():
            if required:
                raise ConfigError(
                    "ENCRYPTION_KEYS must be set in production (comma-separated Fernet keys; "
                    'make one with: python -c "from cryptography.fernet import Fernet; '
                    'print(Fernet.generate_key().decode())")'
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
