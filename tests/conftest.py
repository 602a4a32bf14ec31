"""Fixtures: a real PostgreSQL database per test session, the app with an injected clock,
an httpx client on the ASGI app, and servers in subprocesses where a test needs processes."""

from __future__ import annotations

import os

# graph.app builds `app = create_app()` at import, from the environment: make that a
# development app that needs nothing, before anything imports it.
os.environ.setdefault("ENVIRONMENT", "development")
os.environ.setdefault("SECRET_KEY", "pytest-signing-key-7Hq2Lx9Vw4Nc8Rb3Mz6Tk1Fy5Dg0Sj")
os.environ.setdefault("DATABASE_URL", "sqlite+aiosqlite:///:memory:")

import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from starlette.applications import Starlette

from db.migrate import upgrade_head
from db.session import Statements, create_engine
from db.settings import RateLimits, Settings
from graph.app import create_app
from tests.gql import PASSWORD as PASSWORD  # re-exported: tests import it from here
from tests.pg import describe, provision, scratch_database
from tests.servers import redis_reachable
from tests.smtp import SmtpSink

TEST_SECRET = "pytest-signing-key-7Hq2Lx9Vw4Nc8Rb3Mz6Tk1Fy5Dg0Sj"
TEST_FERNET_KEY = "3Ccxk2gCG8F0cH8Ysrr8OEnqNaIxB7cvjxpxdaQbi8A="  # a Fernet key for tests
# What production needs besides keys: a mail server (here one nothing listens on), and
# an address for the links in mails that is not this machine.
PRODUCTION_MAIL: dict[str, Any] = {
    "mail_server": "127.0.0.1",
    "mail_port": 9,
    "mail_from": "strawgate@example.com",
    "product_url": "https://auth.example.com",
}


UNLIMITED = RateLimits(**dict.fromkeys(RateLimits.model_fields, "100000/minute"))
# The shipped argon2id parameters, for the tests about hashing's cost (make_settings
# hashes lighter).
SHIPPED_HASHING: dict[str, Any] = {
    "argon2_memory_cost": Settings.model_fields["argon2_memory_cost"].default,
    "argon2_time_cost": Settings.model_fields["argon2_time_cost"].default,
}


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session: pytest.Session) -> Iterator[None]:
    """Says which PostgreSQL the tests use (tests/pg.py) in one line at the start of every
    run, after pytest's header, -q included (where pytest shows no header)."""
    yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(describe())


class MutableClock:
    """A clock the tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime.now(UTC).replace(microsecond=0)

    def now(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        self.current += timedelta(**delta)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    try:
        url, cluster = provision()
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.destroy()


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    with scratch_database(pg_admin_url, "strawgate_test") as url:
        upgrade_head(url)
        yield url


# Lock requests waiting in this test's database: the other workers' tests have databases
# of their own on the same server, and their waits are not this test's.
LOCKS_WAITING_HERE = (
    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
    " WHERE NOT granted AND datname = current_database()"
)

# The tables each test starts without rows: these, and every table that refers to one of
# them, directly or not (what TRUNCATE ... CASCADE of these would empty).
CLEANED_TABLES = (
    "users",
    "sessions",
    "refresh_tokens",
    "challenges",
    "totp_credentials",
    "recovery_codes",
    "outbox",
    "security_events",
    "login_throttles",
    "identity_flows",
    "spent_id_tokens",
    "webhook_events",
    "webhook_deliveries",
)
# DELETE statements for CLEANED_TABLES and the tables referring to them, per database.
_emptying: dict[str, str] = {}


async def emptying_statements(conn: asyncpg.Connection) -> str:
    """DELETE FROM each of CLEANED_TABLES and each table referring to one of them, a
    referring table before the table it refers to."""
    referring: dict[str, set[str]] = {}
    for row in await conn.fetch(
        "SELECT conrelid::regclass::text AS child, confrelid::regclass::text AS parent"
        " FROM pg_constraint WHERE contype = 'f'"
    ):
        referring.setdefault(row["parent"], set()).add(row["child"])
    ordered: list[str] = []

    def visit(table: str, path: frozenset[str]) -> None:
        if table in ordered or table in path:
            return
        for child in sorted(referring.get(table, ())):
            visit(child, path | {table})
        ordered.append(table)

    for table in CLEANED_TABLES:
        visit(table, frozenset())
    # The names are the catalog's own (regclass quotes where needed).
    return " ".join(f"DELETE FROM {table};" for table in ordered)  # noqa: S608


@pytest.fixture
async def clean_db(database_url: str) -> AsyncIterator[None]:
    """Tests run against real transactions (and real concurrency), so each starts empty.
    DELETE, not TRUNCATE: on tables this small it takes ~2 ms where TRUNCATE takes ~60
    (new files for every table and its indexes), before each of ~860 tests."""
    conn = await asyncpg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        if database_url not in _emptying:
            _emptying[database_url] = await emptying_statements(conn)
        # One simple-protocol query: the statements run in one transaction.
        await conn.execute(_emptying[database_url])
    finally:
        await conn.close()
    yield


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    """A real SMTP server on loopback; `smtp.settings()` points the app at it."""
    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for the limiter's store: this process's memory, or a real Redis."""
    if request.param == "memory":
        return {}
    if not redis_reachable():
        pytest.skip("no Redis at 127.0.0.1:6379")
    return {
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_key_prefix": f"strawgate-test-{uuid.uuid4().hex[:8]}",
    }


OpenStatements = Callable[..., Awaitable[Statements]]


@pytest.fixture
async def open_statements(
    make_settings: Callable[..., Settings], clean_db: None
) -> AsyncIterator[OpenStatements]:
    """Statements of their own (an own pool: a process of its own, as far as the database
    can tell); closed at the end."""
    opened: list[Statements] = []

    async def open_(**overrides: Any) -> Statements:
        statements = Statements(create_engine(make_settings(**overrides)), pool_size=4)
        await statements.start()
        opened.append(statements)
        return statements

    yield open_
    for statements in reversed(opened):
        await statements.close()
        await statements.engine.dispose()


@pytest.fixture
async def statements(open_statements: OpenStatements) -> Statements:
    """Statements of the test's own, beside any app's."""
    return await open_statements()


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "development",
            "database_url": database_url,
            "secret_key": TEST_SECRET,
            "encryption_keys": TEST_FERNET_KEY,
            # The core flows sign up straight into a session; the email tests turn the
            # (default) verification on where they need it.
            "require_email_verification": False,
            # Tests make many requests from one address: the limits are the limit tests'.
            "rate_limits": UNLIMITED,
            # argon2id at its lightest (8 MiB, one pass: ~7 ms a hash here, against ~30 at
            # the defaults): the suite hashes thousands of times. The defaults' own tests
            # ask for them (tests/graph/test_login.py).
            "argon2_memory_cost": 8 * 1024,
            "argon2_time_cost": 1,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


async def running(app: Starlette) -> AsyncIterator[Starlette]:
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def app(settings: Settings, clock: MutableClock, clean_db: None) -> AsyncIterator[Starlette]:
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def mail_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    """The app with email verification on (the default) and mail going to `smtp`."""
    application = create_app(
        make_settings(require_email_verification=True, **smtp.settings()), clock=clock
    )
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def mail_client(mail_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(mail_app) as http:
        yield http


def client_for(app: Starlette, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"user-agent": "pytest"}
    )


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as http:
        yield http


def unique_email() -> str:
    return f"user-{secrets.token_hex(4)}@example.com"
