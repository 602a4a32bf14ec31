"""The claims hook: claims an operator's code adds to every access token, in-process
(CLAIMS_HOOK) or over HTTP (CLAIMS_HOOK_URL, signed per Standard Webhooks). A hook that
fails, times out or answers what cannot be used fails the sign-in or refresh closed
(SERVICE_UNAVAILABLE) and changes nothing; reserved claims keep Strawgate's values."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from jose import jwt as jose_jwt
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.security.claims_hook import ClaimsRequest
from db.settings import ConfigError, Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import REFRESH, SESSIONS, gql, login, refresh, signed_in, signup
from tests.graph.test_stepup import reauthenticate
from tests.identity_provider import _LoopbackServer

HOOK = f"{__name__}:add_claims"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class HookState:
    """What the in-process hook answers next, and what it was asked."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.asked: list[ClaimsRequest] = []
        self.answer: Any = {"tenant": "acme", "plan": "pro"}
        self.mode = "answer"  # or "hang", "raise"


STATE = HookState()


async def add_claims(request: ClaimsRequest) -> Any:
    STATE.asked.append(request)
    if STATE.mode == "hang":
        await asyncio.Event().wait()
    if STATE.mode == "raise":
        raise RuntimeError("the app's database is down")
    return STATE.answer


def not_async(request: ClaimsRequest) -> dict[str, Any]:
    return {}


@pytest.fixture(autouse=True)
def hook_state() -> Iterator[HookState]:
    STATE.reset()
    yield STATE
    STATE.reset()


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(claims_hook=HOOK, claims_hook_timeout=0.2)


def claims_of(session: dict[str, Any]) -> dict[str, Any]:
    assert session["__typename"] == "AuthSession", session
    claims: dict[str, Any] = jose_jwt.get_unverified_claims(session["accessToken"])
    return claims


