"""`strawgate users show|disable|enable|unlock|logout EMAIL` and `strawgate users passkeys
remove EMAIL ID`, run as an operator runs it (on the configured database, in a folder
without a .env) while the app serves the account: in the tests' own process (tests/cli.py:
a process costs about a second), and as the installed console script where a test runs
strawgate_process."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from db.migrate import upgrade_head
from db.models import (
    Challenge,
    Identity,
    LoginThrottle,
    Passkey,
    SecurityEvent,
    User,
    UserSession,
)
from db.security.tokens import token_digest
from db.settings import Settings
from graph.app import create_app
from tests.cli import strawgate as in_process
from tests.conftest import UNLIMITED, MutableClock, client_for, unique_email
from tests.gql import ME, PASSWORD, gql, login, logout, refresh, signup
from tests.servers import redis_reachable, server_env, strawgate_script

WRONG = "not the password at all"
TIMEOUT = 30.0


def settings_env(database_url: str | None, env: dict[str, str]) -> dict[str, str]:
    """The command's settings: only DATABASE_URL, ENVIRONMENT (development unless `env`
    says otherwise) and `env`."""
    overrides = {"ENVIRONMENT": "development", **env}
    if database_url is not None:
        overrides["DATABASE_URL"] = database_url
    return overrides


async def strawgate(
    cwd: Path, database_url: str | None, *args: str, **env: str
) -> tuple[int, str, str]:
    """`strawgate users ARGS` in this process (tests/cli.py) with only DATABASE_URL (and
    `env`) set, in a folder without a .env: (exit status, stdout, stderr)."""
    return await in_process("users", *args, cwd=cwd, **settings_env(database_url, env))


async def strawgate_process(
    cwd: Path, database_url: str | None, *args: str, **env: str
) -> tuple[int, str, str]:
    """strawgate, as the installed console script: a process of its own."""
    process = await asyncio.create_subprocess_exec(
        strawgate_script(),
        "users",
        *args,
        cwd=cwd,
        env=server_env(**settings_env(database_url, env)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return int(process.returncode or 0), out.decode(), err.decode()


async def ok(cwd: Path, database_url: str | None, *args: str, **env: str) -> str:
    code, out, err = await strawgate(cwd, database_url, *args, **env)
    assert code == 0, (code, out, err)
    return out


async def rows(database_url: str, statement: Any) -> list[Any]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(statement)).all())
    finally:
        await engine.dispose()


async def write(database_url: str, statement: Any) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(statement)
    finally:
        await engine.dispose()


async def events(database_url: str, user_id: str, kind: str) -> list[dict[str, Any]]:
    found = await rows(
        database_url,
        select(SecurityEvent.details)
        .where(SecurityEvent.user_id == uuid.UUID(user_id), SecurityEvent.kind == kind)
        .order_by(SecurityEvent.id),
    )
    return [json.loads(row.details) for row in found]


async def device_epoch(database_url: str, user_id: str) -> int:
    (row,) = await rows(
        database_url, select(User.device_epoch).where(User.id == uuid.UUID(user_id))
    )
    return int(row.device_epoch)


async def revoke_reasons(database_url: str, user_id: str) -> list[str | None]:
    found = await rows(
        database_url,
        select(UserSession.revoke_reason).where(UserSession.user_id == uuid.UUID(user_id)),
    )
    return [row.revoke_reason for row in found]


async def assert_ended(client: httpx.AsyncClient, session: dict[str, Any]) -> None:
    """Its access token no longer works, nor does its refresh token."""
    me = await gql(client, ME, token=session["accessToken"])
    assert me["data"] == {"me": None}
    assert me["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await refresh(client, session["refreshToken"]))["code"] == "INVALID_TOKEN"


async def pending_challenge(database_url: str, user_id: str) -> uuid.UUID:
    now = datetime.now(UTC)
    challenge_id = uuid.uuid4()
    await write(
        database_url,
        insert(Challenge).values(
            id=challenge_id,
            token_hash=secrets.token_bytes(32),
            user_id=uuid.UUID(user_id),
            purpose="LOGIN",
            method="TOTP",
            amr="pwd",
            created_at=now,
            expires_at=now + timedelta(minutes=5),
        ),
    )
    return challenge_id


async def test_disable_ends_everything_and_enable_lets_the_account_back_in(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    first = await signup(client, email, PASSWORD)
    second = await login(client, email, PASSWORD)
    stranger = await signup(client, unique_email(), PASSWORD)
    user_id = first["user"]["id"]
    challenge = await pending_challenge(database_url, user_id)
    epoch = await device_epoch(database_url, user_id)

    # Any case and spacing: accounts are found by their normalized address.
    # LOGNAME is anyone's to set: the event names the process's own user instead.
    out = await ok(tmp_path, database_url, "disable", f" {email.upper()} ", LOGNAME="mallory")
    assert f"disabled {email}" in out and "ended 2 session(s)" in out
    assert "voided 1 pending challenge(s)" in out
    # No prepare(): no development key was written beside the command.
    assert not (tmp_path / "var").exists()

    for session in (first, second):
        await assert_ended(client, session)
    assert (await gql(client, ME, token=stranger["accessToken"]))["data"]["me"] is not None
    # Told only after the right password.
    assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, PASSWORD))["code"] == "ACCOUNT_DISABLED"
    assert await revoke_reasons(database_url, user_id) == ["operator_disable"] * 2
    assert await device_epoch(database_url, user_id) == epoch + 1
    (voided,) = await rows(
        database_url, select(Challenge.consumed_at).where(Challenge.id == challenge)
    )
    assert voided.consumed_at is not None
    (event,) = await events(database_url, user_id, "OPERATOR_DISABLE")
    assert event["sessions"] == 2 and event["challenges"] == 1
    assert event["operator"] == pwd.getpwuid(os.getuid()).pw_name

    # Again: nothing to do, said so, no second event, device tokens left as they are.
    out = await ok(tmp_path, database_url, "disable", email)
    assert "already disabled" in out
    assert len(await events(database_url, user_id, "OPERATOR_DISABLE")) == 1
    assert await device_epoch(database_url, user_id) == epoch + 1

    out = await ok(tmp_path, database_url, "enable", email)
    assert f"enabled {email}" in out
    back = await login(client, email, PASSWORD)
    assert back["__typename"] == "AuthSession", back
    assert (await gql(client, ME, token=back["accessToken"]))["data"]["me"]["email"] == email
    # The sessions the disable ended stay ended.
    assert (await refresh(client, second["refreshToken"]))["code"] == "INVALID_TOKEN"
    (event,) = await events(database_url, user_id, "OPERATOR_ENABLE")
    assert event["operator"]
    assert "already active" in await ok(tmp_path, database_url, "enable", email)
    assert len(await events(database_url, user_id, "OPERATOR_ENABLE")) == 1


async def test_unlock_clears_a_lockout(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    user_id = (await signup(client, email, PASSWORD))["user"]["id"]
    for _ in range(5):
        assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    locked = await login(client, email, PASSWORD)
    assert (locked["code"], locked["retryAfter"]) == ("RATE_LIMITED", 30)
    # Wrong codes counted against this account (two clients), and against another one.
    now = datetime.now(UTC)
    other = uuid.uuid4()
    for key in (f"otp:{user_id}:203.0.113.7", f"otp:{user_id}:device-x", f"otp:{other}:x"):
        await write(
            database_url,
            insert(LoginThrottle).values(email=key, failures=2, last_failure_at=now),
        )
    shown = await ok(tmp_path, database_url, "show", email)
    assert "lockout         LOCKED until" in shown
    assert "(5 failed sign-in(s)" in shown and "4 wrong code(s) counted" in shown

    out = await ok(tmp_path, database_url, "unlock", email)
    assert "cleared 5 failed sign-in(s) and 4 wrong code(s)" in out
    assert "Redis" not in out  # none configured: nothing shared to clear
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"
    left = await rows(database_url, select(LoginThrottle.email))
    assert [row.email for row in left] == [f"otp:{other}:x"]
    (event,) = await events(database_url, user_id, "OPERATOR_UNLOCK")
    assert event["failures"] == 5 and event["otp_failures"] == 4 and event["operator"]

    assert "nothing changed" in await ok(tmp_path, database_url, "unlock", email)
    assert len(await events(database_url, user_id, "OPERATOR_UNLOCK")) == 1


@asynccontextmanager
async def app_client(settings: Settings, clock: MutableClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http


async def test_unlock_clears_the_account_rate_limit_in_redis(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    database_url: str,
    tmp_path: Path,
) -> None:
    if not redis_reachable():
        pytest.skip("no Redis at 127.0.0.1:6379")
    redis = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "REDIS_KEY_PREFIX": f"strawgate-test-{uuid.uuid4().hex[:8]}",
        "RATE_LIMITS__LOGIN_ACCOUNT": "3/minute",
    }
    settings = make_settings(
        redis_url=redis["REDIS_URL"],
        redis_key_prefix=redis["REDIS_KEY_PREFIX"],
        rate_limits=UNLIMITED.model_copy(update={"login_account": "3/minute"}),
    )
    async with app_client(settings, clock) as client:
        email = unique_email()
        await signup(client, email, PASSWORD)
        for _ in range(3):  # below the lockout's threshold: only the budget is spent
            assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
        assert (await login(client, email, PASSWORD))["code"] == "RATE_LIMITED"
        out = await ok(tmp_path, database_url, "unlock", email, **redis)
        assert "cleared its sign-in rate limit in Redis" in out
        assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_logout_ends_every_session_of_the_account(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    sessions = [await signup(client, email, PASSWORD), await login(client, email, PASSWORD)]
    stranger = await signup(client, unique_email(), PASSWORD)
    user_id = sessions[0]["user"]["id"]
    epoch = await device_epoch(database_url, user_id)

    # The installed console script, as an operator runs it.
    code, out, err = await strawgate_process(tmp_path, database_url, "logout", email)
    assert code == 0, (code, out, err)
    assert f"logged {email} out everywhere: ended 2 session(s)" in out
    for session in sessions:
        await assert_ended(client, session)
    assert (await gql(client, ME, token=stranger["accessToken"]))["data"]["me"] is not None
    assert await revoke_reasons(database_url, user_id) == ["operator_logout"] * 2
    assert await device_epoch(database_url, user_id) == epoch + 1
    (event,) = await events(database_url, user_id, "OPERATOR_LOGOUT")
    assert event["sessions"] == 2 and event["operator"]
    # The account stays active: signing in again works.
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_show_prints_the_account_and_no_secret(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    first = await signup(client, email, PASSWORD)
    second = await login(client, email, PASSWORD)
    ended = await login(client, email, PASSWORD)
    assert (await login(client, email, WRONG))["code"] == "INVALID_CREDENTIALS"
    assert await logout(client, ended["refreshToken"]) == 1
    user_id = uuid.UUID(first["user"]["id"])
    (stored,) = await rows(database_url, select(User.password_hash).where(User.id == user_id))
    live = await rows(
        database_url,
        select(UserSession.id)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .order_by(UserSession.id),
    )

    text = await ok(tmp_path, database_url, "show", email)
    assert email in text and str(user_id) in text
    assert "status          active" in text
    assert "two-factor      off" in text
    assert "not locked (1 failed sign-in(s)" in text
    assert "live sessions   2" in text
    for row in live:
        assert str(row.id) in text
    assert "203.0.113.7" in text and "pytest" in text
    for kind in ("SIGNUP", "LOGIN_SUCCEEDED", "LOGIN_FAILED", "LOGOUT"):
        assert kind in text

    as_json = json.loads(await ok(tmp_path, database_url, "show", email, "--json"))
    assert as_json["status"] == "active" and as_json["id"] == str(user_id)
    assert sorted(s["id"] for s in as_json["sessions"]) == [str(row.id) for row in live]
    assert as_json["lockout"] == {
        "locked": False,
        "failures": 1,
        "last_failure_at": as_json["lockout"]["last_failure_at"],
        "locked_until": None,
        "code_failures": 0,
    }
    kinds = [event["kind"] for event in as_json["events"]]
    assert kinds[0] == "LOGOUT" and kinds[-1] == "SIGNUP" and len(kinds) == 6

    for secret in (
        stored.password_hash,
        PASSWORD,
        *(s[name] for s in (first, second, ended) for name in ("refreshToken", "accessToken")),
        *(token_digest(s["refreshToken"]).hex() for s in (first, second, ended)),
    ):
        assert secret not in text
        assert secret not in json.dumps(as_json)


async def add_passkey(database_url: str, user_id: str, name: str, *, days_ago: int) -> uuid.UUID:
    passkey_id = uuid.uuid4()
    await write(
        database_url,
        insert(Passkey).values(
            id=passkey_id,
            user_id=uuid.UUID(user_id),
            credential_id=secrets.token_bytes(32),
            public_key=secrets.token_bytes(77),
            sign_count=0,
            aaguid=str(uuid.UUID(int=0)),
            backup_eligible=True,
            backed_up=days_ago == 0,
            user_verified=True,
            name=name,
            created_at=datetime.now(UTC) - timedelta(days=days_ago),
        ),
    )
    return passkey_id


async def test_show_lists_passkeys_and_remove_takes_one_away(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    session = await signup(client, email, PASSWORD)
    user_id = session["user"]["id"]
    older = await add_passkey(database_url, user_id, "YubiKey 5 \x1b[31mred", days_ago=3)
    newer = await add_passkey(database_url, user_id, "iCloud Keychain", days_ago=0)
    stranger = await signup(client, unique_email(), PASSWORD)
    theirs = await add_passkey(database_url, stranger["user"]["id"], "Theirs", days_ago=1)

    text = await ok(tmp_path, database_url, "show", email)
    assert "passkeys        2" in text
    assert text.index(str(newer)) < text.index(str(older))  # newest first
    assert "iCloud Keychain" in text and "synced" in text
    assert "\x1b" not in text  # a name cannot drive the terminal
    listed = json.loads(await ok(tmp_path, database_url, "show", email, "--json"))["passkeys"]
    assert [p["id"] for p in listed] == [str(newer), str(older)]
    assert set(listed[0]) == {"id", "name", "created_at", "last_used_at", "backed_up"}

    # Another account's passkey, an unknown id and no id at all change nothing.
    for wrong in (str(theirs), str(uuid.uuid4()), "not-an-id"):
        code, out, err = await strawgate(tmp_path, database_url, "passkeys", "remove", email, wrong)
        assert (code, out) == (1, ""), (wrong, code, out, err)
        assert f"strawgate: {email} has no passkey {wrong}" in err
    assert len(await rows(database_url, select(Passkey.id))) == 3

    out = await ok(tmp_path, database_url, "passkeys", "remove", email, str(older), "--json")
    answer = json.loads(out)
    assert answer["action"] == "passkeys remove" and answer["changed"] is True
    assert answer["passkey"]["id"] == str(older)
    left = await rows(database_url, select(Passkey.id).where(Passkey.user_id == uuid.UUID(user_id)))
    assert [row.id for row in left] == [newer]
    (event,) = await events(database_url, user_id, "PASSKEY_REMOVED")
    assert event["passkey"] == str(older) and event["operator"]
    # The account's sessions go on: removing a passkey is not a logout.
    assert (await gql(client, ME, token=session["accessToken"]))["data"]["me"] is not None
    text = (await ok(tmp_path, database_url, "passkeys", "remove", email, str(newer))).strip()
    assert text.startswith(f"removed the passkey {newer} (iCloud Keychain) of {email}")


async def test_unknown_or_invalid_email(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    await signup(client, unique_email(), PASSWORD)
    unknown = unique_email()
    actions = ("show", "disable")  # the other actions find the account as disable does
    answers = [await strawgate(tmp_path, database_url, action, unknown) for action in actions]
    answers.append(await strawgate(tmp_path, database_url, "disable", "not an email"))
    for action, (code, out, err) in zip(actions, answers, strict=False):
        assert (code, out) == (1, ""), (action, code, out, err)
        assert f"strawgate: no account with the email {unknown}" in err
    code, out, err = answers[-1]
    assert (code, out) == (2, "")
    assert "is not an email address" in err
    kinds = {row.kind for row in await rows(database_url, select(SecurityEvent.kind))}
    assert not any(kind.startswith("OPERATOR_") for kind in kinds), kinds


async def test_production_defaults_and_sqlite(tmp_path: Path) -> None:
    """ENVIRONMENT unset (production) with only DATABASE_URL, on SQLite (FOR UPDATE is
    ignored there; its BEGIN IMMEDIATE orders the writes)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/strawgate.db"
    missing = await strawgate(tmp_path, url, "show", "a@example.com", ENVIRONMENT="production")
    assert missing[0] == 1 and "no database at" in missing[2]

    (tmp_path / "data").mkdir()
    await asyncio.to_thread(upgrade_head, url)
    now = datetime.now(UTC)
    user_id = uuid.uuid4()
    await write(
        url,
        insert(User).values(
            id=user_id,
            email="Someone@Example.com",
            email_normalized="someone@example.com",
            password_hash="$argon2id$not-a-real-hash",
            is_active=True,
            created_at=now,
            updated_at=now,
        ),
    )
    await write(
        url,
        insert(UserSession).values(
            id=uuid.uuid4(),
            user_id=user_id,
            created_at=now,
            last_used_at=now,
            auth_time=now,
            expires_at=now + timedelta(days=1),
            absolute_expires_at=now + timedelta(days=30),
            amr="pwd",
        ),
    )
    env = {"ENVIRONMENT": "production"}
    out = await ok(tmp_path, url, "disable", "someone@example.com", **env)
    assert "ended 1 session(s)" in out
    shown = json.loads(await ok(tmp_path, url, "show", "SOMEONE@example.com", "--json", **env))
    assert shown["status"] == "disabled" and shown["sessions"] == []
    assert [event["kind"] for event in shown["events"]] == ["OPERATOR_DISABLE"]
    assert "$argon2id$" not in json.dumps(shown)


