"""Which failures a client sees as SERVICE_UNAVAILABLE (try again) rather than masked."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from db.settings import Settings
from graph.app import create_app
from graph.errors import is_database_unavailable
from tests.conftest import PASSWORD, client_for, unique_email
from tests.gql import SIGNUP, post


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
)
def test_retryable_database_failures(error: BaseException) -> None:
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = error
    assert is_database_unavailable(error)
    assert is_database_unavailable(wrapped)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UndefinedTableError('relation "users" does not exist'),
        asyncpg.exceptions.NotNullViolationError("null value"),
        ValueError("a bug"),
    ],
)
def test_other_failures_are_not_called_unavailable(error: BaseException) -> None:
    assert not is_database_unavailable(error)


@pytest.fixture
async def role_without_connections(pg_admin_url: str) -> AsyncIterator[str]:
    """A role PostgreSQL lets connect to nothing (CONNECTION LIMIT 0): what a server at its
    connection limit answers, without exhausting the shared server."""
    name = f"strawgate_limited_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT 0')
        yield name
    finally:
        await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        await conn.close()


async def test_a_full_database_is_service_unavailable(
    make_settings: Callable[..., Settings], database_url: str, role_without_connections: str
) -> None:
    url = make_url(database_url).set(username=role_without_connections)
    app = create_app(make_settings(database_url=url.render_as_string(hide_password=False)))
    async with app.router.lifespan_context(app), client_for(app) as http:
        response = await post(http, SIGNUP, {"i": {"email": unique_email(), "password": PASSWORD}})
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert error["extensions"]["requestId"] == response.headers["x-request-id"]
        assert (await http.get("/readyz")).status_code == 503
