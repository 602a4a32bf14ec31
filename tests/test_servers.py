"""Real server processes: the SQLite newcomer path, one process per SQLite file, what
production refuses, refresh rotation across processes, proxy headers, and a PostgreSQL
outage the server survives."""

from __future__ import annotations

import asyncio
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from db.migrate import upgrade_head
from db.models import RefreshToken, UserSession
from db.settings import SECRET_KEY_PLACEHOLDER
from tests.conftest import PASSWORD, TEST_FERNET_KEY, unique_email
from tests.gql import LOGIN, ME, REFRESH, SIGNUP, VERIFY_OTP, post
from tests.pg import PrivateCluster, admin_execute, find_pg_bin, free_port, sqlalchemy_url
from tests.servers import (
    Server,
    redis_reachable,
    run_to_exit,
    running,
    running_many,
    server_env,
    start,
    strawgate_command,
    uvicorn_command,
)
from tests.smtp import CODE_LINE

pytestmark = pytest.mark.slow

PRODUCTION_KEY = "prod-key-for-server-tests-0123456789abcd"  # 40 characters
assert len(PRODUCTION_KEY) == 40

# Nothing of the driver or a traceback may reach a client.
LEAKS = ("asyncpg", "traceback", "sqlalchemy", "operationalerror", "connectionrefused")
OUTAGE_BOUND = 6.0  # seconds, with DB_TIMEOUT=2
RECOVERY_BOUND = 10.0


def production_env(database_url: str, **overrides: str) -> dict[str, str]:
    settings = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": PRODUCTION_KEY,
        "ENCRYPTION_KEYS": TEST_FERNET_KEY,
        "DATABASE_URL": database_url,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": "9",  # nothing listens: mails wait in the outbox
        "MAIL_FROM": "strawgate@example.com",
        "REQUIRE_EMAIL_VERIFICATION": "false",
        "PRODUCT_URL": "https://auth.example.com",
    }
    return server_env(**{**settings, **overrides})