async def test_a_bad_setting_is_named_not_a_traceback(tmp_path: Path, database_url: str) -> None:
    code, out, err = await strawgate_process(
        tmp_path, database_url, "show", "someone@example.com", DB_TIMEOUT="soon"
    )
    assert code == 2, (code, out, err)
    assert "DB_TIMEOUT" in err and "Traceback" not in err


async def test_show_lists_linked_identities(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    session = await signup(client, email, PASSWORD)
    now = datetime.now(UTC)
    await write(
        database_url,
        insert(Identity).values(
            id=uuid.uuid4(),
            user_id=uuid.UUID(session["user"]["id"]),
            provider="google",
            subject="1234567890",
            email="ada@gmail.example",
            name="Ada",
            created_at=now,
            last_used_at=now,
        ),
    )

    text = await ok(tmp_path, database_url, "show", email)
    assert "identities      1" in text
    assert "google  ada@gmail.example, linked" in text
    listed = json.loads(await ok(tmp_path, database_url, "show", email, "--json"))["identities"]
    assert [(i["provider"], i["email"]) for i in listed] == [("google", "ada@gmail.example")]
    assert "1234567890" not in text  # the provider's subject is the export's, not the console's


async def test_roles_granted_by_an_operator_reach_the_access_tokens_at_the_next_refresh(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    session = await signup(client, email, PASSWORD)
    user_id = session["user"]["id"]
    assert jwt.get_unverified_claims(session["accessToken"])["roles"] == []

    out = await ok(tmp_path, database_url, "roles", "add", email, "support")
    assert f"added the role support to {email}" in out
    await ok(tmp_path, database_url, "roles", "add", email, "admin")
    again = await ok(tmp_path, database_url, "roles", "add", email, "admin")
    assert "already has the role admin; nothing changed" in again
    assert await ok(tmp_path, database_url, "roles", "list", email) == "admin\nsupport\n"

    # The token in hand keeps what it said; the next refresh carries the change.
    assert jwt.get_unverified_claims(session["accessToken"])["roles"] == []
    renewed = await refresh(client, session["refreshToken"])
    assert jwt.get_unverified_claims(renewed["accessToken"])["roles"] == ["admin", "support"]
    me = await gql(client, "{ me { roles } }", token=renewed["accessToken"])
    assert me["data"]["me"]["roles"] == ["admin", "support"]
    signed_in = await login(client, email, PASSWORD)
    assert jwt.get_unverified_claims(signed_in["accessToken"])["roles"] == ["admin", "support"]

    removed = json.loads(
        await ok(tmp_path, database_url, "roles", "remove", email, "support", "--json")
    )
    assert removed["changed"] is True
    renewed = await refresh(client, renewed["refreshToken"])
    assert jwt.get_unverified_claims(renewed["accessToken"])["roles"] == ["admin"]
    changes = await events(database_url, user_id, "ROLES_CHANGED")
    assert [(e["role"], e["change"]) for e in changes] == [
        ("support", "added"),
        ("admin", "added"),
        ("support", "removed"),
    ]
    assert {e["operator"] for e in changes} == {pwd.getpwuid(os.getuid()).pw_name}
    shown = json.loads(await ok(tmp_path, database_url, "show", email, "--json"))
    assert shown["roles"] == ["admin"]
    exported = await gql(client, "{ exportAccount { json } }", token=renewed["accessToken"])
    document = json.loads(exported["data"]["exportAccount"]["json"])
    assert [r["role"] for r in document["roles"]] == ["admin"]


async def test_a_role_that_cannot_be_one_is_refused(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    roles = ["", "two words", ".lead", "x" * 65, "emoji\u2603"]
    answers = [
        await strawgate(tmp_path, database_url, "roles", "add", email, role) for role in roles
    ]
    for role, (code, out, err) in zip(roles, answers, strict=True):
        assert code == 2 and out == "", (role, code, out, err)
        assert "is not a role name" in err, (role, err)
    assert await ok(tmp_path, database_url, "roles", "list", email) == ""


async def test_the_commands_changes_are_webhook_events(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    """The command line writes the webhook events of its changes, as a server does."""
    from db.models import WebhookEvent

    email = unique_email()
    first = await signup(client, email, PASSWORD)
    user_id = uuid.UUID(first["user"]["id"])
    hooks = {
        "WEBHOOK_ENDPOINTS": '[{"url": "http://127.0.0.1:9/h",'
        ' "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}]',
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    for action in (("roles", "add"), ("disable",), ("enable",)):
        if action == ("roles", "add"):
            await ok(tmp_path, database_url, *action, email, "admin", **hooks)
        else:
            await ok(tmp_path, database_url, *action, email, **hooks)
    written = await rows(
        database_url,
        select(WebhookEvent.type, WebhookEvent.payload)
        .where(WebhookEvent.user_id == user_id)
        .order_by(WebhookEvent.seq),
    )
    assert [(row.type, json.loads(row.payload)["data"].get("reason")) for row in written] == [
        ("user.roles_changed", None),
        ("session.revoked", "operator_disable"),
        ("user.disabled", None),
        ("user.enabled", None),
    ]
