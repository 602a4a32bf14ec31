"""The web redirect through an OpenID Connect provider running on loopback: state, nonce and
PKCE with the provider, the app's own PKCE on exchangeSignInCode, and every refusal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from db.settings import Settings
from tests.conftest import MutableClock, unique_email
from tests.gql import gql, signed_up_and_proven
from tests.identities import (
    APP_REDIRECT,
    IDENTITIES,
    PROVIDERS,
    REDIRECT,
    at_provider,
    authorize,
    come_back,
    exchange,
    provider_settings,
    sign_in_by_redirect,
    user_claims,
)
from tests.identity_provider import LocalProvider, pkce_challenge


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def provider(local_provider: LocalProvider) -> LocalProvider:
    local_provider.reset()
    return local_provider


@pytest.fixture
def settings(make_settings: Callable[..., Settings], provider: LocalProvider) -> Settings:
    return make_settings(**provider_settings(provider))


async def test_identity_providers_lists_the_configured_ones(client: httpx.AsyncClient) -> None:
    body = await gql(client, PROVIDERS)
    assert body["data"]["identityProviders"] == [
        {"id": "acme", "name": "Acme ID", "supportsIdToken": True}
    ]


async def test_a_new_identity_with_a_verified_address_signs_up_by_redirect(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    provider.next_user = user_claims(email)

    returned = await sign_in_by_redirect(client)

    assert returned.location.startswith(REDIRECT + "?code=")
    session = await exchange(client, returned)
    assert session["__typename"] == "AuthSession", session
    me = (await gql(client, IDENTITIES, token=session["accessToken"]))["data"]["me"]
    assert me["email"] == email
    assert me["emailVerified"] is True
    assert me["hasPassword"] is False
    assert me["identities"][0]["provider"] == "acme"
    assert me["identities"][0]["name"] == "Ada Lovelace"
    # Strawgate ran its own state, nonce and PKCE (S256) with the provider.
    sent = provider.requests_to("/authorize")[0].query
    assert sent["code_challenge_method"] == "S256"
    assert sent["state"] and sent["nonce"]
    assert sent["redirect_uri"] == "http://testserver/auth/acme/callback"
    token_form = provider.requests_to("/token")[0].form
    assert pkce_challenge(token_form["code_verifier"]) == sent["code_challenge"]


async def test_the_same_identity_signs_in_to_the_same_account(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = user_claims(unique_email())
    provider.sticky_user = True
    first = await exchange(client, await sign_in_by_redirect(client))
    second = await exchange(client, await sign_in_by_redirect(client))

    assert first["user"]["id"] == second["user"]["id"]


@pytest.mark.parametrize(
    ("redirect_to", "challenge", "method"),
    [
        ("https://evil.example.com/auth/done", None, "S256"),
        (REDIRECT + "/", None, "S256"),
        (REDIRECT + "?x=1", None, "S256"),
        (REDIRECT, None, "plain"),
        (REDIRECT, "short", "S256"),
        (REDIRECT, None, ""),
    ],
)
async def test_a_start_that_is_not_one_is_a_400_and_never_a_redirect(
    client: httpx.AsyncClient,
    provider: LocalProvider,
    redirect_to: str,
    challenge: str | None,
    method: str,
) -> None:
    started, _ = await authorize(
        client, redirect_to=redirect_to, challenge=challenge, method=method
    )

    assert started.status_code == 400
    assert "location" not in started.headers
    assert provider.requests == []


async def test_an_unknown_provider_is_a_400(client: httpx.AsyncClient) -> None:
    started, _ = await authorize(client, provider_id="nosuch")
    assert started.status_code == 400
    assert "location" not in started.headers


async def test_an_app_scheme_redirect_url_on_the_list_works(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = user_claims(unique_email())
    returned = await sign_in_by_redirect(client, redirect_to=APP_REDIRECT)
    assert returned.location.startswith(APP_REDIRECT + "?code=")
    assert (await exchange(client, returned))["__typename"] == "AuthSession"


async def test_a_state_comes_back_once(client: httpx.AsyncClient, provider: LocalProvider) -> None:
    provider.next_user = user_claims(unique_email())
    started, _ = await authorize(client)
    answer = await at_provider(started.headers["location"])

    first = await come_back(client, answer)
    again = await come_back(client, answer)

    assert "code" in parse_qs(urlsplit(first.headers["location"]).query)
    assert parse_qs(urlsplit(again.headers["location"]).query)["error"] == ["INVALID_TOKEN"]


async def test_a_callback_in_another_browser_is_refused_and_spends_nothing(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = user_claims(unique_email())
    started, _ = await authorize(client)
    answer = await at_provider(started.headers["location"])
    callback = answer.headers["location"]

    client.cookies.clear()  # not the browser that started
    other = await client.get(callback)
    assert parse_qs(urlsplit(other.headers["location"]).query)["error"] == ["INVALID_TOKEN"]
    assert provider.requests_to("/token") == []


async def test_an_unknown_state_is_a_400_page(client: httpx.AsyncClient) -> None:
    answer = await client.get("/auth/acme/callback", params={"state": "made-up", "code": "x"})
    assert answer.status_code == 400
    assert "location" not in answer.headers


async def test_a_cancelled_sign_in_comes_back_with_cancelled(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.deny_next = True
    returned = await sign_in_by_redirect(client)
    assert returned.query["error"] == "CANCELLED"
    assert "code" not in returned.query


@pytest.mark.parametrize("mode", ["error", "garbage", "slow", "huge"])
async def test_a_token_endpoint_that_fails_comes_back_with_provider_error(
    client: httpx.AsyncClient, provider: LocalProvider, mode: str
) -> None:
    provider.next_user = user_claims(unique_email())
    provider.fail("token", mode, delay=5)
    returned = await sign_in_by_redirect(client)
    assert returned.query["error"] == "PROVIDER_ERROR"


async def test_discovery_that_fails_at_the_start_comes_back_with_provider_error(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.fail("discovery", "error")
    started, _ = await authorize(client)
    assert started.status_code == 302
    assert parse_qs(urlsplit(started.headers["location"]).query)["error"] == ["PROVIDER_ERROR"]


@pytest.mark.parametrize(
    "overrides",
    [{"nonce": "not-the-one-sent"}, {"aud": "another-client"}, {"iss": "https://elsewhere"}],
)
async def test_an_id_token_that_does_not_verify_comes_back_with_provider_error(
    client: httpx.AsyncClient, provider: LocalProvider, overrides: dict[str, Any]
) -> None:
    provider.next_user = user_claims(unique_email())
    provider.id_token_overrides = overrides
    returned = await sign_in_by_redirect(client)
    assert returned.query["error"] == "PROVIDER_ERROR"


async def test_the_code_needs_the_apps_verifier_and_is_not_spent_by_a_wrong_one(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = user_claims(unique_email())
    returned = await sign_in_by_redirect(client)

    wrong = await exchange(client, returned, verifier="x" * 43)
    assert wrong["code"] == "INVALID_TOKEN"
    right = await exchange(client, returned)
    assert right["__typename"] == "AuthSession"
    again = await exchange(client, returned)
    assert again["code"] == "INVALID_TOKEN"


async def test_the_code_expires_after_a_minute(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    provider.next_user = user_claims(unique_email())
    returned = await sign_in_by_redirect(client)
    clock.advance(seconds=61)
    assert (await exchange(client, returned))["code"] == "INVALID_TOKEN"


async def test_a_malformed_verifier_is_invalid_input(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = user_claims(unique_email())
    returned = await sign_in_by_redirect(client)
    answer = await exchange(client, returned, verifier="short")
    assert answer["code"] == "INVALID_INPUT"
    assert answer["field"] == "codeVerifier"


async def test_an_unexpected_failure_is_a_page_with_the_request_id_never_a_traceback(
    client: httpx.AsyncClient, database_url: str
) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE identity_flows RENAME TO identity_flows_away"))
        answer = await client.get("/auth/acme/callback", params={"state": "s", "code": "c"})
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE identity_flows_away RENAME TO identity_flows"))
        await engine.dispose()

    assert answer.status_code == 503
    assert answer.headers["x-request-id"] in answer.text
    assert "Traceback" not in answer.text and "identity_flows" not in answer.text


async def test_a_challenge_serves_one_flow(client: httpx.AsyncClient) -> None:
    """A challenge copied from someone's authorize URL starts no flow of the copier's (who
    would want that someone's app to exchange the copier's code: login CSRF)."""
    first, _ = await authorize(client, challenge="A" * 43)
    copied, _ = await authorize(client, challenge="A" * 43)

    assert first.status_code == 302
    assert copied.status_code == 400
    assert "location" not in copied.headers


async def test_an_address_from_the_user_info_is_judged_by_the_user_infos_word(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    """A token without an address but saying email_verified, and user info with an
    unverified address: the token's word never vouches for the user info's address."""
    email = unique_email()
    await signed_up_and_proven(client, email)
    provider.next_user = user_claims(email, verified=False)
    provider.id_token_overrides = {"email": None, "email_verified": True}

    answer = await exchange(client, await sign_in_by_redirect(client))

    assert provider.requests_to("/userinfo")
    assert answer["code"] == "EMAIL_TAKEN"
