"""Production hardening of the HTTP edge, in development and production settings alike:
document limits that refuse before any resolver runs, batching only when configured,
CORS for listed origins only, security headers on every answer, no operation over GET,
and no field suggestions in production."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from db.settings import ConfigError, Settings
from graph.app import create_app
from tests.conftest import PASSWORD, PRODUCTION_MAIL, MutableClock, client_for, unique_email
from tests.gql import ME, gql

Serve = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]

# Depth 1 under the depth limit of 1 used below; every refusal below is this mutation
# made to break one limit, so a created account would mean a resolver ran.
SIGNUP = (
    "mutation($i: SignupInput!) { signup(input: $i) "
    "{ __typename ... on AuthSession { accessToken } ... on AuthError { code } } }"
)
LIMITS: dict[str, Any] = {
    "max_query_depth": 1,
    "max_aliases": 2,
    "max_query_tokens": 100,
    "max_query_bytes": 1024,
    "max_body_bytes": 4096,
}
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'"


@pytest.fixture(params=["development", "production"])
def environment(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], environment: str
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        required = PRODUCTION_MAIL if environment == "production" else {}
        return make_settings(environment=environment, **required, **overrides)

    return make


@pytest.fixture
def serve(settings_for: Callable[..., Settings], clock: MutableClock, clean_db: None) -> Serve:
    @contextlib.asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings_for(**overrides), clock=clock)
        async with app.router.lifespan_context(app), client_for(app) as http:
            yield http

    return run


def signup_body(email: str, query: str = SIGNUP, **extra: Any) -> dict[str, Any]:
    return {"query": query, "variables": {"i": {"email": email, "password": PASSWORD}}, **extra}


async def assert_no_account(http: httpx.AsyncClient, email: str) -> None:
    """The refused signups created nothing: the address is still free."""
    body = await gql(http, SIGNUP, signup_body(email)["variables"])
    assert body["data"]["signup"]["__typename"] == "AuthSession", body


def assert_refused(response: httpx.Response, *, needle: str) -> None:
    assert response.status_code != 500
    assert 200 <= response.status_code < 500, response.text
    assert needle.lower() in response.text.lower(), response.text
    if response.status_code == 200:
        body = response.json()
        assert body["data"] is None and body["errors"], body


# --- Document limits ------------------------------------------------------------------


async def test_every_document_limit_refuses_before_any_resolver_runs(serve: Serve) -> None:
    email = unique_email()
    tokens = " ".join(["1"] * 120)  # 120 tokens in 240 bytes: under the size limit
    too_deep = SIGNUP.replace("{ accessToken }", "{ user { id } }")
    too_many_aliases = (
        "mutation($i: SignupInput!) { "
        + " ".join(f"a{n}: signup(input: $i) {{ __typename }}" for n in range(3))
        + " }"
    )
    too_many_tokens = SIGNUP.replace("!)", f"!, $x: [Int] = [{tokens}])", 1)
    too_large = SIGNUP + " # " + "x" * 1100
    # 600 characters, 1200 bytes: the size is counted in UTF-8, not in characters.
    too_large_in_utf8 = SIGNUP + " # " + "é" * 600
    async with serve(**LIMITS) as http:
        for query, needle in [
            (too_deep, "depth"),
            (too_many_aliases, "aliases"),
            (too_many_tokens, "token"),
            (too_large, "larger than 1024 bytes"),
            (too_large_in_utf8, "larger than 1024 bytes"),
        ]:
            assert len(query.encode()) < LIMITS["max_body_bytes"] - 200
            for _ in range(2):  # the second time from the caches
                response = await http.post("/graphql", json=signup_body(email, query))
                assert_refused(response, needle=needle)
        padded = await http.post("/graphql", json=signup_body(email, pad="x" * 5000))
        assert padded.status_code == 413

        async def stream() -> AsyncIterator[bytes]:
            yield b'{"query": "' + SIGNUP.encode() + b'", "variables": {"i": '
            yield b'{"email": "' + email.encode() + b'", "password": "' + PASSWORD.encode()
            yield b'"}}, "pad": "' + b"x" * 5000 + b'"}'

        # No Content-Length: the limit holds over the streamed body.
        streamed = await http.post(
            "/graphql", content=stream(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert "content-length" not in streamed.request.headers
        await assert_no_account(http, email)


async def test_the_document_size_limit_by_default_and_at_its_edge(serve: Serve) -> None:
    async with serve() as http:  # MAX_QUERY_BYTES defaults to 16 KiB
        prefix = ME + " #"
        at_limit = prefix + "x" * (16 * 1024 - len(prefix))
        assert (await gql(http, at_limit)) == {"data": {"me": None}}
        over = await http.post("/graphql", json={"query": at_limit + "x"})
        assert_refused(over, needle="larger than 16384 bytes")
        assert over.json()["errors"][0]["extensions"] == {"code": "QUERY_TOO_LARGE"}
    async with serve(max_query_bytes=512) as http:
        refused = await http.post("/graphql", json={"query": ME + " #" + "x" * 512})
        assert_refused(refused, needle="larger than 512 bytes")


# --- Batching -------------------------------------------------------------------------


async def test_batches_are_refused_unless_configured(serve: Serve) -> None:
    email = unique_email()
    async with serve() as http:
        response = await http.post("/graphql", json=[signup_body(email)])
        assert response.status_code == 400
        assert "Batching is not enabled" in response.text
        await assert_no_account(http, email)


async def test_a_batch_runs_its_operations_in_order(serve: Serve) -> None:
    email = unique_email()
    login = (
        "mutation($i: LoginInput!) { login(input: $i) { __typename ... on AuthError { code } } }"
    )
    batch = [
        signup_body(email),
        signup_body(email),
        signup_body(email, login),
        {"query": ME},
    ]
    async with serve(batching=True) as http:
        response = await http.post("/graphql", json=batch)
        assert response.status_code == 200, response.text
        results = response.json()
    # Run concurrently, the second signup and the login would race the first signup.
    signed_up, taken, logged_in, me = (r["data"] for r in results)
    assert signed_up["signup"]["__typename"] == "AuthSession"
    assert taken == {"signup": {"__typename": "AuthError", "code": "EMAIL_TAKEN"}}
    assert logged_in == {"login": {"__typename": "AuthSession"}}
    assert me == {"me": None}


async def test_a_batch_over_the_limit_is_refused_whole(serve: Serve) -> None:
    emails = [unique_email() for _ in range(3)]
    async with serve(batching=True, max_batch_size=2) as http:
        response = await http.post("/graphql", json=[signup_body(e) for e in emails])
        assert response.status_code == 400
        assert "at most 2 operations" in response.text
        for email in emails:
            await assert_no_account(http, email)
        two = await http.post("/graphql", json=[{"query": ME}, {"query": ME}])
        assert two.json() == [{"data": {"me": None}}, {"data": {"me": None}}]


@pytest.mark.parametrize(
    "bad",
    [
        5,
        None,
        "{ me { id } }",
        {},
        {"query": ""},
        {"query": 5},
        {"query": ME, "variables": "x"},
        {"query": ME, "extensions": []},
        {"query": ME, "operationName": 5},
    ],
)
async def test_a_malformed_batch_is_a_400_before_anything_runs(serve: Serve, bad: Any) -> None:
    email = unique_email()
    async with serve(batching=True) as http:
        response = await http.post("/graphql", json=[signup_body(email), bad])
        assert response.status_code == 400, response.text
        assert "Traceback" not in response.text
        assert (await http.post("/graphql", json=[])).status_code == 400
        await assert_no_account(http, email)


async def test_an_operation_refused_on_its_own_answers_in_its_place(serve: Serve) -> None:
    email = unique_email()
    async with serve(batching=True) as http:
        response = await http.post(
            "/graphql",
            json=[
                signup_body(email),
                {"query": ME, "operationName": "Nope"},  # alone, a 400
                {"query": "{ me { id } }", "extensions": {}},
            ],
        )
    assert response.status_code == 200, response.text
    first, refused, last = response.json()
    assert first["data"]["signup"]["__typename"] == "AuthSession"
    assert refused["data"] is None and "Nope" in refused["errors"][0]["message"]
    assert last == {"data": {"me": None}}


async def test_document_limits_hold_for_each_operation_of_a_batch(serve: Serve) -> None:
    email = unique_email()
    async with serve(batching=True, **LIMITS) as http:
        response = await http.post(
            "/graphql",
            json=[signup_body(email, SIGNUP + " #" + "x" * 1100), {"query": ME}],
        )
        assert response.status_code == 200
        refused, answered = response.json()
        assert "larger than 1024 bytes" in refused["errors"][0]["message"]
        assert answered == {"data": {"me": None}}
        await assert_no_account(http, email)


# --- CORS -----------------------------------------------------------------------------


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": "content-type, authorization",
    }


async def test_no_cross_origin_access_by_default(serve: Serve) -> None:
    async with serve() as http:
        options = await http.options("/graphql", headers=preflight("https://app.example.com"))
        assert options.status_code >= 400
        assert cors_headers(options) == {}
        post = await http.post(
            "/graphql", json={"query": ME}, headers={"origin": "https://app.example.com"}
        )
        assert post.status_code == 200
        assert cors_headers(post) == {}


async def test_cross_origin_access_for_listed_origins_only(serve: Serve) -> None:
    allowed = "https://app.example.com"
    async with serve(cors_allow_origins=f" {allowed} , https://admin.example.com:8443") as http:
        options = await http.options("/graphql", headers=preflight(allowed))
        assert options.status_code == 200
        headers = cors_headers(options)
        assert headers["access-control-allow-origin"] == allowed
        assert headers["access-control-allow-credentials"] == "true"
        assert "POST" in headers["access-control-allow-methods"]
        allowed_headers = headers["access-control-allow-headers"].lower()
        for name in ("content-type", "authorization", "x-request-id"):
            assert name in allowed_headers
        assert options.headers["x-content-type-options"] == "nosniff"
        # Operations go by POST only.
        refused_method = await http.options("/graphql", headers=preflight(allowed, "DELETE"))
        assert refused_method.status_code == 400

        post = await http.post("/graphql", json={"query": ME}, headers={"origin": allowed})
        assert post.headers["access-control-allow-origin"] == allowed
        assert "x-request-id" in post.headers["access-control-expose-headers"].lower()
        assert "origin" in post.headers["vary"].lower()
        other_port = await http.options(
            "/graphql", headers=preflight("https://admin.example.com:8443")
        )
        assert other_port.headers["access-control-allow-origin"] == (
            "https://admin.example.com:8443"
        )

        for foreign in ("https://evil.example.com", "http://app.example.com", "null"):
            options = await http.options("/graphql", headers=preflight(foreign))
            assert options.status_code == 400
            assert cors_headers(options) == {}
            post = await http.post("/graphql", json={"query": ME}, headers={"origin": foreign})
            assert post.status_code == 200
            assert cors_headers(post) == {}


@pytest.mark.parametrize(
    "origins",
    [
        "*",
        "https://app.example.com/",
        "https://*.example.com",
        "app.example.com",
        "https://a.example.com/x",
    ],
)
def test_cors_origins_must_be_exact(make_settings: Callable[..., Settings], origins: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOW_ORIGINS"):
        create_app(make_settings(cors_allow_origins=origins))


# --- Security headers -----------------------------------------------------------------


async def test_security_headers_on_every_answer(serve: Serve, environment: str) -> None:
    async with serve(max_body_bytes=2048) as http:
        answers = {
            "graphql": await http.post("/graphql", json={"query": ME}),
            "graphql error": await http.post("/graphql", json={"query": "{ nope }"}),
            "view refusal": await http.post(
                "/graphql", content=b"{", headers={"content-type": "application/json"}
            ),
            "guard refusal": await http.post("/graphql", json={"query": ME, "p": "x" * 4096}),
            "method": await http.put("/graphql", json={"query": ME}),
            "get": await http.get("/graphql", params={"query": ME}),
            "healthz": await http.get("/healthz"),
            "readyz": await http.get("/readyz"),
            "not found": await http.get("/nope"),
        }
    assert answers["guard refusal"].status_code == 413
    assert answers["not found"].status_code == 404
    for name, response in answers.items():
        assert response.status_code != 500, name
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        assert response.headers["content-security-policy"] == STRICT_CSP, name
        assert len(response.headers.get_list("cache-control")) == 1, name
        hsts = response.headers.get("strict-transport-security")
        if environment == "production":
            assert hsts == "max-age=63072000; includeSubDomains", name
        else:
            assert hsts is None, name


async def test_the_graphiql_page_has_a_policy_it_can_work_under(
    make_settings: Callable[..., Settings], clock: MutableClock
) -> None:
    app = create_app(make_settings(), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        page = await http.get("/graphql", headers={"accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()
    for header, value in SECURITY_HEADERS.items():
        assert page.headers[header] == value
    policy = {
        name: values
        for name, *values in (
            part.split() for part in page.headers["content-security-policy"].split(";")
        )
    }
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]  # its queries go to this server only
    assert "data:" in policy["img-src"]
    # Scripts: the CDN's, and the inline ones by hash; never any inline script.
    assert "'unsafe-inline'" not in policy["script-src"]
    assert "'unsafe-eval'" not in policy["script-src"]
    inline = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    assert inline
    for body in inline:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy["script-src"]
    for tag, url in re.findall(r'<(script|link)\b[^>]*?(?:src|href)="(https://[^"]+)"', page.text):
        origin = "/".join(url.split("/")[:3])
        assert origin in policy["script-src" if tag == "script" else "style-src"], url


# --- No operation over GET ------------------------------------------------------------


async def test_get_never_runs_a_mutation(serve: Serve) -> None:
    email = unique_email()
    async with serve(graphiql=True) as http:
        for accept in ("application/json", "text/html"):
            response = await http.get(
                "/graphql",
                params={
                    "query": SIGNUP,
                    "variables": f'{{"i": {{"email": "{email}", "password": "{PASSWORD}"}}}}',
                },
                headers={"accept": accept},
            )
            assert 400 <= response.status_code < 500, response.text
            assert "AuthSession" not in response.text
            query = await http.get("/graphql", params={"query": ME}, headers={"accept": accept})
            assert 400 <= query.status_code < 500
            assert '"data"' not in query.text
        await assert_no_account(http, email)


# --- Field suggestions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "variables", "kept"),
    [
        ("{ mee { id } }", None, "Cannot query field 'mee'"),
        ("mutation($i: SignupInptu!) { signup(input: $i) { __typename } }", None, "Unknown type"),
        ('mutation { logout(inptu: {refreshToken: "x"}) { revoked } }', None, "Unknown argument"),
        (SIGNUP, {"i": {"emial": "a@example.com", "password": "x"}}, "unknown field 'emial'"),
    ],
)
async def test_field_suggestions_only_in_development(
    serve: Serve,
    environment: str,
    query: str,
    variables: dict[str, Any] | None,
    kept: str,
) -> None:
    async with serve() as http:
        response = await http.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200
    messages = " ".join(error["message"] for error in response.json()["errors"])
    assert kept in messages
    if environment == "production":
        assert "did you mean" not in messages.lower()
    else:
        assert "Did you mean" in messages