def unavailable(body: dict[str, Any]) -> None:
    assert body["data"] is None or not any(body["data"].values()), body
    assert body["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE", body
    assert "Traceback" not in str(body)


async def test_claims_reach_every_token_with_what_the_hook_is_told(
    client: httpx.AsyncClient, hook_state: HookState
) -> None:
    email = unique_email()
    first = await signup(client, email, PASSWORD)
    claims = claims_of(first)
    assert (claims["tenant"], claims["plan"]) == ("acme", "pro")
    renewed = await refresh(client, first["refreshToken"])
    assert claims_of(renewed)["tenant"] == "acme"
    stepped = await reauthenticate(client, renewed["accessToken"], password=PASSWORD)
    assert claims_of(stepped)["plan"] == "pro"

    assert [asked.reason for asked in hook_state.asked] == ["sign-in", "refresh", "step-up"]
    told = hook_state.asked[0]
    assert str(told.user_id) == claims["sub"] == first["user"]["id"]
    assert str(told.session_id) == claims["sid"]
    assert told.email == email
    assert told.roles == ()
    assert told.amr == ("pwd",)


async def test_reserved_claims_keep_their_values(
    client: httpx.AsyncClient, hook_state: HookState, caplog: pytest.LogCaptureFixture
) -> None:
    hook_state.answer = {
        "sub": "someone-else",
        "roles": ["admin"],
        "exp": 4102444800,
        "amr": ["hwk"],
        "aud": "another-api",
        "nbf": 4102444800,
        "at_hash": "x",
        "c_hash": "y",
        "tenant": "acme",
    }
    with caplog.at_level(logging.WARNING, logger="strawgate.claims_hook"):
        session = await signup(client, unique_email(), PASSWORD)
    claims = claims_of(session)
    assert claims["sub"] == session["user"]["id"]
    assert claims["roles"] == []
    assert claims["amr"] == ["pwd"]
    assert claims["aud"] == "strawgate"
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert "nbf" not in claims
    assert claims["tenant"] == "acme"
    assert "at_hash" not in claims and "c_hash" not in claims
    assert "reserved claims amr, at_hash, aud, c_hash, exp, nbf, roles, sub" in caplog.text
    # The token works as any other.
    me = await gql(client, "{ me { id } }", token=session["accessToken"])
    assert me["data"]["me"]["id"] == session["user"]["id"]


async def test_a_hook_that_times_out_fails_the_sign_in_closed(
    client: httpx.AsyncClient, hook_state: HookState, caplog: pytest.LogCaptureFixture
) -> None:
    email = unique_email()
    first = await signup(client, email, PASSWORD)
    hook_state.mode = "hang"
    with caplog.at_level(logging.INFO):
        body = await gql(
            client,
            "mutation($i: LoginInput!) { login(input: $i) { __typename } }",
            {"i": {"email": email, "password": PASSWORD}},
        )
    unavailable(body)
    assert "no answer within 0.2 s" in caplog.text
    assert "failed closed" in caplog.text
    # No session was opened by the failed sign-in.
    hook_state.mode = "answer"
    sessions = await gql(client, SESSIONS, token=first["accessToken"])
    assert len(sessions["data"]["sessions"]) == 1


async def test_a_failed_refresh_leaves_the_token_unspent(
    client: httpx.AsyncClient, hook_state: HookState, caplog: pytest.LogCaptureFixture
) -> None:
    first = await signup(client, unique_email(), PASSWORD)
    hook_state.mode = "raise"
    with caplog.at_level(logging.ERROR, logger="strawgate.claims_hook"):
        body = await gql(client, REFRESH, {"i": {"refreshToken": first["refreshToken"]}})
    unavailable(body)
    assert "RuntimeError" in caplog.text
    # The hook is back: the same refresh token still works (nothing was rotated), once.
    hook_state.mode = "answer"
    renewed = await refresh(client, first["refreshToken"])
    assert claims_of(renewed)["tenant"] == "acme"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (["not", "an", "object"], "answered list, not an object"),
        ({"ratio": float("nan")}, "not JSON values"),
        ({"blob": "x" * 5000}, "access token"),
        ({"when": object()}, "not JSON values"),
    ],
)
async def test_unusable_answers_fail_closed(
    client: httpx.AsyncClient,
    hook_state: HookState,
    caplog: pytest.LogCaptureFixture,
    answer: Any,
    why: str,
) -> None:
    hook_state.answer = answer
    with caplog.at_level(logging.ERROR, logger="strawgate.claims_hook"):
        body = await gql(
            client,
            "mutation($i: SignupInput!) { signup(input: $i) { __typename } }",
            {"i": {"email": unique_email(), "password": PASSWORD}},
        )
    unavailable(body)
    assert why in caplog.text


async def test_the_signup_that_failed_closed_left_no_account(
    client: httpx.AsyncClient, hook_state: HookState
) -> None:
    email = unique_email()
    hook_state.mode = "raise"
    unavailable(
        await gql(
            client,
            "mutation($i: SignupInput!) { signup(input: $i) { __typename } }",
            {"i": {"email": email, "password": PASSWORD}},
        )
    )
    hook_state.mode = "answer"
    # The address is free: the signup rolled back with the hook.
    assert claims_of(await signup(client, email, PASSWORD))["tenant"] == "acme"


async def test_roles_reach_the_hook_and_the_token_after_refresh(
    client: httpx.AsyncClient, app: Starlette, hook_state: HookState
) -> None:
    from db.services.operator import Operator

    email = unique_email()
    first = await signup(client, email, PASSWORD)
    services = app.state.services
    operator = Operator(
        statements=services.auth.statements, clock=services.auth.clock, events=services.events
    )
    await operator.change_role(email, "billing", grant=True)
    assert claims_of(first)["roles"] == []
    renewed = await refresh(client, first["refreshToken"])
    assert claims_of(renewed)["roles"] == ["billing"]
    assert hook_state.asked[-1].roles == ("billing",)


