"""Configuration from the environment (and an optional `.env`), read with pydantic-settings."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from db.security.passwords import usable_cpus

log = logging.getLogger("strawgate.settings")

# The value `.env.example` ships with; production refuses to start with it.
SECRET_KEY_PLACEHOLDER = "change-me-to-a-random-string-of-at-least-32-characters"  # noqa: S105
MIN_SECRET_KEY_LENGTH = 32
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/strawgate.db"
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512")


class ConfigError(RuntimeError):
    """The configuration cannot run safely; the message says which setting and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    environment: Literal["development", "production"] = "production"
    database_url: str = DEFAULT_DATABASE_URL
    secret_key: SecretStr | None = None
    algorithm: str = "HS256"
    access_token_expire_minutes: int = Field(15, ge=1, le=24 * 60)
    refresh_token_expire_days: int = Field(30, ge=1, le=3650)
    refresh_token_reuse_interval: int = Field(10, ge=0, le=300)
    jwt_issuer: str = "strawgate"
    jwt_audience: str = "strawgate"

    # GraphQL edge. None means "on in development, off in production".
    graphiql: bool | None = None
    introspection: bool | None = None
    max_query_depth: int = Field(10, ge=1)
    max_aliases: int = Field(15, ge=0)
    max_query_tokens: int = Field(2000, ge=10)
    max_body_bytes: int = Field(64 * 1024, ge=1024)

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

    log_level: str = "INFO"

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"ALGORITHM must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
        return value

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

    def prepare(self) -> Settings:
        """Check what production needs and fill in development defaults; returns self."""
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
            if self.is_sqlite:
                log.warning("Production on SQLite: one server process only; use PostgreSQL")
            return self
        if not key:
            self.secret_key = SecretStr(load_or_create_dev_secret(self._dev_secret_path()))
        elif len(key) < MIN_SECRET_KEY_LENGTH or key == SECRET_KEY_PLACEHOLDER:
            log.warning("SECRET_KEY is weak; production would refuse to start with it")
        return self

    def _dev_secret_path(self) -> Path:
        db_file = self.sqlite_path()
        folder = db_file.parent if db_file is not None else Path("var")
        return folder / "secret_key"


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
