"""Cookie transport for browsers (REFRESH_TOKEN_TRANSPORT=cookie): the refresh token lives
in an HttpOnly cookie JavaScript never sees, and every POST needs the CSRF defence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import LOGIN, LOGOUT, ME, REFRESH, REVOKE_SESSION, SESSIONS, SIGNUP, VERIFY_OTP
from tests.smtp import SmtpSink

BROWSER = {"x-requested-with": "XMLHttpRequest", "origin": "https://testserver"}


@asynccontextmanager
async def browser(
    settings: Settings, clock: MutableClock, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app: Starlette = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        # https: the cookie is Secure, and a browser sends it only over https.
        async with httpx.AsyncClient(
            transport=transport,
            base_url="https://testserver",
            headers={"user-agent": "pytest", **(BROWSER if headers is None else headers)},
        ) as http:
            yield http


async def call(http: httpx.AsyncClient, query: str, variables: dict[str, Any]) -> Any:
    response = await http.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200, response.text
    return response


def refresh_cookie(response: httpx.Response) -> str:
    cookies = response.headers.get_list("set-cookie")
    found = [c for c in cookies if c.startswith("strawgate_refresh=")]
    assert len(found) == 1, cookies
    return found[0]


async def test_the_refresh_token_travels_in_an_httponly_cookie(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(refresh_token_transport="cookie")
    async with browser(settings, clock) as http:
        email = unique_email()
        response = await call(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
        session = response.json()["data"]["signup"]
        assert session["__typename"] == "AuthSession"
        assert session["refreshToken"] is None  # never reaches JavaScript
        cookie = refresh_cookie(response)
        for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/graphql"):
            assert attribute in cookie, cookie
        # refresh without a token in the input: the cookie is read, and replaced.
        rotated = await call(http, REFRESH, {"i": {}})
        answer = rotated.json()["data"]["refresh"]
        assert answer["__typename"] == "AuthSession" and answer["refreshToken"] is None
        assert refresh_cookie(rotated) != cookie
        me = await http.post(
            "/graphql",
            json={"query": ME},
            headers={"authorization": f"Bearer {answer['accessToken']}"},
        )
        assert me.json()["data"]["me"]["email"] == email
        # logout reads the cookie too, and clears it.
        out = await call(http, LOGOUT, {"i": {}})
        assert out.json()["data"]["logout"]["revoked"] == 1
        cleared = refresh_cookie(out)
        assert "Max-Age=0" in cleared or "expires=" in cleared.lower()
        assert (await call(http, REFRESH, {"i": {}})).json()["data"]["refresh"]["code"] == (
            "INVALID_TOKEN"
        )


async def test_reuse_and_revoking_the_current_session_clear_the_cookie(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(refresh_token_transport="cookie", refresh_token_reuse_interval=0)
    async with browser(settings, clock) as http:
        email = unique_email()
        await call(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
        spent = http.cookies.get("strawgate_refresh")
        assert spent
        await call(http, REFRESH, {"i": {}})
        clock.advance(seconds=1)
        reused = await call(http, REFRESH, {"i": {"refreshToken": spent}})
        assert reused.json()["data"]["refresh"]["code"] == "TOKEN_REUSED"
        assert "Max-Age=0" in refresh_cookie(reused)

        login = await call(http, LOGIN, {"i": {"email": email, "password": PASSWORD}})
        token = login.json()["data"]["login"]["accessToken"]
        auth = {"authorization": f"Bearer {token}"}
        listed = await http.post("/graphql", json={"query": SESSIONS}, headers=auth)
        current = next(s["id"] for s in listed.json()["data"]["sessions"] if s["current"])
        revoked = await http.post(
            "/graphql",
            json={"query": REVOKE_SESSION, "variables": {"i": {"id": current}}},
            headers=auth,
        )
        assert revoked.json()["data"]["revokeSession"]["revoked"] == 1
        assert "Max-Age=0" in refresh_cookie(revoked)


async def test_every_post_needs_the_csrf_defence_login_included(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(
        refresh_token_transport="cookie", cors_allow_origins="https://app.example.com"
    )
    login = {"query": LOGIN, "variables": {"i": {"email": "a@example.com", "password": "x"}}}
    async with browser(settings, clock, headers={}) as http:
        # A cross-site form can send neither the header nor a right Origin.
        refused = await http.post("/graphql", json=login)
        assert refused.status_code == 403
        assert refused.json()["errors"][0]["extensions"]["code"] == "CSRF_REFUSED"
        foreign = await http.post(
            "/graphql",
            json=login,
            headers={"x-requested-with": "XMLHttpRequest", "origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
        for origin in ("https://app.example.com", "https://testserver", None):
            headers = {"x-requested-with": "XMLHttpRequest"}
            if origin:
                headers["origin"] = origin
            allowed = await http.post("/graphql", json=login, headers=headers)
            assert allowed.status_code == 200, (origin, allowed.text)
            assert allowed.json()["data"]["login"]["code"] == "INVALID_CREDENTIALS"


async def test_body_transport_stays_the_default(client: httpx.AsyncClient) -> None:
    """Mobile apps: the token in the body, no cookie, no CSRF header needed."""
    response = await client.post(
        "/graphql",
        json={"query": SIGNUP, "variables": {"i": {"email": unique_email(), "password": PASSWORD}}},
    )
    assert response.json()["data"]["signup"]["refreshToken"]
    assert "strawgate_refresh" not in response.headers.get("set-cookie", "")


async def test_the_lifecycle_in_cookie_mode(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> None:
    """A change of address completed by verifyOtp keeps the browser's own session (a new
    refresh cookie for it, no second session); deleting the account clears the cookie."""
    from tests.graph.test_lifecycle import CHANGE_EMAIL, DELETE_ACCOUNT

    settings = make_settings(refresh_token_transport="cookie", **smtp.settings())
    async with browser(settings, clock) as http:
        email = unique_email()
        signup = await call(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
        token = signup.json()["data"]["signup"]["accessToken"]
        auth = {"authorization": f"Bearer {token}"}
        new = f"moved-{email}"
        asked = await http.post(
            "/graphql",
            json={
                "query": CHANGE_EMAIL,
                "variables": {"i": {"newEmail": new, "password": PASSWORD}},
            },
            headers=auth,
        )
        challenge = asked.json()["data"]["changeEmail"]["challengeToken"]
        before = http.cookies.get("strawgate_refresh")
        code = (await smtp.wait_for(new)).code()
        moved = await call(http, VERIFY_OTP, {"i": {"challengeToken": challenge, "code": code}})
        session = moved.json()["data"]["verifyOtp"]
        assert session["refreshToken"] is None and session["user"]["email"] == new
        assert refresh_cookie(moved) and http.cookies.get("strawgate_refresh") != before
        auth = {"authorization": f"Bearer {session['accessToken']}"}
        listed = await http.post("/graphql", json={"query": SESSIONS}, headers=auth)
        assert [s["current"] for s in listed.json()["data"]["sessions"]] == [True]
        rotated = await call(http, REFRESH, {"i": {}})
        assert rotated.json()["data"]["refresh"]["__typename"] == "AuthSession"
        auth = {"authorization": f"Bearer {rotated.json()['data']['refresh']['accessToken']}"}

        deleted = await http.post(
            "/graphql",
            json={"query": DELETE_ACCOUNT, "variables": {"i": {"password": PASSWORD}}},
            headers=auth,
        )
        assert deleted.json()["data"]["deleteAccount"]["deleted"] is True
        assert "Max-Age=0" in refresh_cookie(deleted)