# -- bad configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", ["nope", "whsec_not*base64", "whsec_c2hvcnQ=", SECRET.replace("whsec_", "")]
)
def test_a_claims_hook_secret_must_be_a_standard_one(
    make_settings: Callable[..., Settings], secret: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(claims_hook_url="https://hooks.example.com/c", claims_hook_secret=secret)
    assert "webhook secret" in str(refused.value)
    assert secret not in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"claims_hook": "no_colon_here"}, "module:function"),
        ({"claims_hook": "tests.no_such_module:f"}, "cannot be imported"),
        ({"claims_hook": f"{__name__}:missing"}, "has no"),
        ({"claims_hook": f"{__name__}:not_async"}, "must be an async function"),
        ({"claims_hook_url": "https://hooks.example.com/claims"}, "CLAIMS_HOOK_SECRET"),
        (
            {"claims_hook_url": "http://127.0.0.1:9/claims", "claims_hook_secret": SECRET},
            "must use https",
        ),
        (
            {"claims_hook_url": "https://10.0.0.7/claims", "claims_hook_secret": SECRET},
            "private, loopback or link-local address",
        ),
    ],
)
def test_a_bad_hook_setting_stops_the_start(
    make_settings: Callable[..., Settings], clock: MutableClock, overrides: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app(make_settings(**overrides), clock=clock)


# -- over HTTP ---------------------------------------------------------------------------------


class ClaimsEndpoint(_LoopbackServer):
    """An app's claims endpoint: checks every request's signature with the Standard
    Webhooks library and answers what the test sets."""

    NAME = "claims-endpoint"

    def reset(self) -> None:
        super().reset()
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.answer: Any = {"claims": {"tenant": "acme"}}
        self.verified = 0

    def routes(self) -> list[Route]:
        return [Route("/claims", self._claims, methods=["POST"])]

    async def _claims(self, request: Request) -> Response:
        body = await request.body()
        Webhook(SECRET).verify(body, dict(request.headers))  # raises: a 500
        self.verified += 1
        self.bodies.append(orjson.loads(body))
        if self.status != 200:
            return Response("no", status_code=self.status)
        return JSONResponse(self.answer)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ClaimsEndpoint]:
    with ClaimsEndpoint() as server:
        yield server


