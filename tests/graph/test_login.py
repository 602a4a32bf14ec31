"""login: credentials, one answer for unknown and wrong, disabled accounts, hash upgrades."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from passlib.hash import bcrypt
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import User
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, SHIPPED_HASHING, MutableClock, client_for, unique_email
from tests.gql import ME, gql, login, signup


async def set_user(database_url: str, email: str, **values: object) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(update(User).where(User.email == email).values(**values))
    await engine.dispose()


async def stored_hash(database_url: str, email: str) -> str:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        value = (
            await conn.execute(select(User.password_hash).where(User.email == email))
        ).scalar_one()
    await engine.dispose()
    return str(value)


async def test_login_answers_a_session(client: httpx.AsyncClient) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    result = await login(client, f"  {email.upper()} ", PASSWORD)
    assert result["__typename"] == "AuthSession"
    assert result["user"]["email"] == email
    me = await gql(client, ME, token=result["accessToken"])
    assert me["data"]["me"]["email"] == email


async def test_wrong_password_and_unknown_email_get_one_answer(client: httpx.AsyncClient) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    wrong = await login(client, email, PASSWORD + "!")
    unknown = await login(client, unique_email(), PASSWORD)
    invalid = await login(client, "not an email", PASSWORD)
    for answer in (wrong, unknown, invalid):
        assert answer == {
            "__typename": "AuthError",
            "code": "INVALID_CREDENTIALS",
            "message": wrong["message"],
            "field": None,
            "retryAfter": None,
        }


@pytest.mark.timing
async def test_unknown_email_takes_about_as_long_as_a_wrong_password(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)

    async def timed(address: str) -> float:
        start = time.perf_counter()
        await login(client, address, "wrong password here")
        return time.perf_counter() - start

    known = statistics.median([await timed(email) for _ in range(7)])
    unknown = statistics.median([await timed(unique_email()) for _ in range(7)])
    # Both verify one argon2id hash; without the dummy verify `unknown` is ~20x faster.
    assert unknown > known * 0.5, (known, unknown)


async def test_disabled_account_is_told_only_after_the_right_password(
    client: httpx.AsyncClient, database_url: str
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    await set_user(database_url, email, is_active=False)
    assert (await login(client, email, "wrong password here"))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, PASSWORD))["code"] == "ACCOUNT_DISABLED"


async def test_password_is_nfkc_normalized(client: httpx.AsyncClient) -> None:
    email = unique_email()
    # U+212B ANGSTROM SIGN and U+FB01 LATIN SMALL LIGATURE FI normalize under NFKC.
    assert (await signup(client, email, "\u212b unfinished \ufb01ddle"))[
        "__typename"
    ] == "AuthSession"
    assert (await login(client, email, "\u00c5 unfinished fiddle"))["__typename"] == "AuthSession"


async def test_bcrypt_hashes_verify_and_are_upgraded(
    client: httpx.AsyncClient, database_url: str
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    await set_user(database_url, email, password_hash=bcrypt.hash(PASSWORD))
    assert (await login(client, email, "wrong password here"))["code"] == "INVALID_CREDENTIALS"
    assert (await stored_hash(database_url, email)).startswith("$2")
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"
    assert (await stored_hash(database_url, email)).startswith("$argon2id$")
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"


async def test_long_passwords_on_legacy_bcrypt_hashes(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """bcrypt < 5 hashed the first 72 bytes; bcrypt 5 raises on longer input. Such a hash
    verifies the 72-byte prefix, and the whole password is rehashed with argon2id."""
    email = unique_email()
    long_password = "é" * 50 + " and some more words"  # 100 UTF-8 bytes before the tail
    await signup(client, email, long_password)
    prefix = long_password.encode()[:72]
    await set_user(database_url, email, password_hash=bcrypt.hash(prefix))
    assert (await login(client, email, long_password))["__typename"] == "AuthSession"
    new_hash = await stored_hash(database_url, email)
    assert new_hash.startswith("$argon2id$")
    # The upgraded hash is of the whole password: the 72-byte prefix alone no longer works.
    assert (await login(client, email, prefix.decode()))["code"] == "INVALID_CREDENTIALS"
    assert (await login(client, email, long_password))["__typename"] == "AuthSession"


@pytest.fixture
async def shipped_hashing(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> AsyncIterator[httpx.AsyncClient]:
    """An app hashing with the shipped argon2 parameters (the suite's are lighter)."""
    app = create_app(make_settings(**SHIPPED_HASHING), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http


async def test_argon2_hash_uses_owasp_parameters(
    shipped_hashing: httpx.AsyncClient, database_url: str
) -> None:
    email = unique_email()
    await signup(shipped_hashing, email, PASSWORD)
    stored = await stored_hash(database_url, email)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


async def test_weaker_argon2_parameters_are_upgraded(
    shipped_hashing: httpx.AsyncClient, database_url: str
) -> None:
    from passlib.hash import argon2

    email = unique_email()
    await signup(shipped_hashing, email, PASSWORD)
    weak = argon2.using(type="ID", memory_cost=8192, time_cost=1, parallelism=1).hash(PASSWORD)
    await set_user(database_url, email, password_hash=weak)
    assert (await login(shipped_hashing, email, PASSWORD))["__typename"] == "AuthSession"
    assert "m=19456,t=2,p=1" in await stored_hash(database_url, email)


@pytest.mark.parametrize("password", ["", "x" * 257])
async def test_passwords_no_account_can_have_are_refused(
    client: httpx.AsyncClient, password: str
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    assert (await login(client, email, password))["code"] == "INVALID_CREDENTIALS"


async def test_login_ignores_the_authorization_header(client: httpx.AsyncClient) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    from tests.gql import LOGIN

    body = await gql(
        client, LOGIN, {"i": {"email": email, "password": PASSWORD}}, token="expired.garbage.token"
    )
    assert body["data"]["login"]["__typename"] == "AuthSession"
    assert "errors" not in body
