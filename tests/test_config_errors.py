"""Errors that say what to fix: a DATABASE_URL that cannot be reached, a provider's
postgres:// URL, a second migrate, guessable keys and a local PRODUCT_URL in production,
a REDIS_URL that does not parse, and the keys `strawgate keys generate` makes. Each is
run as a user runs it (a process of its own) and read from its output: one line, exit
status 2, never a traceback or a password. `strawgate keys generate`, which reads no
setting and logs nothing, runs as a process in one test (five at once) and in the tests'
own process in the others (tests/cli.py: a process costs about a second)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from db.migrate import head_revision, upgrade_head
from db.settings import Settings
from tests.cli import run_strawgate
from tests.conftest import PRODUCTION_MAIL, TEST_FERNET_KEY
from tests.gql import LOGIN, post
from tests.pg import admin_execute, free_port, scratch_database, sqlalchemy_url
from tests.servers import Server, running, server_env, strawgate_script, uvicorn_command

pytestmark = pytest.mark.slow

PASSWORD_IN_URL = "pw-not-shown-7Kq2"
GOOD_KEY = "Xq7vN2rL9pW4mK8tY3bF6hJ1dG5sA0zC"
COMPOSE_KEY = "change-me-compose-example-secret-key-0123456789"
READY_BOUND = 15.0


def strawgate(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`strawgate ARGS` with only `env` set (production unless ENVIRONMENT says otherwise)."""
    return subprocess.run(
        [strawgate_script(), *args],
        cwd=cwd,
        env=server_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def in_process(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """strawgate, in this process (tests/cli.py): the same environment, output and exit
    status."""
    code, out, err = run_strawgate(*args, cwd=cwd, **env)
    return subprocess.CompletedProcess([strawgate_script(), *args], code, out, err)


def refused_port_url() -> tuple[str, str, str]:
    """A URL on a port nothing listens on; where it points, and what the driver says."""
    port = free_port()
    url = f"postgresql://strawgate:{PASSWORD_IN_URL}@127.0.0.1:{port}/strawgate"
    where = f"host 127.0.0.1, port {port}, database strawgate, role strawgate"
    return url, where, "connection refused (nothing accepts connections there)"


def unreachable(case: str, admin_url: str) -> tuple[str, str, set[str]]:
    """(DATABASE_URL, where it points, the reasons the driver may give) for `case`."""
    admin = make_url(admin_url)
    server = f"host {admin.host}, port {admin.port or 5432}"
    if case == "refused port":
        url, where, reason = refused_port_url()
        return url, where, {reason}
    if case == "unknown database":
        name = f"strawgate_missing_{uuid.uuid4().hex[:8]}"
        missing = admin.set(drivername="postgresql", database=name)
        where = f"{server}, database {name}, role {admin.username}"
        return (
            missing.render_as_string(hide_password=False),
            where,
            {f'database "{name}" does not exist'},
        )
    if case == "unknown role":
        role = "strawgate_no_such_role"
        stranger = admin.set(drivername="postgres", username=role, password=PASSWORD_IN_URL)
        where = f"{server}, database {admin.database}, role {role}"
        reasons = {
            f'role "{role}" does not exist',
            f'password authentication failed for user "{role}"',
        }
        return stranger.render_as_string(hide_password=False), where, reasons
    assert case == "unknown host"
    try:
        socket.getaddrinfo("nonexistent.invalid", 5432)
    except socket.gaierror as exc:
        words = exc.strerror
    else:  # pragma: no cover - a resolver that answers for .invalid
        pytest.skip("this machine's resolver answers for nonexistent.invalid")
    url = f"postgresql://strawgate:{PASSWORD_IN_URL}@nonexistent.invalid:5432/strawgate"
    where = "host nonexistent.invalid, port 5432, database strawgate, role strawgate"
    return url, where, {f"host not found ({words})"}


# -- the CLI: one line, exit status 2 --------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["refused port", "unknown database", "unknown role", "unknown host"]
)
def test_migrate_names_where_and_why_the_database_cannot_be_reached(
    tmp_path: Path, pg_admin_url: str, case: str
) -> None:
    url, where, reasons = unreachable(case, pg_admin_url)
    done = strawgate("migrate", cwd=tmp_path, DATABASE_URL=url)
    assert (done.returncode, done.stdout) == (2, ""), done
    lines = {f"strawgate: cannot reach the database ({where}): {reason}\n" for reason in reasons}
    assert done.stderr in lines, done.stderr
    assert PASSWORD_IN_URL not in done.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["users", "show", "someone@example.com"], {}),
        (["rotate-keys"], {"ENCRYPTION_KEYS": TEST_FERNET_KEY}),
    ],
    ids=["users", "rotate-keys"],
)
def test_every_command_says_so_in_one_line(
    tmp_path: Path, command: list[str], extra: dict[str, str]
) -> None:
    url, where, reason = refused_port_url()
    done = strawgate(*command, cwd=tmp_path, DATABASE_URL=url, **extra)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == f"strawgate: cannot reach the database ({where}): {reason}\n"


