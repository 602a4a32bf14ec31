"""The development demo page at /demo: served in development only, under a policy of its
own, and driven end to end in headless Chromium with cookie transport (signup with the
emailed code, TOTP enrolment from the QR code, a TOTP login, me, sessions, logout)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pyotp
import zxingcpp
from PIL import Image
from playwright.async_api import Page, Response, expect
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.browser import ARTIFACTS, chromium, served
from tests.conftest import MutableClock, client_for, running, unique_email
from tests.gql import PASSWORD
from tests.smtp import SmtpSink

REFRESH_COOKIE = "strawgate_refresh"


async def test_the_demo_page_is_served_in_development_with_its_own_policy(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/demo")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in response.headers["content-security-policy"].split(";")
    )
    # Its one inline script by hash: nothing injected into it could run.
    assert policy["script-src"].startswith("'sha256-")
    assert "unsafe" not in policy["script-src"]
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert response.headers["cache-control"] == "no-store"


async def test_there_is_no_demo_page_in_production(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    app = create_app(
        make_settings(
            environment="production",
            mail_server="127.0.0.1",
            mail_from="a@b.c",
            product_url="https://auth.example.com",
        ),
        clock=clock,
    )
    async for _ in running(app):
        async with client_for(app) as http:
            response = await http.get("/demo")
    assert response.status_code == 404
    assert "Strawgate demo" not in response.text


async def _graphql_bodies(responses: list[Response]) -> list[Any]:
    return await asyncio.gather(*(response.json() for response in responses))


def _auth_sessions(bodies: list[Any]) -> list[dict[str, Any]]:
    found = []
    for body in bodies:
        for value in (body.get("data") or {}).values():
            if isinstance(value, dict) and value.get("__typename") == "AuthSession":
                found.append(value)
    return found


async def _no_token_in_script_reach(page: Page) -> None:
    cookies_seen_by_script = await page.evaluate("document.cookie")
    assert REFRESH_COOKIE not in cookies_seen_by_script
    stored = await page.evaluate("[localStorage.length, sessionStorage.length]")
    assert stored == [0, 0]


async def test_the_demo_in_a_real_browser(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    app: Starlette = create_app(
        make_settings(
            require_email_verification=True,
            refresh_token_transport="cookie",
            device_token_transport="cookie",
            **smtp.settings(),
        ),
        clock=clock,
    )
    email = unique_email()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with served(app) as base_url, chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        page.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)  # its own default is 5 s: short on a busy CI
        graphql_answers: list[Response] = []
        page.on(
            "response",
            lambda response: (
                graphql_answers.append(response) if response.url.endswith("/graphql") else None
            ),
        )

        await page.goto(f"{base_url}/demo")
        await expect(page.locator("#signed-out")).to_be_visible()

        # Sign up, with the code from the mail the server sent.
        await page.fill("#signup-email", email)
        await page.fill("#signup-password", PASSWORD)
        await page.click("#signup-submit")
        await expect(page.locator("#challenge-title")).to_have_text("Verify your email")
        mail = await smtp.wait_for(email)
        await page.fill("#challenge-code", mail.code())
        await page.click("#challenge-submit")
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#me-email")).to_have_text(email)
        await expect(page.locator("#me-verified")).to_have_text("yes")
        await expect(page.locator("#transport")).to_contain_text("HttpOnly cookie")

        (refresh_cookie,) = [c for c in await context.cookies() if c["name"] == REFRESH_COOKIE]
        assert refresh_cookie["httpOnly"] is True
        assert refresh_cookie["secure"] is True
        assert refresh_cookie["sameSite"] == "Strict"
        assert refresh_cookie["path"] == "/graphql"
        await _no_token_in_script_reach(page)

        # Enrol an authenticator from the QR code the page shows.
        await page.click("#totp-setup")
        qr = page.locator("#totp-qr")
        await expect(qr).to_be_visible()
        await page.wait_for_function(
            "() => { const img = document.getElementById('totp-qr');"
            " return img.complete && img.naturalWidth > 0; }"
        )
        await page.screenshot(path=ARTIFACTS / "demo-enrolment.png", full_page=True)
        secret = (await page.locator("#totp-secret").inner_text()).strip()
        # What a phone's camera reads off the screen: the otpauth URI with that secret.
        decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(await qr.screenshot())))
        assert len(decoded) == 1
        uri = urlsplit(decoded[0].text)
        assert (uri.scheme, uri.netloc, unquote(uri.path)) == (
            "otpauth",
            "totp",
            f"/Strawgate:{email}",
        )
        assert parse_qs(uri.query)["secret"] == [secret]
        await page.fill("#totp-code", pyotp.TOTP(secret).at(clock.now()))
        await page.click("#totp-confirm")
        await expect(page.locator("#recovery-codes li")).to_have_count(10)
        await expect(page.locator("#me-otp")).to_have_text("on")

        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        await expect(page.locator("#status")).to_contain_text("1 session ended")
        await expect(page.locator("#me-email")).to_be_empty()
        assert REFRESH_COOKIE not in {c["name"] for c in await context.cookies()}

        # A TOTP login, a step later (the confirming code is spent).
        clock.advance(seconds=30)
        await page.fill("#login-email", email)
        await page.fill("#login-password", PASSWORD)
        await page.click("#login-submit")
        await expect(page.locator("#challenge-title")).to_have_text("Two-factor sign-in")
        await page.fill("#challenge-code", pyotp.TOTP(secret).at(clock.now()))
        await page.click("#challenge-submit")
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#me-email")).to_have_text(email)
        await expect(page.locator("#me-otp")).to_have_text("on")

        # The sessions: the one signed out is gone, this one is marked.
        await expect(page.locator("#sessions tr")).to_have_count(1)
        await expect(page.locator("#sessions tr")).to_contain_text("this device")

        # Every session the server answered kept its refresh token out of the body.
        sessions = _auth_sessions(await _graphql_bodies(graphql_answers))
        assert len(sessions) == 2
        assert all(session["refreshToken"] is None for session in sessions)
        await _no_token_in_script_reach(page)

        # A reload keeps the session: the page refreshes from its cookie.
        graphql_answers.clear()
        await page.reload()
        await expect(page.locator("#status")).to_contain_text("restored from its cookie")
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#me-email")).to_have_text(email)
        assert all(
            s["refreshToken"] is None
            for s in _auth_sessions(await _graphql_bodies(graphql_answers))
        )

        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        assert REFRESH_COOKIE not in {c["name"] for c in await context.cookies()}
        await page.reload()
        await expect(page.locator("#signed-out")).to_be_visible()
        await context.close()


async def test_the_demo_under_body_transport_keeps_the_refresh_token_in_memory(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    """With the default body transport the page still works, says where the refresh
    token is, and keeps it out of storage (so a reload signs out)."""
    app: Starlette = create_app(
        make_settings(require_email_verification=True, **smtp.settings()), clock=clock
    )
    email = unique_email()
    async with served(app) as base_url, chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        page.set_default_timeout(15_000)
        await page.goto(f"{base_url}/demo")
        await page.fill("#signup-email", email)
        await page.fill("#signup-password", PASSWORD)
        await page.click("#signup-submit")
        await expect(page.locator("#challenge-title")).to_have_text("Verify your email")
        await page.fill("#challenge-code", (await smtp.wait_for(email)).code())
        await page.click("#challenge-submit")
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#transport")).to_contain_text("in this page's memory")
        await page.click("#refresh-button")
        await expect(page.locator("#status")).to_contain_text("New tokens issued")
        assert await context.cookies() == []
        assert await page.evaluate("[localStorage.length, sessionStorage.length]") == [0, 0]
        await page.click("#logout-button")
        await expect(page.locator("#status")).to_contain_text("1 session ended")
        await context.close()
