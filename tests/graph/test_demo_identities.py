"""Identity providers in the demo page, in headless Chromium against a real server process
(uvicorn, settings from the environment as a deployment gives them) and the local OpenID
Connect provider (tests/identity_provider.py) showing its consent page: "Sign in with Acme
ID", consent, back on /demo signed in with the identity listed; Cancel at the provider,
back with the cancelled message; and a password account linking Acme ID from the page,
then unlinking it. One server and one browser for the whole story.

The page keeps its PKCE verifier in sessionStorage for the trip only, and takes the code
out of its address as soon as it is back: both are checked here."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.async_api import Page, expect

from db.settings import Settings
from graph.app import create_app
from tests.browser import ARTIFACTS, chromium, served
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET, MutableClock, unique_email
from tests.gql import PASSWORD
from tests.identity_provider import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, LocalProvider
from tests.pg import free_port
from tests.servers import running, server_env

PENDING = "strawgate-demo-redirect"  # the page's sessionStorage key


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    with LocalProvider() as local:
        yield local


def _env(database_url: str, provider: LocalProvider, base_url: str) -> dict[str, str]:
    return server_env(
        ENVIRONMENT="development",
        SECRET_KEY=TEST_SECRET,
        ENCRYPTION_KEYS=TEST_FERNET_KEY,
        DATABASE_URL=database_url,
        REQUIRE_EMAIL_VERIFICATION="false",
        REFRESH_TOKEN_TRANSPORT="cookie",
        PUBLIC_URL=base_url,
        AUTH_REDIRECT_URLS=f"{base_url}/demo",
        IDENTITY_PROVIDERS__ACME__ISSUER=provider.issuer,
        IDENTITY_PROVIDERS__ACME__NAME="Acme ID",
        IDENTITY_PROVIDERS__ACME__CLIENT_ID=DEFAULT_CLIENT_ID,
        IDENTITY_PROVIDERS__ACME__CLIENT_SECRET=DEFAULT_CLIENT_SECRET,
        IDENTITY_PROVIDERS__ACME__TRUST_EMAIL_VERIFIED="true",
        IDENTITY_PROVIDERS_ALLOW_INSECURE="true",
    )


async def _consent(page: Page, provider: LocalProvider, subject: str, email: str) -> None:
    """At the provider's page (the browser went there): who signs in, then Continue."""
    await expect(page.locator("h1")).to_have_text(LocalProvider.NAME)
    assert page.url.startswith(provider.issuer + "/authorize?")
    await page.fill("#sub", subject)
    await page.fill("#email", email)
    await page.get_by_role("button", name="Continue").click()


async def _pending(page: Page) -> str | None:
    kept = await page.evaluate(f"sessionStorage.getItem({PENDING!r})")
    return None if kept is None else str(kept)