def test_a_providers_postgres_url_migrates_and_a_second_migrate_has_nothing_to_do(
    tmp_path: Path, pg_admin_url: str
) -> None:
    head = head_revision()
    with scratch_database(pg_admin_url, "strawgate_provider") as scratch:
        url = make_url(scratch).set(drivername="postgres", query={"sslmode": "disable"})
        given = url.render_as_string(hide_password=False)
        first = strawgate("migrate", cwd=tmp_path, DATABASE_URL=given)
        assert (first.returncode, first.stdout) == (
            0,
            f"Migrated the database from empty to head ({head})\n",
        ), first
        assert "Traceback" not in first.stderr
        second = strawgate("migrate", cwd=tmp_path, DATABASE_URL=given)
        assert (second.returncode, second.stderr) == (0, ""), second
        assert second.stdout == f"Database is at head ({head}); nothing to do\n"


def test_a_second_migrate_on_sqlite_has_nothing_to_do(tmp_path: Path) -> None:
    url = "sqlite:///./data/strawgate.db"
    assert strawgate("migrate", cwd=tmp_path, DATABASE_URL=url).returncode == 0
    again = strawgate("migrate", cwd=tmp_path, DATABASE_URL=url)
    assert (again.returncode, again.stderr) == (0, ""), again
    assert again.stdout == f"Database is at head ({head_revision()}); nothing to do\n"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"SECRET_KEY": COMPOSE_KEY, "ENCRYPTION_KEYS": TEST_FERNET_KEY},
            'SECRET_KEY looks like a placeholder (it contains "change-me"); make one with:'
            " strawgate keys generate --secret-key",
        ),
        (
            {"SECRET_KEY": "k" * 40, "ENCRYPTION_KEYS": TEST_FERNET_KEY},
            "SECRET_KEY has fewer than 8 different characters; make one with: strawgate keys"
            " generate --secret-key",
        ),
        (
            {"SECRET_KEY": GOOD_KEY},
            "ENCRYPTION_KEYS must be set in production (comma-separated Fernet keys); make one"
            " with: strawgate keys generate --encryption-key",
        ),
        (
            {"SECRET_KEY": GOOD_KEY, "ENCRYPTION_KEYS": TEST_FERNET_KEY},
            "PRODUCT_URL points to this machine (127.0.0.1): links in mails would lead nowhere;"
            " set it to the address users reach (e.g. PRODUCT_URL=https://auth.your-domain.com)",
        ),
        (
            {"REDIS_URL": f"redis://:{PASSWORD_IN_URL}@cache.internal:6379x/0"},
            "REDIS_URL does not parse: its port must be a number from 1 to 65535",
        ),
        (
            {"DATABASE_URL": f"postgres://u:{PASSWORD_IN_URL}@db.internal/app?pgbouncer=true"},
            "DATABASE_URL: unsupported option(s) pgbouncer (it takes sslmode or ssl,"
            " target_session_attrs, host, prepared_statement_cache_size)",
        ),
        (
            {"DATABASE_URL": f"postgresql://u:{PASSWORD_IN_URL}@db.internal/app?sslmode=on"},
            "DATABASE_URL: sslmode (or ssl) must be one of disable, allow, prefer, require,"
            " verify-ca, verify-full",
        ),
    ],
    ids=[
        "compose key",
        "repeated key",
        "no encryption keys",
        "local product url",
        "redis url",
        "database option",
        "sslmode",
    ],
)
def test_serve_refuses_a_configuration_in_one_line(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    production = {"MAIL_SERVER": "127.0.0.1", "MAIL_FROM": "strawgate@example.com"}
    port = str(free_port())
    done = strawgate("serve", "--port", port, cwd=tmp_path, **production, **env)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == f"strawgate: {line}\n"
    assert PASSWORD_IN_URL not in done.stderr


def test_rotate_keys_needs_only_the_database_and_the_encryption_keys(tmp_path: Path) -> None:
    """In production (the default), with no SECRET_KEY, MAIL_SERVER or PRODUCT_URL."""
    url = "sqlite:///./strawgate.db"
    assert strawgate("migrate", cwd=tmp_path, DATABASE_URL=url).returncode == 0
    new = Fernet.generate_key().decode()
    done = strawgate(
        "rotate-keys", cwd=tmp_path, DATABASE_URL=url, ENCRYPTION_KEYS=f"{new},{TEST_FERNET_KEY}"
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith("re-encrypted 0 secret(s) under the first of ENCRYPTION_KEYS")
    missing = strawgate("rotate-keys", cwd=tmp_path, DATABASE_URL=url)
    assert (missing.returncode, missing.stderr) == (
        2,
        "strawgate: rotate-keys needs ENCRYPTION_KEYS: the new key first, then every key still"
        " in use (make one with: strawgate keys generate --encryption-key)\n",
    )


# -- strawgate keys generate -------------------------------------------------------------------


def test_keys_generate_makes_a_secret_key_production_takes(tmp_path: Path) -> None:
    from db.settings import secret_key_weakness

    def secret_key(_: int) -> subprocess.CompletedProcess[str]:
        return strawgate("keys", "generate", "--secret-key", cwd=tmp_path)

    keys = set()
    # Five processes side by side: each starts afresh, and no two keys may be alike.
    with ThreadPoolExecutor(5) as pool:
        runs = list(pool.map(secret_key, range(5)))
    for done in runs:
        assert (done.returncode, done.stderr) == (0, ""), done
        key = done.stdout.removesuffix("\n")
        assert len(key) == 64 and "\n" not in key
        assert secret_key_weakness(key) is None
        keys.add(key)
    assert len(keys) == 5


def test_keys_generate_makes_an_encryption_key(tmp_path: Path) -> None:
    done = in_process("keys", "generate", "--encryption-key", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done
    key = done.stdout.removesuffix("\n")
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the test runner's environment (conftest sets some)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.parametrize("alg", [None, "ES256"])
def test_keys_generate_env_is_a_dotenv_production_starts_with(
    tmp_path: Path, bare_environment: None, alg: str | None
) -> None:
    done = in_process("keys", "generate", "--env", *(["--alg", alg] if alg else []), cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done
    names = [line.split("=", 1)[0] for line in done.stdout.splitlines() if "=" in line]
    expected = ["SECRET_KEY", "ENCRYPTION_KEYS"] + (["ALGORITHM", "JWT_KEYS"] if alg else [])
    assert names == expected
    env_file = tmp_path / ".env"
    env_file.write_text(done.stdout, encoding="utf-8")
    settings = Settings(_env_file=env_file, **PRODUCTION_MAIL)
    assert settings.is_production
    settings.prepare()
    assert f"SECRET_KEY={settings.secret()}\n" in done.stdout
    if alg:
        signing = settings.signing_keys()
        assert signing is not None and len(signing) == 1 and settings.algorithm == alg


def test_keys_generate_still_prints_a_jwk_by_default(tmp_path: Path) -> None:
    done = in_process("keys", "generate", cwd=tmp_path)
    assert done.returncode == 0, done
    jwk = json.loads(done.stdout)
    assert (jwk["alg"], jwk["kty"]) == ("ES256", "EC") and "d" in jwk
    mixed = in_process("keys", "generate", "--secret-key", "--alg", "ES256", cwd=tmp_path)
    assert (mixed.returncode, mixed.stdout) == (2, "")
    assert mixed.stderr == (
        "strawgate: --alg makes a JWK: give it alone or with --env, not with --secret-key\n"
    )


# -- the server: up, unready, and saying why ---------------------------------------------------


def development_env(database_url: str) -> dict[str, str]:
    return server_env(
        ENVIRONMENT="development",
        LOG_FORMAT="text",
        DATABASE_URL=database_url,
        DB_TIMEOUT="2",
        REQUIRE_EMAIL_VERIFICATION="false",
    )


def logged(log: str, level: str, logger: str, message: str) -> int:
    """How many lines of a text log (graph/logs.py's TEXT_FORMAT) say `message`."""
    line = rf"^\S+ \S+ {level} {re.escape(logger)} \[[^\]]*\]: {re.escape(message)}$"
    return len(re.findall(line, log, re.MULTILINE))


async def readiness(server: Server) -> tuple[int, dict[str, str]]:
    async with server.client() as http:
        response = await http.get("/readyz")
    return response.status_code, response.json()


async def ready_within(server: Server, limit: float) -> dict[str, str]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, body = await readiness(server)
        if status == 200:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz not 200 within {limit} s:\n{server.log()}")


async def test_the_server_starts_unready_and_names_the_unreachable_database(
    tmp_path: Path,
) -> None:
    url, where, reason = refused_port_url()
    env = development_env(url)
    async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
        assert await readiness(server) == (
            503,
            {"status": "database unreachable", "reason": "connection refused"},
        )
        async with server.client() as http:
            answer = await post(
                http, LOGIN, {"i": {"email": "a@example.com", "password": "x" * 12}}
            )
        assert answer.json()["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert await readiness(server) == (
            503,
            {"status": "database unreachable", "reason": "connection refused"},
        )
    log = server.log()
    said = (
        f"Database unreachable ({where}): {reason}; not ready until it answers (/readyz"
        " answers 503; every /readyz and request tries again)"
    )
    assert logged(log, "ERROR", "strawgate.errors", said) == 1, log
    up = "Strawgate is up (development, postgresql), not ready: database unreachable"
    assert logged(log, "WARNING", "strawgate", up) == 1, log
    assert "migrations pending" not in log and "schema is not at" not in log
    assert PASSWORD_IN_URL not in log


async def test_the_server_becomes_ready_when_its_database_appears(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """The rolling restart: the database is not there when the server starts; once it is
    (created and migrated), the next /readyz finds it, without a restart."""
    name = f"strawgate_late_{uuid.uuid4().hex[:8]}"
    url = sqlalchemy_url(pg_admin_url, name)
    admin = make_url(pg_admin_url)
    where = f"host {admin.host}, port {admin.port or 5432}, database {name}, role {admin.username}"
    try:
        async with running(
            env=development_env(url), cwd=tmp_path, logs=tmp_path / "logs"
        ) as server:
            assert await readiness(server) == (
                503,
                {"status": "database unreachable", "reason": "database does not exist"},
            )
            await admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
            assert await readiness(server) == (503, {"status": "migrations pending"})
            await asyncio.to_thread(upgrade_head, url)
            body = await ready_within(server, READY_BOUND)
            assert body["status"] == "ready"
        log = server.log()
        said = (
            f'Database unreachable ({where}): database "{name}" does not exist; not ready until'
            " it answers (/readyz answers 503; every /readyz and request tries again)"
        )
        assert logged(log, "ERROR", "strawgate.errors", said) == 1, log
        behind = f"Not ready: the database schema is not at {head_revision()} ({where}); run"
        assert logged(log, "WARNING", "strawgate.errors", f"{behind} strawgate migrate") == 1
        assert logged(log, "INFO", "strawgate.errors", f"Database ready again ({where})") == 1
    finally:
        await admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_providers_postgres_url_serves(tmp_path: Path, database_url: str) -> None:
    given = make_url(database_url).set(drivername="postgres", query={"sslmode": "disable"})
    env = development_env(given.render_as_string(hide_password=False))
    async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
        assert (await ready_within(server, READY_BOUND))["status"] == "ready"


async def test_uvicorn_alone_takes_a_plain_sqlite_url(tmp_path: Path) -> None:
    """`sqlite:///` as SQLAlchemy's documentation writes it, run on aiosqlite."""
    env = server_env(ENVIRONMENT="development", DATABASE_URL="sqlite:///./var/plain.db")
    port = free_port()
    async with running(
        uvicorn_command(port), env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port
    ) as server:
        assert (await ready_within(server, READY_BOUND))["status"] == "ready"
    assert (tmp_path / "var" / "plain.db").is_file()
