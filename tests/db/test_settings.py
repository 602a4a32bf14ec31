"""Configuration: production fails closed on a bad SECRET_KEY; development keeps a key."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from db.settings import SECRET_KEY_PLACEHOLDER, ConfigError, Settings
from graph.app import create_app
from tests.conftest import PRODUCTION_MAIL, TEST_FERNET_KEY

GOOD_KEY = "Xq7vN2rL9pW4mK8tY3bF6hJ1dG5sA0zC"


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ENVIRONMENT", "SECRET_KEY", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_production_is_the_default(no_env: None) -> None:
    assert Settings(_env_file=None).environment == "production"


@pytest.mark.parametrize(
    ("key", "why"),
    [(None, "must be set"), ("short-key", "at least 32"), (SECRET_KEY_PLACEHOLDER, "placeholder")],
)
def test_production_refuses_a_bad_secret_key(no_env: None, key: str | None, why: str) -> None:
    settings = Settings(_env_file=None, secret_key=key)
    with pytest.raises(ConfigError, match=why):
        create_app(settings)


def test_production_needs_encryption_keys_and_a_mail_server(no_env: None) -> None:
    with pytest.raises(ConfigError, match="ENCRYPTION_KEYS"):
        Settings(_env_file=None, secret_key=GOOD_KEY, **PRODUCTION_MAIL).prepare()
    with pytest.raises(ConfigError, match="ENCRYPTION_KEYS"):
        Settings(
            _env_file=None, secret_key=GOOD_KEY, encryption_keys="not-a-key", **PRODUCTION_MAIL
        ).prepare()
    with pytest.raises(ConfigError, match="MAIL_SERVER"):
        Settings(_env_file=None, secret_key=GOOD_KEY, encryption_keys=TEST_FERNET_KEY).prepare()
    with pytest.raises(ConfigError, match="MAIL_FROM"):
        Settings(
            _env_file=None,
            secret_key=GOOD_KEY,
            encryption_keys=TEST_FERNET_KEY,
            mail_server="smtp.example.com",
        ).prepare()
    settings = Settings(
        _env_file=None, secret_key=GOOD_KEY, encryption_keys=TEST_FERNET_KEY, **PRODUCTION_MAIL
    )
    settings.prepare()
    assert not settings.graphiql_enabled and not settings.introspection_enabled


def test_development_derives_an_encryption_key(no_env: None, tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    settings = Settings(_env_file=None, environment="development", secret_key="d" * 40)
    keys = settings.prepare().fernet_keys()
    assert len(keys) == 1
    Fernet(keys[0])  # a valid key, the same on every start with the same SECRET_KEY
    assert (
        Settings(_env_file=None, environment="development", secret_key="d" * 40)
        .prepare()
        .fernet_keys()
        == keys
    )


def test_settings_come_from_the_environment_and_dotenv(
    no_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ACCESS_TOKEN_EXPIRE_MINUTES=5\nJWT_ISSUER=from-dotenv\n")
    monkeypatch.setenv("JWT_ISSUER", "from-env")
    settings = Settings(_env_file=env_file)
    assert settings.access_token_expire_minutes == 5
    assert settings.jwt_issuer == "from-env"  # the environment wins over .env


def test_unknown_algorithm_is_refused(no_env: None) -> None:
    with pytest.raises(ValueError, match="ALGORITHM"):
        Settings(_env_file=None, algorithm="none")


def test_development_generates_a_key_once_and_keeps_it(no_env: None, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/data/strawgate.db"
    first = Settings(_env_file=None, environment="development", database_url=url).prepare()
    key_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.secret()) >= 32
    again = Settings(_env_file=None, environment="development", database_url=url).prepare()
    assert again.secret() == first.secret()


def test_the_example_env_file_lists_every_setting() -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    names = {
        line.split("=")[0].lstrip("# ").strip() for line in example.splitlines() if "=" in line
    }
    for field, info in Settings.model_fields.items():
        nested = getattr(info.annotation, "model_fields", None)
        args = get_args(info.annotation)
        keyed = getattr(args[1], "model_fields", None) if len(args) == 2 else None
        if nested is not None:  # a group: RATE_LIMITS__LOGIN_IP and the like
            for part in nested:
                assert f"{field}__{part}".upper() in names, (field, part)
        elif keyed is not None:  # groups by id: IDENTITY_PROVIDERS__<ID>__CLIENT_ID
            for part in keyed:
                pattern = re.compile(rf"{field.upper()}__[A-Z0-9_]+__{part.upper()}")
                assert any(pattern.fullmatch(name) for name in names), (field, part)
        else:
            assert field.upper() in names, field
    assert f"SECRET_KEY={SECRET_KEY_PLACEHOLDER}" in example


def test_workers_starting_together_share_one_development_key(tmp_path: Path) -> None:
    """Several workers may start at once; every one must end up with the same key."""
    from concurrent.futures import ThreadPoolExecutor

    from db.settings import load_or_create_dev_secret

    path = tmp_path / "secret_key"
    with ThreadPoolExecutor(16) as pool:
        keys = set(pool.map(lambda _: load_or_create_dev_secret(path), range(64)))
    assert len(keys) == 1
    assert keys == {path.read_text(encoding="utf-8").strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]  # no temporary files left


def test_the_mail_lease_must_outlast_a_send(no_env: None) -> None:
    """A sender's lease shorter than two sends would let another process take a mail
    over while it is still being sent, and send it again."""
    values: dict[str, Any] = {
        "environment": "development",
        "secret_key": "d" * 40,
        "mail_server": "smtp.example.com",
        "mail_from": "no-reply@example.com",
    }
    with pytest.raises(ConfigError, match="MAIL_LEASE_SECONDS"):
        Settings(_env_file=None, mail_timeout=40, mail_lease_seconds=60, **values).prepare()
    Settings(_env_file=None, mail_timeout=30, mail_lease_seconds=60, **values).prepare()


def test_durations_read_as_operators_write_them() -> None:
    def idle(value: str) -> float:
        return Settings(
            _env_file=None, session_idle_timeout=value
        ).session_idle_timeout.total_seconds()

    assert idle("14d") == 14 * 86400
    assert idle("12h") == 12 * 3600
    assert idle("30m") == 1800
    assert idle("90s") == 90
    assert idle("3600") == 3600
    assert idle("0") == 0
    for bad in ("-1", "fortnight", "", "inf", "nan", "1e30d", "3651d"):
        with pytest.raises(ValidationError, match="duration"):
            Settings(_env_file=None, session_idle_timeout=bad)


def production(**values: Any) -> Settings:
    """Production settings that pass every check but the ones `values` break."""
    base: dict[str, Any] = {
        "secret_key": GOOD_KEY,
        "encryption_keys": TEST_FERNET_KEY,
        **PRODUCTION_MAIL,
    }
    return Settings(_env_file=None, environment="production", **{**base, **values})


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("change-me-compose-example-secret-key-0123456789", 'contains "change-me"'),
        ("Xq7vN2rL9pW4mK8tY3bF6hJ1dG5sA0zCChangeMe", 'contains "changeme"'),
        ("our-example-signing-value-Xq7vN2rL9pW4mK8t", 'contains "example"'),
        ("the-SECRET-KEY-of-our-service-Xq7vN2rL9pW4", 'contains "secret-key"'),
        ("k" * 40, "fewer than 8 different characters"),
        ("abcdefgh" * 5, "one shorter text repeated"),
        ("Xq7vN2rL9p" + "a" * 30, "low in entropy"),
        ("abcdefghijklmnopqrstuvwxyz0123456789", "runs of repeated or consecutive"),
        ("0123456789abcdefghij9876543210zyxwvutsrq", "runs of repeated or consecutive"),
    ],
)
def test_production_refuses_a_guessable_secret_key(no_env: None, key: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as refused:
        production(secret_key=key).prepare()
    assert str(refused.value).endswith("make one with: strawgate keys generate --secret-key")


def test_generated_and_random_keys_pass(no_env: None) -> None:
    """What `strawgate keys generate --secret-key` prints, and keys made the usual ways
    (openssl rand -hex 16, -base64 32): none may be refused by chance."""
    import secrets

    from db.settings import generate_secret_key, secret_key_weakness

    keys = [generate_secret_key() for _ in range(200)]
    assert len(set(keys)) == 200 and all(len(key) == 64 for key in keys)
    keys += [secrets.token_hex(16) for _ in range(2000)]
    keys += [secrets.token_urlsafe(32) for _ in range(2000)]
    keys += ["prod-key-for-server-tests-0123456789abcd", GOOD_KEY]
    assert [key for key in keys if secret_key_weakness(key) is not None] == []
    production(secret_key=keys[0]).prepare()


def test_development_only_warns_of_a_guessable_key(
    no_env: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("strawgate"), "propagate", True)
    with caplog.at_level("WARNING", logger="strawgate.settings"):
        Settings(_env_file=None, environment="development", secret_key="k" * 40).prepare()
    assert "SECRET_KEY has fewer than 8 different characters; production would refuse" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1"),
        ("http://localhost:8000/app", "localhost"),
        ("https://LOCALHOST.", "localhost"),
        ("http://auth.localhost", "auth.localhost"),
        ("http://[::1]:8000", "::1"),
        ("http://127.1.2.3", "127.1.2.3"),
        ("http://0.0.0.0:8000", "0.0.0.0"),  # noqa: S104 - a refused value
    ],
)
def test_production_refuses_a_product_url_on_this_machine(
    no_env: None, url: str, host: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        production(product_url=url).prepare()
    assert str(refused.value) == (
        f"PRODUCT_URL points to this machine ({host}): links in mails would lead nowhere;"
        " set it to the address users reach (e.g. PRODUCT_URL=https://auth.your-domain.com)"
    )
    with pytest.raises(ConfigError, match=r"^SECURITY_URL points to this machine"):
        production(security_url=url).prepare()
    Settings(_env_file=None, environment="development", product_url=url).prepare()


def test_production_takes_a_public_product_url(no_env: None) -> None:
    for url in ("https://auth.example.com", "https://127.example.com", "http://10.0.0.5:8000"):
        production(product_url=url).prepare()


def test_the_default_product_url_is_refused_in_production(no_env: None) -> None:
    values = {key: value for key, value in PRODUCTION_MAIL.items() if key != "product_url"}
    settings = Settings(
        _env_file=None, secret_key=GOOD_KEY, encryption_keys=TEST_FERNET_KEY, **values
    )
    with pytest.raises(ConfigError, match=r"^PRODUCT_URL points to this machine \(127\.0\.0\.1\)"):
        settings.prepare()


@pytest.mark.parametrize(
    ("given", "runs"),
    [
        (
            "postgres://u:pw@db.example.com:5432/app",
            "postgresql+asyncpg://u:pw@db.example.com:5432/app",
        ),
        ("postgresql://u:pw@db.example.com/app", "postgresql+asyncpg://u:pw@db.example.com/app"),
        (
            "postgresql://u:pw@db.example.com/app?sslmode=require",
            "postgresql+asyncpg://u:pw@db.example.com/app?ssl=require",
        ),
        (
            "postgres://u:pw@db.example.com/app?sslmode=verify-full&channel_binding=prefer",
            "postgresql+asyncpg://u:pw@db.example.com/app?ssl=verify-full",
        ),
        (
            "postgresql+asyncpg://u:pw@db.example.com/app?ssl=require",
            "postgresql+asyncpg://u:pw@db.example.com/app?ssl=require",
        ),
        ("sqlite:///./var/strawgate.db", "sqlite+aiosqlite:///./var/strawgate.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_database_urls_as_providers_hand_them_out(no_env: None, given: str, runs: str) -> None:
    assert Settings(_env_file=None, database_url=given).database_url == runs


def test_a_database_password_survives_the_translation(no_env: None) -> None:
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    password = "p@ss:w/rd#%?&="
    given = f"postgres://someone:{quote(password, safe='')}@db.example.com/app?sslmode=require"
    url = make_url(Settings(_env_file=None, database_url=given).database_url)
    assert (url.drivername, url.username, url.password) == (
        "postgresql+asyncpg",
        "someone",
        password,
    )
    assert (url.host, url.database, dict(url.query)) == (
        "db.example.com",
        "app",
        {"ssl": "require"},
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "postgresql://u:pw-not-shown@h/app?sslmode=sometimes",
            "DATABASE_URL: sslmode (or ssl) must be one of disable, allow, prefer, require,"
            " verify-ca, verify-full",
        ),
        (
            "postgresql://u:pw-not-shown@h/app?sslmode=require&sslrootcert=/etc/ca.pem",
            "DATABASE_URL: asyncpg (the driver) takes no sslrootcert in the URL; set"
            " PGSSLROOTCERT in the environment to the file instead",
        ),
        (
            "postgresql://u:pw-not-shown@h/app?channel_binding=require",
            "DATABASE_URL: channel_binding=require is not supported by asyncpg (the driver);"
            " remove it to connect without channel binding",
        ),
        (
            "postgresql://u:pw-not-shown@h/app?connect_timeout=10",
            "DATABASE_URL: connect_timeout is not read from the URL; set DB_TIMEOUT",
        ),
        (
            "postgresql://u:pw-not-shown@h/app?application_name=x&pgbouncer=true",
            "DATABASE_URL: unsupported option(s) application_name, pgbouncer (it takes sslmode"
            " or ssl, target_session_attrs, host, prepared_statement_cache_size)",
        ),
        (
            "postgresql://u:pw-not-shown@h/app?sslmode=require&ssl=disable",
            "DATABASE_URL sets both sslmode and ssl, differently: keep one",
        ),
        (
            "postgresql+psycopg2://u:pw-not-shown@h/app",
            "DATABASE_URL: the driver postgresql+psycopg2 is not supported: write postgresql://"
            " (Strawgate runs PostgreSQL on asyncpg)",
        ),
        (
            "mysql://u:pw-not-shown@h/app",
            "DATABASE_URL: mysql is not supported, only PostgreSQL or SQLite (e.g."
            " postgresql://user:password@host:5432/strawgate or sqlite:///./var/strawgate.db)",
        ),
        (
            "pw-not-shown",
            "DATABASE_URL is not a database URL (e.g. postgresql://user:password@host:5432/"
            "strawgate or sqlite:///./var/strawgate.db)",
        ),
    ],
)
def test_a_database_url_that_cannot_run_is_refused_in_one_line(
    no_env: None, given: str, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, database_url=given)
    (error,) = refused.value.errors()
    assert error["msg"] == f"Value error, {message}"
    assert "pw-not-shown" not in str(refused.value)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (
            "127.0.0.1:6379",
            "must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)",
        ),
        (
            "redis://:pw-not-shown@cache:port/0",
            "does not parse: its port must be a number from 1 to 65535",
        ),
        (
            "redis://:pw-not-shown@cache:6379/zero",
            "does not parse: its database (the path, e.g. /0) must be a number",
        ),
        ("redis://:pw-not-shown@/0", "names no host (e.g. redis://127.0.0.1:6379/0)"),
        ("unix://", "names no socket (e.g. unix:///run/redis/redis.sock)"),
    ],
)
def test_a_redis_url_that_does_not_parse_is_refused_at_load(
    no_env: None, given: str, problem: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, redis_url=given)
    (error,) = refused.value.errors()
    assert error["msg"] == f"Value error, REDIS_URL {problem}"
    assert "pw-not-shown" not in str(refused.value)


def test_redis_urls_that_parse_are_taken(no_env: None) -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@cache.internal", "unix:///run/r.sock"):
        redis_url = Settings(_env_file=None, redis_url=url).redis_url
        assert redis_url is not None and redis_url.get_secret_value() == url
    assert Settings(_env_file=None, redis_url=" ").redis_url is None
