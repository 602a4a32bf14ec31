"""Helpers of the identity-provider tests: the settings that point the app at a local
provider (tests/identity_provider.py), and the web redirect driven the way a browser
drives it: the app's authorize URL, the provider (a real HTTP client on loopback), the
callback with the browser's cookie, back to the app's redirect URL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.gql import SESSION_FIELDS, gql
from tests.identity_provider import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    LocalProvider,
    parse_form_post,
    pkce_pair,
)

REDIRECT = "https://app.example.com/auth/done"
APP_REDIRECT = "com.example.app:/oauth"
NATIVE_CLIENT = "ios-client"
PROVIDER = "acme"

EXCHANGE = (
    "mutation($i: ExchangeSignInCodeInput!) {"
    f" exchangeSignInCode(input: $i) {{ {SESSION_FIELDS} }} }}"
)
ID_TOKEN = (
    "mutation($i: SignInWithIdTokenInput!) {"
    f" signInWithIdToken(input: $i) {{ {SESSION_FIELDS} }} }}"
)
START_LINK = """
mutation($i: StartIdentityLinkInput!) { startIdentityLink(input: $i) {
  __typename ... on IdentityLinkStart { authorizeUrl }
  ... on AuthError { code message field } } }
"""
UNLINK = """
mutation($i: UnlinkIdentityInput!) { unlinkIdentity(input: $i) {
  __typename ... on User { id identities { provider } }
  ... on AuthError { code message field } } }
"""
IDENTITIES = """{ me { id email emailVerified hasPassword
  identities { provider email name linkedAt lastUsedAt } } }"""
PROVIDERS = "{ identityProviders { id name supportsIdToken } }"


def provider_settings(provider: LocalProvider, **overrides: Any) -> dict[str, Any]:
    """Settings for an app that signs in with `provider` as "acme" (a generic OpenID Connect
    provider whose verified addresses are trusted, unless overridden)."""
    acme: dict[str, Any] = {
        "issuer": provider.issuer,
        "name": "Acme ID",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
        "native_client_ids": NATIVE_CLIENT,
        "trust_email_verified": True,
    }
    acme.update(overrides.pop("acme", {}))
    return {
        "public_url": "http://testserver",
        "auth_redirect_urls": f"{REDIRECT},{APP_REDIRECT}",
        "identity_providers": {PROVIDER: acme, **overrides.pop("providers", {})},
        "identity_providers_allow_insecure": True,
        "identity_provider_timeout": 2.0,
        **overrides,
    }


def user_claims(
    email: str, *, verified: bool = True, sub: str | None = None, **more: Any
) -> dict[str, Any]:
    return {
        "sub": sub or f"sub-{email}",
        "email": email,
        "email_verified": verified,
        "name": "Ada Lovelace",
        **more,
    }


@dataclass
class Returned:
    """Where the redirect came back to the app: its query, and the PKCE verifier."""

    response: httpx.Response
    verifier: str

    @property
    def location(self) -> str:
        return str(self.response.headers.get("location", ""))

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}

    @property
    def code(self) -> str:
        assert "code" in self.query, self.location
        return self.query["code"]


async def authorize(
    client: httpx.AsyncClient,
    *,
    provider_id: str = PROVIDER,
    redirect_to: str = REDIRECT,
    challenge: str | None = None,
    method: str = "S256",
) -> tuple[httpx.Response, str]:
    verifier, made = pkce_pair()
    params = {
        "redirect_to": redirect_to,
        "code_challenge": challenge if challenge is not None else made,
        "code_challenge_method": method,
    }
    return await client.get(f"/auth/{provider_id}/authorize", params=params), verifier


async def at_provider(url: str) -> httpx.Response:
    """The provider's page for `url` (it approves its next_user at once)."""
    async with httpx.AsyncClient(timeout=10) as browser:
        return await browser.get(url)


async def come_back(client: httpx.AsyncClient, answer: httpx.Response) -> httpx.Response:
    """The provider's answer delivered to the app, as the browser would: a redirect
    followed, or a form_post page submitted."""
    if answer.status_code in (302, 303):
        return await client.get(answer.headers["location"])
    action, fields = parse_form_post(answer.text)
    return await client.post(action, data=fields)


async def sign_in_by_redirect(
    client: httpx.AsyncClient, *, provider_id: str = PROVIDER, redirect_to: str = REDIRECT
) -> Returned:
    """The whole redirect, up to the app's redirect URL (not the exchange)."""
    started, verifier = await authorize(client, provider_id=provider_id, redirect_to=redirect_to)
    assert started.status_code == 302, started.text
    answer = await at_provider(started.headers["location"])
    back = await come_back(client, answer)
    assert back.status_code in (302, 303), back.text
    return Returned(back, verifier)


async def exchange(
    client: httpx.AsyncClient,
    returned: Returned,
    *,
    token: str | None = None,
    verifier: str | None = None,
) -> dict[str, Any]:
    body = await gql(
        client,
        EXCHANGE,
        {"i": {"code": returned.code, "codeVerifier": verifier or returned.verifier}},
        token=token,
    )
    result: dict[str, Any] = body["data"]["exchangeSignInCode"]
    return result


async def id_token_sign_in(
    client: httpx.AsyncClient, token: str, *, provider_id: str = PROVIDER, **more: Any
) -> dict[str, Any]:
    body = await gql(client, ID_TOKEN, {"i": {"provider": provider_id, "idToken": token, **more}})
    result: dict[str, Any] = body["data"]["signInWithIdToken"]
    return result