async def ok(
    http: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The data of an answer that must be a 200 without errors."""
    response = await post(http, query, variables, token=token, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


async def signed_up(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    data = await ok(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
    session: dict[str, Any] = data["signup"]
    assert session["__typename"] == "AuthSession", session
    return session


async def code_from_log(server: Server, email: str, limit: float = 5.0) -> str:
    """The code of the newest mail to `email` that the DEVELOPMENT console backend
    printed in the server's log."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        log = server.log()
        marker = log.rfind(f"To: {email}")
        if marker >= 0 and (found := CODE_LINE.search(log, marker)):
            assert "DEVELOPMENT" in log[:marker]
            return found.group(1)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no code for {email} in the log:\n{server.log()}")


async def logged_in(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    data = await ok(http, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    session: dict[str, Any] = data["login"]
    assert session["__typename"] == "AuthSession", session
    return session


async def refreshed(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    data = await ok(http, REFRESH, {"i": {"refreshToken": token}})
    answer: dict[str, Any] = data["refresh"]
    return answer


async def my_email(http: httpx.AsyncClient, access_token: str) -> str:
    data = await ok(http, ME, token=access_token)
    return str(data["me"]["email"])


async def session_rows(
    database_url: str, user_id: str
) -> list[tuple[UserSession, list[RefreshToken]]]:
    """Every session of a user with its refresh-token generations, oldest first."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            sessions = (
                await conn.execute(
                    select(UserSession).where(UserSession.user_id == uuid.UUID(user_id))
                )
            ).all()
            out: list[tuple[UserSession, list[RefreshToken]]] = []
            for row in sessions:
                tokens = (
                    await conn.execute(
                        select(RefreshToken)
                        .where(RefreshToken.session_id == row.id)
                        .order_by(RefreshToken.generation)
                    )
                ).all()
                out.append((row, tokens))  # type: ignore[arg-type]
    finally:
        await engine.dispose()
    return out


# -- SQLite, the embedded default -------------------------------------------------------


async def test_sqlite_newcomer_path_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    """`strawgate serve` in an empty folder, no DATABASE_URL and no SECRET_KEY: it works,
    keeps a private key beside the database, and a restart keeps sessions valid."""
    folder = tmp_path / "app"
    folder.mkdir()
    logs = tmp_path / "logs"
    env = server_env(ENVIRONMENT="development")
    email = unique_email()

    port = free_port()
    first = await start(strawgate_command(port), env=env, cwd=folder, logs=logs, port=port)
    try:
        async with first.client() as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            # The README's first steps: signup answers a challenge, the code is in the
            # development log, verifyOtp answers the session.
            data = await ok(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
            challenge = data["signup"]
            assert (challenge["method"], challenge["purpose"]) == ("EMAIL", "VERIFY_EMAIL")
            code = await code_from_log(first, email)
            data = await ok(
                http,
                VERIFY_OTP,
                {"i": {"challengeToken": challenge["challengeToken"], "code": code}},
            )
            session = data["verifyOtp"]
            assert session["__typename"] == "AuthSession", session
            assert await my_email(http, session["accessToken"]) == email
    finally:
        await first.stop()

    var = folder / "var"
    key_file = var / "secret_key"
    assert (var / "strawgate.db").is_file()
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text(encoding="utf-8").strip()
    assert len(key) >= 32
    first_log = first.log()
    assert str(key_file.resolve()) in first_log, first_log
    assert key not in first_log

    port = free_port()
    second = await start(strawgate_command(port), env=env, cwd=folder, logs=logs, port=port)
    try:
        async with second.client() as http:
            assert (await http.get("/readyz")).status_code == 200
            # Same key, so the access token signed before the restart still verifies.
            assert await my_email(http, session["accessToken"]) == email
            again = await refreshed(http, session["refreshToken"])
            assert again["__typename"] == "AuthSession", again
    finally:
        await second.stop()
    assert key_file.read_text(encoding="utf-8").strip() == key
    second_log = second.log()
    assert str(key_file.resolve()) in second_log, second_log  # says which key it reuses
    assert key not in second_log


async def test_sqlite_serves_one_process_only(tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    logs = tmp_path / "logs"
    env = server_env(ENVIRONMENT="development", REQUIRE_EMAIL_VERIFICATION="false")

    code, output = await run_to_exit(
        strawgate_command(free_port(), "--workers", "2"), env=env, cwd=folder, logs=logs
    )
    assert code != 0, output
    assert "SQLite" in output, output

    port = free_port()
    async with running(strawgate_command(port), env=env, cwd=folder, logs=logs, port=port) as one:
        code, output = await run_to_exit(
            strawgate_command(free_port()), env=env, cwd=folder, logs=logs
        )
        assert code != 0, output
        assert "SQLite" in output, output
        assert "another process" in output, output
        # The first server is untouched by the attempt.
        assert one.process.returncode is None
        async with one.client() as http:
            assert (await http.get("/readyz")).status_code == 200
            await signed_up(http, unique_email())


# -- production settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "secret_key",
    [None, "too-short-0123456789abcdefghij", SECRET_KEY_PLACEHOLDER],
    ids=["missing", "short", "placeholder"],
)
async def test_production_refuses_to_start_without_a_good_secret_key(
    tmp_path: Path, secret_key: str | None
) -> None:
    env = server_env() if secret_key is None else server_env(SECRET_KEY=secret_key)
    code, output = await run_to_exit(
        uvicorn_command(free_port()), env=env, cwd=tmp_path, logs=tmp_path / "logs"
    )
    assert code != 0, output
    assert "SECRET_KEY" in output, output
    if secret_key is not None and secret_key != SECRET_KEY_PLACEHOLDER:
        assert secret_key not in output


async def test_production_serves_no_graphiql_and_no_introspection(
    tmp_path: Path, database_url: str
) -> None:
    env = production_env(database_url)
    async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
        async with server.client() as http:
            page = await http.get("/graphql", headers={"accept": "text/html"})
            is_html = "text/html" in page.headers.get("content-type", "")
            assert not (page.status_code == 200 and is_html), page.text[:500]
            assert "graphiql" not in page.text.lower()

            response = await post(http, "{ __schema { types { name } } }")
            body = response.json()
            assert body.get("errors"), body
            assert not body.get("data"), body
            assert "introspection" in body["errors"][0]["message"].lower(), body

            # The endpoint itself works.
            assert await ok(http, "{ __typename }") == {"__typename": "Query"}
        assert "production" in server.log()


# -- several processes on one PostgreSQL database ----------------------------------------


async def test_concurrent_refreshes_across_two_processes_share_one_successor(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    env = production_env(database_url)
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            first = await signed_up(one, unique_email())
            token = first["refreshToken"]
            clients = [one, two] * 5
            answers = await asyncio.gather(*(refreshed(http, token) for http in clients))

            assert [a["__typename"] for a in answers] == ["AuthSession"] * 10, answers
            successors = {a["refreshToken"] for a in answers}
            assert len(successors) == 1, answers
            (successor,) = successors
            assert successor != token
            # The successor rotates on, at either process.
            third = await refreshed(two, successor)
            assert third["__typename"] == "AuthSession", third
            assert await my_email(one, third["accessToken"]) == first["user"]["email"]

    ((session, tokens),) = await session_rows(database_url, first["user"]["id"])
    assert [t.generation for t in tokens] == [0, 1, 2]
    assert session.revoked_at is None


async def test_concurrent_refreshes_without_reuse_interval_rotate_once(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """With REFRESH_TOKEN_REUSE_INTERVAL=0 a racing request may be served as a retry (its
    clock reading came before the winner's) or seen as reuse, ending the session. What
    must hold: one successor generation, never a lost update, never an internal error."""
    env = production_env(database_url, REFRESH_TOKEN_REUSE_INTERVAL="0")
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            first = await signed_up(one, unique_email())
            token = first["refreshToken"]
            clients = [one, two] * 5
            answers = await asyncio.gather(*(refreshed(http, token) for http in clients))

            issued = [a for a in answers if a["__typename"] == "AuthSession"]
            refused = [a for a in answers if a["__typename"] == "AuthError"]
            assert len(issued) + len(refused) == len(answers), answers
            assert issued, answers  # the rotation that won the lock
            assert len({a["refreshToken"] for a in issued}) == 1, answers
            assert issued[0]["refreshToken"] != token
            assert {a["code"] for a in refused} <= {"TOKEN_REUSED", "INVALID_TOKEN"}, refused

            rows = await session_rows(database_url, first["user"]["id"])
            ((session, tokens),) = rows
            assert [t.generation for t in tokens] == [0, 1]
            assert tokens[0].rotated_at is not None
            assert tokens[1].rotated_at is None
            if any(a["code"] == "TOKEN_REUSED" for a in refused):
                assert session.revoked_at is not None
                assert session.revoke_reason == "refresh_token_reused"

            # Presented once more, later than its rotation: reuse, whatever the race gave.
            late = await refreshed(two, token)
            assert late["__typename"] == "AuthError", late
            assert late["code"] in {"TOKEN_REUSED", "INVALID_TOKEN"}, late

    ((session, tokens),) = await session_rows(database_url, first["user"]["id"])
    assert [t.generation for t in tokens] == [0, 1]
    assert session.revoked_at is not None
    assert session.revoke_reason == "refresh_token_reused"


@pytest.mark.parametrize(
    ("forwarded_allow_ips", "recorded"),
    [("127.0.0.1", "198.51.100.9"), ("10.9.9.9", "127.0.0.1")],
    ids=["trusted-proxy", "untrusted-proxy"],
)
async def test_proxy_headers_count_only_from_trusted_proxies(
    tmp_path: Path,
    database_url: str,
    clean_db: None,
    forwarded_allow_ips: str,
    recorded: str,
) -> None:
    env = production_env(database_url, FORWARDED_ALLOW_IPS=forwarded_allow_ips)
    port = free_port()
    command = strawgate_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as srv:
        async with srv.client() as http:
            data = await ok(
                http,
                SIGNUP,
                {"i": {"email": unique_email(), "password": PASSWORD}},
                headers={"x-forwarded-for": "198.51.100.9"},
            )
    session = data["signup"]
    assert session["__typename"] == "AuthSession", session
    ((row, _tokens),) = await session_rows(database_url, session["user"]["id"])
    assert row.ip == recorded


# -- PostgreSQL goes away and comes back ---------------------------------------------------


@pytest.fixture
def private_database() -> Iterator[tuple[PrivateCluster, str]]:
    """A throwaway cluster of this test's own (it is stopped and started), with a migrated
    database; the SQLAlchemy URL of that database. The machine's PostgreSQL is never used."""
    if find_pg_bin() is None:
        pytest.skip("needs the PostgreSQL server binaries (initdb, pg_ctl)")
    cluster = PrivateCluster.create()
    try:
        cluster.start()
        asyncio.run(admin_execute(cluster.admin_url, 'CREATE DATABASE "strawgate_outage"'))
        url = sqlalchemy_url(cluster.admin_url, "strawgate_outage")
        upgrade_head(url)
        yield cluster, url
    finally:
        cluster.destroy()


def assert_unavailable(response: httpx.Response, elapsed: float) -> None:
    assert elapsed < OUTAGE_BOUND, f"answered after {elapsed:.1f} s"
    assert response.status_code == 200, response.text
    body = response.json()
    errors = body.get("errors")
    assert errors, body
    codes = [error.get("extensions", {}).get("code") for error in errors]
    assert codes == ["SERVICE_UNAVAILABLE"] * len(errors), body
    for error in errors:
        assert error["extensions"]["requestId"] == response.headers["x-request-id"]
    lowered = response.text.lower()
    for leak in LEAKS:
        assert leak not in lowered, response.text


async def timed_post(
    http: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await post(http, query, variables, token=token)
    return response, time.monotonic() - started


async def wait_ready(server: Server, http: httpx.AsyncClient, limit: float) -> float:
    """Seconds until /readyz answers 200; fails after `limit` seconds."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < limit:
        assert server.process.returncode is None, server.log()
        try:
            response = await http.get("/readyz", timeout=3.0)
        except httpx.TransportError as exc:
            last = exc
        else:
            if response.status_code == 200:
                return time.monotonic() - started
            last = response.status_code
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz not 200 within {limit} s (last: {last}):\n{server.log()}")


async def test_postgres_outage_is_service_unavailable_and_the_process_recovers(
    tmp_path: Path, private_database: tuple[PrivateCluster, str]
) -> None:
    cluster, url = private_database
    env = production_env(url, DB_TIMEOUT="2")
    email = unique_email()
    credentials = {"i": {"email": email, "password": PASSWORD}}
    async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
        pid = server.pid
        async with server.client() as http:
            session = await signed_up(http, email)
            access = session["accessToken"]
            assert await my_email(http, access) == email

            await asyncio.to_thread(cluster.stop)

            response, elapsed = await timed_post(http, ME, token=access)
            assert_unavailable(response, elapsed)
            response, elapsed = await timed_post(http, LOGIN, credentials)
            assert_unavailable(response, elapsed)
            started = time.monotonic()
            ready = await http.get("/readyz")
            assert time.monotonic() - started < OUTAGE_BOUND
            assert ready.status_code == 503, ready.text
            # Still unavailable, not broken, on a second try.
            response, elapsed = await timed_post(http, ME, token=access)
            assert_unavailable(response, elapsed)
            assert server.process.returncode is None, server.log()

            await asyncio.to_thread(cluster.start)

            await wait_ready(server, http, RECOVERY_BOUND)
            assert await my_email(http, access) == email
            again = await logged_in(http, email)
            assert await my_email(http, again["accessToken"]) == email
            assert server.process.returncode is None
            assert server.pid == pid


# -- two-factor across processes -----------------------------------------------------------


async def test_one_totp_code_signs_in_once_across_two_processes(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """The same code sent at once to two server processes (two challenges): one session."""
    import time

    import pyotp

    from tests.gql import VERIFY_OTP, prove_address_in
    from tests.graph.test_mfa import CONFIRM, SETUP

    env = production_env(database_url)
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            email = unique_email()
            token = (await signed_up(one, email))["accessToken"]
            await prove_address_in(database_url, email)
            secret = (await ok(one, SETUP, token=token))["setupTotp"]["secret"]
            totp = pyotp.TOTP(secret)
            confirmed = await ok(one, CONFIRM, {"i": {"code": totp.now()}}, token=token)
            assert confirmed["confirmTotp"]["__typename"] == "RecoveryCodes"
            challenges = []
            for http in (one, two):
                answer = await ok(http, LOGIN, {"i": {"email": email, "password": PASSWORD}})
                challenges.append(answer["login"]["challengeToken"])
            # The step after the one that confirmed: unused, and inside the window.
            code = totp.at(time.time() + 30)
            answers = await asyncio.gather(
                *(
                    ok(http, VERIFY_OTP, {"i": {"challengeToken": c, "code": code}})
                    for http, c in zip((one, two), challenges, strict=True)
                )
            )
    kinds = sorted(a["verifyOtp"].get("code") or a["verifyOtp"]["__typename"] for a in answers)
    assert kinds == ["AuthSession", "INVALID_OTP"]


# -- two processes, one Redis ------------------------------------------------------------


@pytest.mark.slow
async def test_two_processes_share_limits_lockout_and_reuse_detection(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """Behind a load balancer: the rate limits (Redis), the lockout (PostgreSQL) and the
    refresh-reuse detection hold across two server processes."""
    if not redis_reachable():
        pytest.skip("no Redis at 127.0.0.1:6379")
    env = production_env(
        database_url,
        REDIS_URL="redis://127.0.0.1:6379/0",
        REDIS_KEY_PREFIX=f"strawgate-test-{uuid.uuid4().hex[:8]}",
        RATE_LIMITS__SIGNUP_IP="4/minute",
        RATE_LIMITS__LOGIN_IP="1000/minute",
        RATE_LIMITS__LOGIN_ACCOUNT="1000/minute",
    )
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            # The budget is shared: four signups from this address in all, not per process.
            answers = []
            for http in (one, two, one, two, one):
                data = await ok(
                    http, SIGNUP, {"i": {"email": unique_email(), "password": PASSWORD}}
                )
                answers.append(data["signup"])
            kinds = [a.get("code") or a["__typename"] for a in answers]
            assert kinds == ["AuthSession"] * 4 + ["RATE_LIMITED"], kinds
            email = answers[0]["user"]["email"]
            # Failures at either process add up to one lockout.
            for http in (one, two, one, two, one):
                data = await ok(http, LOGIN, {"i": {"email": email, "password": "wrong!"}})
                assert data["login"]["code"] == "INVALID_CREDENTIALS"
            for http in (one, two):
                data = await ok(http, LOGIN, {"i": {"email": email, "password": PASSWORD}})
                assert data["login"]["code"] == "RATE_LIMITED"
            # A refresh token spent at one process is reuse at the other.
            token = answers[1]["refreshToken"]
            rotated = await refreshed(one, token)
            assert rotated["__typename"] == "AuthSession"
            # Within the reuse interval the other process answers the same successor ...
            again = await refreshed(two, token)
            assert again["refreshToken"] == rotated["refreshToken"]
            onward = await refreshed(two, rotated["refreshToken"])
            assert onward["__typename"] == "AuthSession"
            # ... but once that successor has itself been rotated, it is reuse.
            reused = await refreshed(one, token)
            assert reused["code"] == "TOKEN_REUSED"


async def test_production_logs_are_json_lines_with_the_request_id(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    import json

    env = production_env(database_url)
    async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
        async with server.client() as http:
            response = await post(
                http,
                LOGIN,
                {"i": {"email": unique_email(), "password": "a wrong password"}},
                headers={"x-request-id": "trace-0123"},
            )
            assert response.headers["x-request-id"] == "trace-0123"
    ours = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert ours, server.log()
    assert all({"at", "level", "logger", "message", "request_id"} <= set(line) for line in ours)
    failed = [line for line in ours if line["message"] == "security event LOGIN_FAILED"]
    assert failed and failed[0]["request_id"] == "trace-0123"
    assert "a wrong password" not in server.log()


async def test_strawgate_serve_logs_nothing_but_json_in_production(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """uvicorn's own lines (start, access, shutdown) too; a security event's fields are
    fields of the line, not a string inside its message."""
    import json

    env = production_env(database_url)
    port = free_port()
    command = strawgate_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as srv:
        async with srv.client() as http:
            response = await post(
                http,
                LOGIN,
                {"i": {"email": "nobody@example.com", "password": "a wrong password"}},
                headers={"x-request-id": "trace-4567"},
            )
            assert response.status_code == 200
            assert (await http.get("/readyz?token=not-for-the-log")).status_code == 200
    output = srv.log()
    lines = [json.loads(line) for line in output.splitlines()]
    assert all(isinstance(line, dict) for line in lines), output
    assert all({"at", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    said = [(line["logger"], line["message"]) for line in lines]
    assert ("uvicorn.error", "Application startup complete.") in said, output
    assert ("uvicorn.error", "Shutting down") in said, output
    assert ("uvicorn.error", "Application shutdown complete.") in said, output
    assert ("strawgate", "Strawgate stopped: background work ended, connections closed") in said
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    login = next(line for line in access if line["http"]["path"] == "/graphql")
    assert login["request_id"] == "trace-4567"
    assert (login["http"]["method"], login["http"]["status"]) == ("POST", 200)
    ready = next(line for line in access if line["http"]["path"] == "/readyz")
    assert "?" not in ready["message"] and "not-for-the-log" not in output
    (failed,) = [line for line in lines if line["logger"] == "strawgate.security"]
    assert failed["message"] == "security event LOGIN_FAILED"
    assert failed["request_id"] == "trace-4567"
    event = failed["security_event"]
    assert event["event"] == "LOGIN_FAILED" and event["email"] == "nobody@example.com"
    assert event["ip"] == "127.0.0.1" and event["user_agent"] == "pytest"
    assert event["user_id"] is None and isinstance(event["id"], int)
    assert "a wrong password" not in output


async def test_a_migration_at_start_logs_json_too(tmp_path: Path) -> None:
    """Production on SQLite migrates at start (AUTO_MIGRATE): Alembic's own lines must
    not turn the log back into text."""
    import json

    env = production_env(f"sqlite+aiosqlite:///{tmp_path}/strawgate.db")
    port = free_port()
    command = strawgate_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as srv:
        async with srv.client() as http:
            assert (await http.get("/readyz")).status_code == 200
    output = srv.log()
    assert output.strip()
    for line in output.splitlines():
        assert isinstance(json.loads(line), dict), line


async def test_strawgate_serve_logs_readable_text_in_development(tmp_path: Path) -> None:
    env = server_env(ENVIRONMENT="development", REQUIRE_EMAIL_VERIFICATION="false")
    port = free_port()
    command = strawgate_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as srv:
        async with srv.client() as http:
            await signed_up(http, unique_email())
    output = srv.log()
    assert not [line for line in output.splitlines() if line.startswith("{")], output
    assert " INFO uvicorn.error [-]: Application startup complete." in output
    assert " INFO uvicorn.access [" in output and '- "POST /graphql HTTP/1.1" 200' in output
    assert " INFO strawgate.security [" in output and "]: security event SIGNUP id=" in output


@pytest.mark.slow
async def test_metrics_add_up_across_workers(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """`strawgate serve --workers 2`: whichever worker answers /metrics counts every
    worker's requests (prometheus-client's multiprocess mode)."""
    if not redis_reachable():
        pytest.skip("no Redis at 127.0.0.1:6379 (several workers need REDIS_URL)")
    env = production_env(
        database_url,
        REDIS_URL="redis://127.0.0.1:6379/0",
        REDIS_KEY_PREFIX=f"strawgate-test-{uuid.uuid4().hex[:8]}",
    )
    port = free_port()
    command = strawgate_command(port, "--workers", "2")
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port):
        base = f"http://127.0.0.1:{port}"
        for _ in range(40):  # a new connection each: the kernel spreads them over workers
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                response = await http.post("/graphql", json={"query": ME})
                assert response.status_code == 200
        seen = set()
        for _ in range(6):
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                text = (await http.get("/metrics")).text
            line = next(
                line
                for line in text.splitlines()
                if line.startswith('strawgate_http_requests_total{route="/graphql",status="200"}')
            )
            seen.add(float(line.rsplit(" ", 1)[1]))
    assert seen == {40.0}, seen


# -- graceful shutdown --------------------------------------------------------------------


async def test_shutdown_finishes_requests_in_flight_then_stops_background_work(
    tmp_path: Path, database_url: str
) -> None:
    """SIGTERM while a request is half-sent: the server takes no new connection, the
    request still gets its whole answer, and then the lifespan ends the background work
    (mail sender, housekeeper, pools) before the process exits."""
    env = production_env(database_url, LOG_FORMAT="text")
    port = free_port()
    server = await start(
        strawgate_command(port), env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port
    )
    body = (
        b'{"query": "mutation($i: LoginInput!) { login(input: $i) { __typename } }",'
        b' "variables": {"i": {"email": "nobody@example.com", "password": "not it at all"}}}'
    )  # a request that reads the database and hashes a password
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        await writer.drain()
        # Another request answered means the server's loop has read the first one's
        # headers (they were sent before this connection opened).
        async with server.client() as http:
            assert (await http.get("/healthz")).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        # Until the listening socket is closed: then no new connection gets in.
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, server.log()
            try:
                _, probe = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                break
            probe.close()
            await probe.wait_closed()
            await asyncio.sleep(0.02)
        assert "Strawgate stopped" not in server.log()  # the lifespan waits for requests
        writer.write(body[10:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert b'"__typename":"AuthError"' in payload.replace(b" ", b""), answer
        # uvicorn re-raises the signal once shut down: "ended by SIGTERM", as a process
        # manager expects of a clean stop.
        assert await asyncio.wait_for(server.process.wait(), 10) in (0, -signal.SIGTERM)
        log = server.log()
        assert log.index("Shutting down") < log.index("Strawgate stopped: background work ended")
        assert "Traceback" not in log and "ERROR" not in log
    finally:
        writer.close()
        await server.stop()


async def test_a_stalled_client_cannot_hold_shutdown_past_the_graceful_timeout(
    tmp_path: Path, database_url: str
) -> None:
    """A request whose client never sends the rest of its body: after --graceful-timeout
    the server gives up on it, and the lifespan still stops the background work."""
    env = production_env(database_url, LOG_FORMAT="text")
    port = free_port()
    server = await start(
        strawgate_command(port, "--graceful-timeout", "1"),
        env=env,
        cwd=tmp_path,
        logs=tmp_path / "logs",
        port=port,
    )
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        async with server.client() as http:  # the stalled request's headers are read
            assert (await http.get("/healthz")).status_code == 200
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 10) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 8  # the timeout (1 s), not the client, ended it
        assert "Strawgate stopped: background work ended" in server.log()
    finally:
        writer.close()
        await server.stop()


async def test_a_server_whose_free_port_was_taken_meanwhile_starts_on_another(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite runs on several workers: a port picked free can be bound by another
    test's process before the server binds it. The server then starts on another port
    instead of failing the test."""
    import socket

    import tests.servers

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = int(busy.getsockname()[1])
    ports = iter([taken, free_port()])
    monkeypatch.setattr(tests.servers, "free_port", lambda: next(ports))
    try:
        env = production_env(database_url)
        async with running(env=env, cwd=tmp_path, logs=tmp_path / "logs") as server:
            assert server.port != taken
            async with server.client() as http:
                assert (await http.get("/healthz")).status_code == 200
    finally:
        busy.close()