async def test_identity_providers_in_the_demo(
    database_url: str, clean_db: None, provider: LocalProvider, tmp_path: Path
) -> None:
    provider.reset()  # no next_user: the consent page asks who signs in
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    demo = f"{base_url}/demo"
    env = _env(database_url, provider, base_url)
    ada, bob = unique_email(), unique_email()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with (
        running(env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as server,
        chromium() as browser,
    ):
        context = await browser.new_context()
        page = await context.new_page()
        page.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        await page.goto(demo)
        await expect(page.locator("#signed-out")).to_be_visible()
        await expect(page.locator("#providers-section")).to_be_visible()
        sign_in = page.get_by_role("button", name="Sign in with Acme ID")
        await expect(sign_in).to_have_count(1)

        # Sign in with Acme ID: the provider's consent page, then back here signed in.
        await sign_in.click()
        await expect(page).to_have_url(re.compile(re.escape(provider.issuer)))
        (started,) = provider.requests_to("/authorize", "GET")
        assert started.query["code_challenge_method"] == "S256"
        assert started.query["redirect_uri"] == f"{base_url}/auth/acme/callback"
        await _consent(page, provider, "acme-ada", ada)
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#me-email")).to_have_text(ada)
        await expect(page.locator("#status")).to_have_text("Signed in with Acme ID.")
        assert page.url == demo  # the code is out of the address bar
        assert await _pending(page) is None
        rows = page.locator("#identities tr")
        await expect(rows).to_have_count(1)
        await expect(rows.locator("td").nth(0)).to_have_text("Acme ID")
        await expect(rows.locator("td").nth(1)).to_have_text(ada)
        await expect(page.locator("#identities-none")).to_be_hidden()
        # Linked already: no button to link it again.
        await expect(page.locator(".identity-link")).to_have_count(0)
        await page.screenshot(path=ARTIFACTS / "demo-identities.png", full_page=True)
        # The session survives a reload, by its cookie, as a password one does.
        await page.reload()
        await expect(page.locator("#status")).to_contain_text("Welcome back")
        await expect(page.locator("#me-email")).to_have_text(ada)

        # Cancel at the provider: back here signed out, with the server's message.
        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        await sign_in.click()
        await expect(page.locator("h1")).to_have_text(LocalProvider.NAME)
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#status")).to_have_text(
            "The sign-in with Acme ID was cancelled."
        )
        await expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
        await expect(page.locator("#signed-out")).to_be_visible()
        assert page.url == demo
        assert await _pending(page) is None

        # A password account links Acme ID from the page (a fresh sign-in: no step-up),
        # and comes back to the same session with the identity listed.
        await page.fill("#signup-email", bob)
        await page.fill("#signup-password", PASSWORD)
        await page.click("#signup-submit")
        await expect(page.locator("#me-email")).to_have_text(bob)
        await expect(page.locator("#identities-none")).to_be_visible()
        await page.get_by_role("button", name="Link Acme ID").click()
        await _consent(page, provider, "acme-bob", f"work-{bob}")
        await expect(page.locator("#status")).to_have_text(
            "Acme ID linked: it signs you in here too."
        )
        await expect(page.locator("#me-email")).to_have_text(bob)
        assert page.url == demo
        await expect(rows).to_have_count(1)
        await expect(rows.locator("td").nth(1)).to_have_text(f"work-{bob}")
        await expect(page.locator(".identity-link")).to_have_count(0)

        await rows.locator(".identity-unlink").click()
        await expect(page.locator("#status")).to_have_text(
            "Acme ID unlinked: it no longer signs in to this account."
        )
        await expect(rows).to_have_count(0)
        await expect(page.locator("#identities-none")).to_be_visible()
        await expect(page.get_by_role("button", name="Link Acme ID")).to_be_visible()

        # Every code went through the token endpoint with its verifier.
        for exchange in provider.requests_to("/token", "POST"):
            assert exchange.form.get("code_verifier")
        await context.close()
    assert "Traceback" not in server.log()


async def test_no_provider_no_buttons_and_an_error_shown_as_text(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    """A server without providers: no section at all. A redirect's error comes back as
    text, whatever it holds."""
    app = create_app(make_settings(refresh_token_transport="cookie"), clock=clock)
    async with served(app) as base_url, chromium() as browser:
        page = await browser.new_page()
        page.set_default_timeout(15_000)
        await page.goto(f"{base_url}/demo")
        await expect(page.locator("#status")).to_have_text("Sign up or sign in.")
        await expect(page.locator("#providers-section")).to_be_hidden()
        await expect(page.locator("#provider-buttons button")).to_have_count(0)

        markup = "<img src=x onerror=alert(1)>"
        await page.goto(
            f"{base_url}/demo?"
            + urlencode({"error": "PROVIDER_ERROR", "error_description": markup})
        )
        await expect(page.locator("#status")).to_have_text(markup)
        await expect(page.locator("#status img")).to_have_count(0)
        await expect(page.locator("#signed-out")).to_be_visible()
        assert page.url == f"{base_url}/demo"
        await page.close()
