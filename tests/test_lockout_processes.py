"""The lockout across two server processes sharing PostgreSQL (and Redis for the rate
limits): password checks sent at once to both stay under the threshold together, and the
owner's own sign-ins sent at once never lock the address."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PASSWORD, unique_email
from tests.gql import LOGIN
from tests.servers import redis_reachable, running_many
from tests.test_servers import ok, production_env, signed_up

pytestmark = pytest.mark.slow

THRESHOLD = 5  # LOCKOUT_THRESHOLD's default

_FAILURES = text(
    "SELECT kind, ip FROM security_events"
    " WHERE email = :email AND kind IN ('LOGIN_FAILED', 'LOCKED_OUT')"
)


async def signed_in_at(http: httpx.AsyncClient, email: str, password: str, ip: str) -> Any:
    """A login from `ip`: the servers (uvicorn) trust X-Forwarded-For from 127.0.0.1."""
    data = await ok(
        http,
        LOGIN,
        {"i": {"email": email, "password": password}},
        headers={"x-forwarded-for": ip},
    )
    return data["login"]


async def failures_recorded(database_url: str, email: str) -> list[tuple[str, str]]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(_FAILURES, {"email": email})).all()
    finally:
        await engine.dispose()
    return [(str(row.kind), str(row.ip)) for row in rows]


async def test_guesses_at_two_processes_get_at_most_the_threshold_of_checks(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    """Twenty wrong passwords at once from twenty addresses, split over two processes: at
    most five are checked (LOGIN_FAILED), the rest answer RATE_LIMITED. And forty right
    passwords of another owner at once: each signs in or is asked to retry in a second,
    the address is never locked, and the next sign-in goes through."""
    if not redis_reachable():
        pytest.skip("no Redis at 127.0.0.1:6379 for the processes to share their limits")
    env = production_env(
        database_url,
        REDIS_URL="redis://127.0.0.1:6379/0",
        REDIS_KEY_PREFIX=f"strawgate-test-{uuid.uuid4().hex[:8]}",
        RATE_LIMITS__LOGIN_IP="1000/minute",
        RATE_LIMITS__LOGIN_ACCOUNT="1000/minute",
    )
    async with running_many(2, env=env, cwd=tmp_path, logs=tmp_path / "logs") as servers:
        async with servers[0].client() as one, servers[1].client() as two:
            guessed, owner = unique_email(), unique_email()
            await signed_up(one, guessed)
            await signed_up(two, owner)

            addresses = [f"198.51.{n}.9" for n in range(20)]
            answers = await asyncio.gather(
                *(
                    signed_in_at(http, guessed, f"guess {n}", ip)
                    for n, (http, ip) in enumerate(zip([one, two] * 10, addresses, strict=True))
                )
            )
            codes = [a["code"] for a in answers]
            assert set(codes) <= {"INVALID_CREDENTIALS", "RATE_LIMITED"}, answers
            # At once: a second. Locked: the lock's 30 s, from a clock read before the
            # request waited its turn for the address's row (so up to 31, rounded up).
            waits = {a["retryAfter"] for a in answers if a["code"] == "RATE_LIMITED"}
            assert waits <= {1, 30, 31}, answers

            answers = await asyncio.gather(
                *(
                    signed_in_at(http, owner, PASSWORD, f"203.0.113.{n}")
                    for n, http in enumerate([one, two] * 20)
                )
            )
            outcomes = {(a["__typename"], a.get("code"), a.get("retryAfter")) for a in answers}
            assert outcomes <= {("AuthSession", None, None), ("AuthError", "RATE_LIMITED", 1)}, (
                answers
            )
            assert any(a["__typename"] == "AuthSession" for a in answers)
            after = await signed_in_at(two, owner, PASSWORD, "203.0.113.250")
            assert after["__typename"] == "AuthSession", after

    failed = await failures_recorded(database_url, guessed)
    checked = [ip for kind, ip in failed if kind == "LOGIN_FAILED"]
    assert 1 <= len(checked) <= THRESHOLD, failed
    assert len(checked) == codes.count("INVALID_CREDENTIALS")
    assert set(checked) <= set(addresses)  # the addresses were the clients' own
    assert await failures_recorded(database_url, owner) == []