@pytest.fixture
async def http_hooked(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    endpoint: ClaimsEndpoint,
) -> AsyncIterator[httpx.AsyncClient]:
    endpoint.reset()
    settings = make_settings(
        claims_hook_url=f"{endpoint.base_url}/claims",
        claims_hook_secret=SECRET,
        webhook_allow_private=True,
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as c:
        yield c


async def test_an_http_hook_is_asked_signed_and_its_claims_kept(
    http_hooked: httpx.AsyncClient, endpoint: ClaimsEndpoint
) -> None:
    email = unique_email()
    session = await signup(http_hooked, email, PASSWORD)
    assert claims_of(session)["tenant"] == "acme"
    assert endpoint.verified == 1
    (told,) = endpoint.bodies
    assert told == {
        "user_id": session["user"]["id"],
        "email": email,
        "roles": [],
        "amr": ["pwd"],
        "session_id": claims_of(session)["sid"],
        "reason": "sign-in",
    }


@pytest.mark.parametrize(
    ("status", "answer"),
    [(500, None), (200, {"no": "claims key"}), (200, {"claims": ["a", "list"]})],
)
async def test_an_http_hook_that_fails_fails_the_sign_in(
    http_hooked: httpx.AsyncClient, endpoint: ClaimsEndpoint, status: int, answer: Any
) -> None:
    email = unique_email()
    await signup(http_hooked, email, PASSWORD)
    endpoint.status = status
    endpoint.answer = answer
    unavailable(
        await gql(
            http_hooked,
            "mutation($i: LoginInput!) { login(input: $i) { __typename } }",
            {"i": {"email": email, "password": PASSWORD}},
        )
    )
    endpoint.reset()
    assert claims_of(await signed_in(http_hooked, email))["tenant"] == "acme"


async def test_an_unreachable_http_hook_fails_closed(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    from tests.pg import free_port

    settings = make_settings(
        claims_hook_url=f"http://127.0.0.1:{free_port()}/claims",
        claims_hook_secret=SECRET,
        webhook_allow_private=True,
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as c:
        answer = await login(c, unique_email(), PASSWORD)  # no such account: no token asked
        assert answer["__typename"] == "AuthError"
        unavailable(
            await gql(
                c,
                "mutation($i: SignupInput!) { signup(input: $i) { __typename } }",
                {"i": {"email": unique_email(), "password": PASSWORD}},
            )
        )


async def test_host_names_of_private_addresses_need_webhook_allow_private(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host name passes the URL check at start, and is refused where the connection is
    made, by what it resolves to (the same check as the webhooks')."""
    settings = make_settings(
        claims_hook_url="https://localhost:9/claims", claims_hook_secret=SECRET
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as c:
        with caplog.at_level(logging.ERROR, logger="strawgate.claims_hook"):
            unavailable(
                await gql(
                    c,
                    "mutation($i: SignupInput!) { signup(input: $i) { __typename } }",
                    {"i": {"email": unique_email(), "password": PASSWORD}},
                )
            )
    assert "private, loopback or link-local" in caplog.text
    assert "WEBHOOK_ALLOW_PRIVATE" in caplog.text


async def test_right_codes_during_a_hook_outage_are_not_counted_as_wrong(
    client: httpx.AsyncClient, hook_state: HookState, clock: MutableClock
) -> None:
    """A TOTP sign-in whose right code met a failing hook: the code is not spent and its
    check is given back, so the owner is not locked out by retrying during the outage."""
    from db.services.lockout import ACCOUNT_CODE_FAILURES
    from tests.graph.test_mfa import challenge, code_at, enrolled, verify

    email, _, secret, _ = await enrolled(client, clock)
    hook_state.mode = "raise"
    for _ in range(ACCOUNT_CODE_FAILURES + 2):
        token = await challenge(client, email)  # the user signs in again, and again
        unavailable(
            await gql(
                client,
                "mutation($i: VerifyOtpInput!) { verifyOtp(input: $i) {"
                " __typename ... on AuthError { code message } } }",
                {"i": {"challengeToken": token, "code": code_at(secret, clock)}},
            )
        )
    hook_state.mode = "answer"
    session = await verify(client, await challenge(client, email), code_at(secret, clock))
    assert claims_of(session)["amr"] == ["pwd", "otp", "mfa"]


async def test_a_slow_hook_cannot_take_every_database_connection(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    hook_state: HookState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At most DB_POOL_SIZE / 2 calls wait for the hook at once (each holds a connection);
    more fail at once, and the server keeps answering what needs no hook."""
    settings = make_settings(claims_hook=HOOK, claims_hook_timeout=0.5, db_pool_size=4)
    application = create_app(settings, clock=clock)
    hook_state.mode = "hang"
    signup_document = "mutation($i: SignupInput!) { signup(input: $i) { __typename } }"
    async with application.router.lifespan_context(application), client_for(application) as c:
        with caplog.at_level(logging.ERROR, logger="strawgate.claims_hook"):
            answers = await asyncio.gather(
                *(
                    gql(c, signup_document, {"i": {"email": unique_email(), "password": PASSWORD}})
                    for _ in range(6)
                ),
                gql(c, "{ __typename }"),
            )
    for answer in answers[:-1]:
        unavailable(answer)
    assert answers[-1]["data"] == {"__typename": "Query"}
    assert caplog.text.count("no answer within 0.5 s") == 2
    assert caplog.text.count("calls are already waiting for it (at most 2 at once") == 4
