"""Passkeys in the demo page, in headless Chromium with DevTools' virtual authenticator
(CTAP2, internal transport, resident keys, user verification): registering one from the
page (with the step-up a stale sign-in needs), renaming and deleting it; signing in by
autofill (conditional mediation) and with the button; a passkey as the second step of a
password login and as a step-up; and without user verification, no sign-in. One server and
one browser for the whole story (the browser tests' time is the suite's scarcest).

Headless, Chrome answers a conditional request with the virtual authenticator's passkey
by itself, as soon as it is made: there is no suggestion list to pick from, so the test
checks the request the page made (conditional, no allowCredentials, user verification
required) and that it signed in.

The page is opened on http://localhost:<port>: WebAuthn takes a host name as the RP ID,
not an IP address, and plain http only on localhost."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pyotp
from playwright.async_api import BrowserContext, CDPSession, Page, Response, Route, expect
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.browser import ARTIFACTS, chromium, served
from tests.conftest import MutableClock, unique_email
from tests.gql import PASSWORD
from tests.pg import free_port
from tests.smtp import SmtpSink


async def _virtual_authenticator(
    context: BrowserContext, page: Page, *, user_verified: bool = True
) -> tuple[CDPSession, str]:
    """A platform authenticator (as Touch ID or Windows Hello would be) for this page."""
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    added = await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": user_verified,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return cdp, str(added["authenticatorId"])


async def _credentials(cdp: CDPSession, authenticator: str) -> list[dict[str, Any]]:
    found = await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    return list(found["credentials"])


# Records what the page asks navigator.credentials.get for (and passes it on).
RECORD_REQUESTS = """
(() => {
  const get = navigator.credentials.get.bind(navigator.credentials);
  window.__webauthnRequests = [];
  navigator.credentials.get = (request) => {
    const key = request.publicKey;
    window.__webauthnRequests.push({
      mediation: request.mediation || null,
      allowCredentials: (key.allowCredentials || []).map((c) => c.type),
      userVerification: key.userVerification || null,
      rpId: key.rpId || null,
    });
    return get(request);
  };
})();
"""

# A browser without passkey autofill.
NO_AUTOFILL = "PublicKeyCredential.isConditionalMediationAvailable = async () => false;"


async def _requests(page: Page) -> list[dict[str, Any]]:
    """The get requests the page made since the last call."""
    found = await page.evaluate("window.__webauthnRequests.splice(0)")
    return list(found)


def _finish_passkey_login(response: Response) -> bool:
    return response.url.endswith("/graphql") and "finishPasskeyLogin" in (
        response.request.post_data or ""
    )


async def _without_user_verification(route: Route) -> None:
    """startPasskeyLogin's options as a client that asks for no user verification would
    pass them on."""
    response = await route.fetch()
    body = await response.json()
    ceremony = (body.get("data") or {}).get("startPasskeyLogin")
    if ceremony and "optionsJson" in ceremony:
        options = json.loads(ceremony["optionsJson"])
        options["userVerification"] = "discouraged"
        ceremony["optionsJson"] = json.dumps(options)
    await route.fulfill(response=response, json=body)


async def _sign_up(page: Page, smtp: SmtpSink, email: str) -> None:
    await page.fill("#signup-email", email)
    await page.fill("#signup-password", PASSWORD)
    await page.click("#signup-submit")
    await expect(page.locator("#challenge-title")).to_have_text("Verify your email")
    await page.fill("#challenge-code", (await smtp.wait_for(email)).code())
    await page.click("#challenge-submit")
    await expect(page.locator("#signed-in")).to_be_visible()
    await expect(page.locator("#me-email")).to_have_text(email)


async def test_passkeys_in_the_demo(
    make_settings: Callable[..., Settings],
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    port = free_port()
    app: Starlette = create_app(
        make_settings(
            require_email_verification=True,
            refresh_token_transport="cookie",
            device_token_transport="cookie",
            webauthn_rp_id="localhost",
            webauthn_origins=f"http://localhost:{port}",
            **smtp.settings(),
        ),
        clock=clock,
    )
    email = unique_email()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with served(app, port), chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        page.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        cdp, authenticator = await _virtual_authenticator(context, page)
        await page.add_init_script(RECORD_REQUESTS)
        await page.goto(f"http://localhost:{port}/demo")
        await expect(page.locator("#signed-out")).to_be_visible()
        assert (
            await page.evaluate("typeof PublicKeyCredential.parseCreationOptionsFromJSON")
            == "function"
        )

        # Register one, right after signing up (a recent sign-in).
        await _sign_up(page, smtp, email)
        await expect(page.locator("#passkeys-none")).to_be_visible()
        await page.fill("#passkey-name", "Laptop")
        await page.click("#passkey-add")
        await expect(page.locator("#status")).to_contain_text('Passkey "Laptop" added')
        rows = page.locator("#passkeys tr")
        await expect(rows).to_have_count(1)
        await expect(rows.locator(".passkey-name")).to_have_value("Laptop")
        await expect(page.locator("#passkeys-none")).to_be_hidden()
        (credential,) = await _credentials(cdp, authenticator)
        assert credential["isResidentCredential"] is True
        assert credential["rpId"] == "localhost"
        await page.screenshot(path=ARTIFACTS / "demo-passkeys.png", full_page=True)

        # The same authenticator cannot make a second one for the account.
        await page.click("#passkey-add")
        await expect(page.locator("#status")).to_contain_text("already holds a passkey")
        await expect(rows).to_have_count(1)

        await rows.locator(".passkey-name").fill("Work laptop")
        await rows.locator(".passkey-rename").click()
        await expect(page.locator("#status")).to_contain_text('renamed "Work laptop"')

        # A stale sign-in: deleting asks for the password first, then goes ahead.
        clock.advance(minutes=11)
        await rows.locator(".passkey-delete").click()
        await expect(page.locator("#reauth")).to_be_visible()
        await expect(page.locator("#reauth-hint")).to_contain_text("Deleting a passkey")
        await page.fill("#reauth-password", PASSWORD)
        await page.click("#reauth-submit")
        await expect(page.locator("#status")).to_contain_text("Passkey deleted")
        await expect(page.locator("#reauth")).to_be_hidden()
        await expect(rows).to_have_count(0)
        # As a user removes it from their password manager too.
        await cdp.send("WebAuthn.clearCredentials", {"authenticatorId": authenticator})

        # And adding one after the sign-in has gone stale again: the same step-up.
        clock.advance(minutes=11)
        await page.click("#passkey-add")
        await expect(page.locator("#reauth-hint")).to_contain_text("Adding a passkey")
        await page.fill("#reauth-password", PASSWORD)
        await page.click("#reauth-submit")
        await expect(page.locator("#status")).to_contain_text('Passkey "Passkey" added')
        await expect(rows).to_have_count(1)
        assert len(await _credentials(cdp, authenticator)) == 1

        # Autofill: signed out, the page starts a conditional request at once. Chrome
        # answers it with the virtual authenticator's passkey by itself (no suggestion list
        # to pick from headless), so signing out signs straight back in.
        assert await page.get_attribute("#login-email", "autocomplete") == "username webauthn"
        await _requests(page)  # the one of the page's first load, aborted by the signup
        await page.click("#logout-button")
        await expect(page.locator("#status")).to_have_text("Signed in with your passkey.")
        await expect(page.locator("#signed-in")).to_be_visible()
        await expect(page.locator("#me-email")).to_have_text(email)
        (autofill,) = await _requests(page)
        assert autofill["mediation"] == "conditional"
        assert autofill["allowCredentials"] == []
        assert autofill["userVerification"] == "required"
        assert autofill["rpId"] == "localhost"

        # The button, in a browser without autofill (conditional mediation unavailable).
        # Signing out of this page would sign straight back in (above), so the page is
        # reloaded without autofill first (restored from its cookie), and signs out there;
        # the reload after it waits for the sign-out, which clears the cookie.
        await page.add_init_script(NO_AUTOFILL)
        await page.reload()
        await expect(page.locator("#me-email")).to_have_text(email)
        await page.click("#logout-button")
        await expect(page.locator("#status")).to_have_text("Signed out (1 session ended).")
        await page.reload()
        await expect(page.locator("#signed-out")).to_be_visible()
        await expect(page.locator("#status")).to_have_text("Sign up or sign in.")
        await page.click("#passkey-login")
        await expect(page.locator("#status")).to_have_text("Signed in with your passkey.")
        await expect(page.locator("#me-email")).to_have_text(email)
        (button,) = await _requests(page)
        assert button["mediation"] is None
        assert button["allowCredentials"] == []
        await expect(page.locator("#passkeys tr td").nth(2)).not_to_have_text("never")

        # Without user verification (no PIN or biometrics) the sign-in is refused.
        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        await cdp.send(
            "WebAuthn.setUserVerified", {"authenticatorId": authenticator, "isUserVerified": False}
        )
        # The options require it, so the browser itself refuses to answer...
        await page.click("#passkey-login")
        await expect(page.locator("#status")).to_have_text(
            "No passkey was used (the prompt was closed or timed out)."
        )
        await expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
        # ...and where a client asks for less (userVerification discouraged), the answer
        # without it reaches the server, which refuses it.
        await page.route("**/graphql", _without_user_verification)
        async with page.expect_response(_finish_passkey_login) as answered:
            await page.click("#passkey-login")
        refused = (await (await answered.value).json())["data"]["finishPasskeyLogin"]
        assert refused["__typename"] == "AuthError"
        assert refused["code"] == "INVALID_CREDENTIALS"
        await expect(page.locator("#status")).to_have_text(refused["message"])
        await expect(page.locator("#signed-out")).to_be_visible()
        await page.unroute("**/graphql", _without_user_verification)
        await cdp.send(
            "WebAuthn.setUserVerified", {"authenticatorId": authenticator, "isUserVerified": True}
        )

        # A passkey as the second step: two-factor on, a password login, then the passkey.
        await page.click("#passkey-login")
        await expect(page.locator("#signed-in")).to_be_visible()
        await page.click("#totp-setup")
        await expect(page.locator("#totp-secret")).not_to_be_empty()
        secret = (await page.locator("#totp-secret").inner_text()).strip()
        await page.fill("#totp-code", pyotp.TOTP(secret).at(clock.now()))
        await page.click("#totp-confirm")
        await expect(page.locator("#me-otp")).to_have_text("on")
        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        await _requests(page)
        await page.fill("#login-email", email)
        await page.fill("#login-password", PASSWORD)
        await page.click("#login-submit")
        await expect(page.locator("#challenge-title")).to_have_text("Two-factor sign-in")
        await expect(page.locator("#challenge-passkey")).to_be_visible()
        await page.click("#challenge-passkey")
        await expect(page.locator("#status")).to_have_text(
            "Verified with your passkey: you are signed in."
        )
        await expect(page.locator("#me-email")).to_have_text(email)
        (second_step,) = await _requests(page)
        assert second_step["mediation"] is None
        assert second_step["allowCredentials"] == ["public-key"]  # the account's one

        # A step-up by passkey: a stale sign-in, confirmed with the passkey, then the
        # delete goes ahead.
        clock.advance(minutes=11)
        await page.locator("#passkeys tr .passkey-delete").click()
        await expect(page.locator("#reauth")).to_be_visible()
        await page.click("#reauth-passkey")
        await expect(page.locator("#status")).to_contain_text("Passkey deleted")
        await expect(page.locator("#passkeys tr")).to_have_count(0)

        await page.click("#logout-button")
        await expect(page.locator("#signed-out")).to_be_visible()
        await context.close()
