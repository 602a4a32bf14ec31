"""Password hashing: off the event loop, bounded, and never of an over-long password."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from db.clock import SystemClock
from db.errors import AuthFailure, ErrorCode
from db.mail.outbox import Outbox
from db.security.box import SecretBox
from db.security.limiter import RateLimiter
from db.security.passwords import PasswordHasher
from db.services.auth import ClientInfo
from db.session import Statements, create_engine
from db.settings import Settings
from graph.app import make_auth
from tests.conftest import (
    PASSWORD,
    SHIPPED_HASHING,
    TEST_FERNET_KEY,
    TEST_SECRET,
    MutableClock,
)


async def test_hashing_runs_off_the_event_loop() -> None:
    hasher = PasswordHasher(workers=2)
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    for _ in range(4):
        await hasher.hash(PASSWORD)
    elapsed = time.perf_counter() - start
    done = True
    await task
    # Four hashes took tens of milliseconds; the loop never stalled for the length of one.
    assert elapsed > 0.04
    assert max(gaps) < elapsed / 3


async def test_more_waiters_than_four_per_worker_are_refused() -> None:
    hasher = PasswordHasher(workers=1)
    results = await asyncio.gather(
        *(hasher.hash(PASSWORD) for _ in range(12)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, AuthFailure)]
    assert len(results) - len(refused) == 5  # one running, four waiting
    assert all(r.code is ErrorCode.RATE_LIMITED and r.retry_after == 1 for r in refused)
    # Once the queue drains, hashing works again.
    assert (await hasher.hash(PASSWORD)).startswith("$argon2id$")


class CountingHasher(PasswordHasher):
    calls = 0

    async def hash(self, password: str) -> str:
        self.calls += 1
        return await super().hash(password)

    async def verify(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        self.calls += 1
        return await super().verify(password, stored_hash)

    async def verify_dummy(self, password: str) -> None:
        self.calls += 1
        await super().verify_dummy(password)


@pytest.mark.usefixtures("clean_db")
async def test_nothing_over_the_maximum_is_ever_hashed(database_url: str) -> None:
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        secret_key=TEST_SECRET,
        encryption_keys=TEST_FERNET_KEY,
        require_email_verification=False,
    )
    engine = create_engine(settings)
    statements = Statements(engine)
    hasher = CountingHasher()
    clock = SystemClock()
    auth = make_auth(
        settings,
        statements,
        hasher,
        Outbox(box=SecretBox([TEST_FERNET_KEY]), clock=clock, postgres=True),
        clock,
        RateLimiter.from_settings(settings),
    )
    await statements.start()
    try:
        await auth.signup(email="long@example.com", password=PASSWORD, client=ClientInfo())
        assert hasher.calls == 1
        huge = "x" * 100_000
        with pytest.raises(AuthFailure) as signup_error:
            await auth.signup(email="other@example.com", password=huge, client=ClientInfo())
        assert signup_error.value.code is ErrorCode.WEAK_PASSWORD
        with pytest.raises(AuthFailure) as login_error:
            await auth.login(email="long@example.com", password=huge, client=ClientInfo())
        assert login_error.value.code is ErrorCode.INVALID_CREDENTIALS
        assert hasher.calls == 1
    finally:
        await statements.close()
        await engine.dispose()


async def test_login_answers_rate_limited_when_the_hash_queue_is_full(
    make_settings: Callable[..., Settings], clock: MutableClock
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for, unique_email
    from tests.gql import login, signup

    app = create_app(make_settings(password_hash_workers=1, **SHIPPED_HASHING), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        email = unique_email()
        await signup(http, email, PASSWORD)
        results = await asyncio.gather(*(login(http, email, PASSWORD) for _ in range(40)))
        # A busy hasher is no failed sign-in: however many were turned away, the account
        # is not locked out.
        after = await login(http, email, PASSWORD)
    kinds = [r.get("code") or r["__typename"] for r in results]
    assert "AuthSession" in kinds
    limited = [r for r in results if r.get("code") == "RATE_LIMITED"]
    assert len(limited) >= 5 and all(r["retryAfter"] == 1 for r in limited)
    assert after["__typename"] == "AuthSession", after


@pytest.mark.usefixtures("clean_db")
async def test_signup_answers_rate_limited_when_the_hash_queue_is_full(
    make_settings: Callable[..., Settings], clock: MutableClock, database_url: str
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for, unique_email
    from tests.gql import signup
    from tests.graph.test_signup import count_users

    app = create_app(make_settings(password_hash_workers=1, **SHIPPED_HASHING), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        results = await asyncio.gather(*(signup(http, unique_email(), PASSWORD) for _ in range(16)))
    created = [r for r in results if r["__typename"] == "AuthSession"]
    limited = [r for r in results if r.get("code") == "RATE_LIMITED"]
    assert created and limited and len(created) + len(limited) == 16
    assert all(r["retryAfter"] == 1 for r in limited)
    assert await count_users(database_url) == len(created)  # a refusal creates nothing
