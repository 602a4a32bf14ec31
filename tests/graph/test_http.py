"""The HTTP edge: malformed requests get a 4xx, limits hold, errors are masked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, PRODUCTION_MAIL, MutableClock, client_for, unique_email
from tests.gql import ME, SIGNUP, gql, signup


@pytest.mark.parametrize(
    "body", [b'"x"', b"5", b"null", b"true", b"[]", b'[{"query": "{ me { id } }"}]']
)
async def test_json_that_is_not_an_object_is_a_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"query=me", "application/x-www-form-urlencoded"),
        (b'{"query": "{ me { id } }"}', "text/plain"),
        (b'{"query": 5}', "application/json"),
        (b'{"query": "{ me { id } }", "variables": "x"}', "application/json"),
        (b"{}", "application/json"),
    ],
)
async def test_malformed_requests_are_a_4xx(
    client: httpx.AsyncClient, body: bytes, content_type: str
) -> None:
    response = await client.post("/graphql", content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert "Traceback" not in response.text


async def test_invalid_graphql_is_a_clean_error(client: httpx.AsyncClient) -> None:
    for query in ("{ me { id ", "{ nope }", "mutation { signup(input: {}) { __typename } }"):
        response = await client.post("/graphql", json={"query": query})
        assert response.status_code in (200, 400)
        assert response.json()["errors"]


async def test_a_body_over_the_limit_is_refused(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(max_body_bytes=2048))
    async with app.router.lifespan_context(app), client_for(app) as http:
        padding = "x" * 4096
        query = f"{{ me {{ id }} }} # {padding}"
        declared = await http.post("/graphql", json={"query": query})
        assert declared.status_code == 413

        async def stream() -> Any:
            for _ in range(8):
                yield b" " * 1024

        streamed = await http.post(
            "/graphql", content=stream(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        small = await http.post("/graphql", json={"query": "{ me { id } }"})
        assert small.status_code == 200


async def test_depth_alias_and_token_limits(client: httpx.AsyncClient) -> None:
    aliases = " ".join(f"a{i}: me {{ id }}" for i in range(16))
    body = await gql(client, f"{{ {aliases} }}")
    assert "aliases" in body["errors"][0]["message"]
    long_query = "{ me { " + "id " * 2100 + "} }"
    body = await gql(client, long_query)
    assert "token" in body["errors"][0]["message"].lower()


async def test_depth_limit_is_configurable(make_settings: Callable[..., Settings]) -> None:
    # The contract's own types nest only three deep; the limit is shown with a lower setting.
    app = create_app(make_settings(max_query_depth=1))
    query = (
        'mutation { login(input: {email: "a@example.com", password: "x"}) '
        "{ ... on AuthSession { user { id } } } }"
    )
    async with app.router.lifespan_context(app), client_for(app) as http:
        body = await gql(http, query)
        assert "exceeds maximum operation depth" in body["errors"][0]["message"]
        assert "errors" not in await gql(http, ME)


async def test_every_answer_carries_a_request_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/graphql", json={"query": ME})
    assert len(response.headers["x-request-id"]) == 32
    echoed = await client.get("/healthz", headers={"x-request-id": "lb-1234.abc"})
    assert echoed.headers["x-request-id"] == "lb-1234.abc"
    refused = await client.get("/healthz", headers={"x-request-id": "bad id\twith junk"})
    assert refused.headers["x-request-id"] != "bad id\twith junk"


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "rate_limits": "memory", "mail": "ok"}


class BrokenClock:
    def now(self) -> datetime:
        raise RuntimeError("clock exploded near secret 5up3r")


async def test_unexpected_errors_are_masked_and_logged_with_the_request_id(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    clean_db: None,
) -> None:
    app = create_app(make_settings(), clock=BrokenClock())
    async with app.router.lifespan_context(app), client_for(app) as http:
        with caplog.at_level(logging.ERROR, logger="strawgate.errors"):
            response = await http.post(
                "/graphql",
                json={
                    "query": SIGNUP,
                    "variables": {"i": {"email": unique_email(), "password": PASSWORD}},
                },
            )
    assert response.status_code == 200
    error = response.json()["errors"][0]
    assert error["message"] == "Internal server error."
    assert error["extensions"] == {
        "code": "INTERNAL_SERVER_ERROR",
        "requestId": response.headers["x-request-id"],
    }
    assert "5up3r" not in response.text and "Traceback" not in response.text
    record = next(r for r in caplog.records if r.name == "strawgate.errors")
    assert response.headers["x-request-id"] in record.getMessage()
    assert record.exc_info is not None  # the traceback goes to the log


async def test_no_websocket_route(app: Starlette) -> None:
    sent: list[MutableMapping[str, Any]] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [(b"sec-websocket-protocol", b"graphql-transport-ws")],
        "subprotocols": ["graphql-transport-ws"],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.close"]


async def test_graphiql_and_introspection_in_development(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers={"accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()
    body = await gql(client, "{ __schema { queryType { name } } }")
    assert body["data"]["__schema"]["queryType"]["name"] == "Query"


async def test_production_turns_off_graphiql_and_introspection(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(environment="production", **PRODUCTION_MAIL))
    async with app.router.lifespan_context(app), client_for(app) as http:
        page = await http.get("/graphql", headers={"accept": "text/html"})
        assert page.status_code >= 400
        body = await gql(http, "{ __schema { queryType { name } } }")
        assert "introspection" in body["errors"][0]["message"].lower()
        # ...and both can be turned back on.
    app = create_app(
        make_settings(
            environment="production", graphiql=True, introspection=True, **PRODUCTION_MAIL
        )
    )
    async with app.router.lifespan_context(app), client_for(app) as http:
        assert (await http.get("/graphql", headers={"accept": "text/html"})).status_code == 200
        body = await gql(http, "{ __schema { queryType { name } } }")
        assert "errors" not in body


async def test_queries_are_not_run_over_get(client: httpx.AsyncClient) -> None:
    # A mutation over GET would be a CSRF hole; no operation runs over GET at all.
    query = 'mutation { logout(input: {refreshToken: "x"}) { revoked } }'
    for params in ({"query": "{ me { id } }"}, {"query": query}):
        response = await client.get("/graphql", params=params)
        assert 400 <= response.status_code < 500
        assert "data" not in response.text


async def test_stored_user_agent_is_capped(
    app: Starlette, database_url: str, clock: MutableClock
) -> None:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    from db.models import UserSession

    async with client_for(app) as http:
        http.headers["user-agent"] = "A" * 2000
        await signup(http, unique_email(), PASSWORD)
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        agent = (await conn.execute(select(UserSession.user_agent))).scalar_one()
    await engine.dispose()
    assert agent == "A" * 512


async def test_document_limits_apply_in_production(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(environment="production", **PRODUCTION_MAIL))
    aliases = " ".join(f"a{i}: me {{ id }}" for i in range(16))
    async with app.router.lifespan_context(app), client_for(app) as http:
        assert "aliases" in (await gql(http, f"{{ {aliases} }}"))["errors"][0]["message"]
        too_long = "{ me { " + "id " * 2100 + "} }"
        assert "token" in (await gql(http, too_long))["errors"][0]["message"].lower()
        # The same documents are refused again from the caches, not let through.
        assert "aliases" in (await gql(http, f"{{ {aliases} }}"))["errors"][0]["message"]
        assert "token" in (await gql(http, too_long))["errors"][0]["message"].lower()
        assert (await gql(http, ME)) == {"data": {"me": None}}


@pytest.fixture
def unmigrated_url(pg_admin_url: str) -> Iterator[str]:
    from tests.pg import scratch_database

    with scratch_database(pg_admin_url, "strawgate_unmigrated") as url:
        yield url


async def test_not_ready_until_migrated(
    make_settings: Callable[..., Settings], unmigrated_url: str
) -> None:
    from db.migrate import upgrade_head

    app = create_app(make_settings(database_url=unmigrated_url))
    async with app.router.lifespan_context(app), client_for(app) as http:
        pending = await http.get("/readyz")
        assert pending.status_code == 503
        assert pending.json() == {"status": "migrations pending"}
        await asyncio.to_thread(upgrade_head, unmigrated_url)
        assert (await http.get("/readyz")).json()["status"] == "ready"


async def _set_revision(url: str, revision: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    await engine.dispose()


async def test_ready_on_a_database_a_newer_release_migrated(
    make_settings: Callable[..., Settings], unmigrated_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The rolling deploy: the new release migrates, and the old release's processes keep
    serving until they are replaced (they were ready; a revision they do not know is a newer
    one, not a pending one). A revision this code knows but is not at is still pending."""
    from db.migrate import head_revision, known_revisions, upgrade_head

    await asyncio.to_thread(upgrade_head, unmigrated_url)
    app = create_app(make_settings(database_url=unmigrated_url))
    async with app.router.lifespan_context(app), client_for(app) as http:
        assert "schema" not in (await http.get("/readyz")).json()
        await _set_revision(unmigrated_url, "f00dfeedbeef")
        with caplog.at_level(logging.WARNING, logger="strawgate"):
            newer = await http.get("/readyz")
        assert newer.status_code == 200
        assert newer.json()["status"] == "ready"
        assert newer.json()["schema"] == "newer than this build (f00dfeedbeef)"
        assert "newer than this build's" in caplog.text
        older = next(iter(known_revisions() - {head_revision()}))
        await _set_revision(unmigrated_url, older)
        pending = await http.get("/readyz")
        assert pending.status_code == 503
        assert pending.json() == {"status": "migrations pending"}
        await _set_revision(unmigrated_url, head_revision())
        ready = (await http.get("/readyz")).json()
        assert ready["status"] == "ready" and "schema" not in ready


@pytest.mark.parametrize(("length", "status"), [("²", 400), ("12abc", 400), ("99999999", 413)])
async def test_bad_content_lengths_are_refused(app: Starlette, length: str, status: int) -> None:
    """Behind a proxy that passes the header on unchecked (uvicorn's parser refuses these
    itself), the app still answers a 4xx."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", length.encode("utf-8")),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == status
