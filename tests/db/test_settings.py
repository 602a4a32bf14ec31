"""Configuration: production fails closed on a bad SECRET_KEY; development keeps a key."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from db.settings import SECRET_KEY_PLACEHOLDER, ConfigError, Settings
from graph.app import create_app
from tests.conftest import PRODUCTION_MAIL, TEST_FERNET_KEY


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
        Settings(_env_file=None, secret_key="k" * 32, **PRODUCTION_MAIL).prepare()
    with pytest.raises(ConfigError, match="ENCRYPTION_KEYS"):
        Settings(
            _env_file=None, secret_key="k" * 32, encryption_keys="not-a-key", **PRODUCTION_MAIL
        ).prepare()
    with pytest.raises(ConfigError, match="MAIL_SERVER"):
        Settings(_env_file=None, secret_key="k" * 32, encryption_keys=TEST_FERNET_KEY).prepare()
    with pytest.raises(ConfigError, match="MAIL_FROM"):
        Settings(
            _env_file=None,
            secret_key="k" * 32,
            encryption_keys=TEST_FERNET_KEY,
            mail_server="smtp.example.com",
        ).prepare()
    settings = Settings(
        _env_file=None, secret_key="k" * 32, encryption_keys=TEST_FERNET_KEY, **PRODUCTION_MAIL
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
        if nested is not None:  # a group: RATE_LIMITS__LOGIN_IP and the like
            for part in nested:
                assert f"{field}__{part}".upper() in names, (field, part)
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
