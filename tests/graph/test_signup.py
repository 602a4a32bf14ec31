"""signup: account creation, email rules, password policy, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import User, UserSession
from db.settings import Settings
from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import ME, gql, signup


async def count_users(database_url: str, email_normalized: str | None = None) -> int:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            query = select(func.count()).select_from(User)
            if email_normalized is not None:
                query = query.where(User.email_normalized == email_normalized)
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def test_signup_answers_a_session_that_me_accepts(client: httpx.AsyncClient) -> None:
    email = unique_email()
    result = await signup(client, email, PASSWORD)
    assert result["__typename"] == "AuthSession"
    assert result["tokenType"] == "Bearer"
    assert result["expiresIn"] == 15 * 60
    assert len(result["refreshToken"]) >= 43  # 256 bits, base64url
    assert result["user"]["email"] == email
    assert result["user"]["emailVerified"] is False
    assert result["user"]["otpEnabled"] is False
    me = await gql(client, ME, token=result["accessToken"])
    assert me == {"data": {"me": result["user"]}}


async def test_signup_records_the_session(client: httpx.AsyncClient, database_url: str) -> None:
    result = await signup(client, unique_email(), PASSWORD)
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        row = (await conn.execute(select(UserSession))).one()
    await engine.dispose()
    assert str(row.user_id) == result["user"]["id"]
    assert row.ip == "203.0.113.7"
    assert row.user_agent == "pytest"
    assert row.amr == "pwd"
    assert row.created_at.tzinfo is not None
    assert row.absolute_expires_at - row.created_at == __import__("datetime").timedelta(days=30)
    # Unless refreshed sooner: the idle timeout (SESSION_IDLE_TIMEOUT).
    assert row.expires_at - row.created_at == __import__("datetime").timedelta(days=14)


async def test_email_is_trimmed_and_unique_case_insensitively(client: httpx.AsyncClient) -> None:
    first = await signup(client, "  Alice.Smith@Example.COM ", PASSWORD)
    assert first["__typename"] == "AuthSession"
    assert first["user"]["email"] == "Alice.Smith@Example.COM"
    again = await signup(client, "alice.smith@example.com", PASSWORD)
    assert again["__typename"] == "AuthError"
    assert again["code"] == "EMAIL_TAKEN"
    assert again["field"] == "email"


async def test_no_provider_rules(client: httpx.AsyncClient) -> None:
    assert (await signup(client, "ab.c+tag@example.com", PASSWORD))["__typename"] == "AuthSession"
    assert (await signup(client, "abc@example.com", PASSWORD))["__typename"] == "AuthSession"


async def test_international_addresses_are_normalized(
    client: httpx.AsyncClient, database_url: str
) -> None:
    # Punycode and Unicode spellings of one domain, and a local part that casefolds.
    first = await signup(client, "STRASSE@xn--mnchen-3ya.example", PASSWORD)
    assert first["__typename"] == "AuthSession", first
    again = await signup(client, "strasse@MÜNCHEN.example", PASSWORD)
    assert again["code"] == "EMAIL_TAKEN"
    assert await count_users(database_url, "strasse@münchen.example") == 1


@pytest.mark.parametrize(
    "email",
    [
        "",
        "   ",
        "not-an-email",
        "a@b",
        "user@localhost",
        "user@example.test",
        "user@printer.local",
        "two@@example.com",
        "Bob <bob@example.com>",
        "x" * 250 + "@example.com",
    ],
)
async def test_invalid_email_is_refused(client: httpx.AsyncClient, email: str) -> None:
    result = await signup(client, email, PASSWORD)
    assert result["__typename"] == "AuthError"
    assert result["code"] == "INVALID_INPUT"
    assert result["field"] == "email"


@pytest.mark.parametrize("field", ["email", "password"])
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\n"])
async def test_control_characters_are_refused(
    client: httpx.AsyncClient, database_url: str, field: str, char: str
) -> None:
    values = {"email": unique_email(), "password": PASSWORD}
    values[field] = values[field][:5] + char + values[field][5:]
    result = await signup(client, values["email"], values["password"])
    assert result["code"] == "INVALID_INPUT"
    assert result["field"] == field
    assert await count_users(database_url) == 0


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short", "at least 8"),
        ("x" * 257, "at most 256"),
        ("password1", "common"),
        ("PassWord1", "common"),  # the blocklist matches case-insensitively
        ("iloveyou", "common"),
        (
            "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44\uff11",
            "common",
        ),  # NFKC first: full-width forms are the same password
    ],
)
async def test_weak_passwords_are_refused_with_a_reason(
    client: httpx.AsyncClient, database_url: str, password: str, why: str
) -> None:
    result = await signup(client, unique_email(), password)
    assert result["code"] == "WEAK_PASSWORD"
    assert result["field"] == "password"
    assert why in result["message"]
    assert await count_users(database_url) == 0


async def test_no_composition_rules(client: httpx.AsyncClient) -> None:
    for password in ("all lowercase words here", "пароль-на-русском-языке", "🔑🔑🔑🔑🔑🔑🔑🔑"):
        assert (await signup(client, unique_email(), password))["__typename"] == "AuthSession"


async def test_minimum_length_is_configurable(
    make_settings: Callable[..., Settings], clock: MutableClock
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for

    app = create_app(make_settings(password_min_length=12), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        result = await signup(http, unique_email(), "elevenchars")
    assert result["code"] == "WEAK_PASSWORD"
    assert "at least 12" in result["message"]


async def test_concurrent_signups_with_one_address_make_one_account(
    client: httpx.AsyncClient, database_url: str
) -> None:
    email = unique_email()
    results = await asyncio.gather(
        *(signup(client, email.upper() if i % 2 else email, PASSWORD) for i in range(6))
    )
    kinds = sorted(r.get("code") or r["__typename"] for r in results)
    assert kinds == ["AuthSession"] + ["EMAIL_TAKEN"] * 5
    assert await count_users(database_url) == 1
