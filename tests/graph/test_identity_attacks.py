"""An attacker's review of the provider sign-ins (db/services/signin/identity.py and
identity_redirect.py): each test is a way in that was open, or a way a provider's answer
made this server fail, through HTTP and GraphQL with a real provider on loopback and
PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from db.settings import Settings
from tests.conftest import MutableClock, unique_email
from tests.gql import gql
from tests.identities import (
    IDENTITIES,
    authorize,
    id_token_sign_in,
    provider_settings,
    sign_in_by_redirect,
    user_claims,
)
from tests.identity_provider import LocalProvider

# The order of P-256: an ECDSA signature (r, s) verifies as (r, n - s) too.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ID_TOKEN_ANSWER = (
    "mutation($i: SignInWithIdTokenInput!) { signInWithIdToken(input: $i) {"
    " __typename ... on AuthSession { accessToken user { id } }"
    " ... on AuthError { code message field } } }"
)


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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def flipped(token: str) -> str:
    """The same ES256 token with its signature's s replaced by n - s: another string,
    made by anyone who holds the token, that verifies all the same."""
    head, body, signature = token.split(".")
    raw = _unb64(signature)
    s = int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{_b64(raw[:32] + (P256_ORDER - s).to_bytes(32, 'big'))}"


async def answer_to(client: httpx.AsyncClient, token: str, **more: Any) -> dict[str, Any]:
    """signInWithIdToken's answer, with no GraphQL error (an internal error fails here)."""
    body = await gql(client, ID_TOKEN_ANSWER, {"i": {"provider": "acme", "idToken": token, **more}})
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"]["signInWithIdToken"]
    return result


async def identities_of(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    me = await gql(client, IDENTITIES, token=token)
    found: list[dict[str, Any]] = me["data"]["me"]["identities"]
    return found


# -- a thief holding one ID token -------------------------------------------------------------


async def test_an_id_token_with_its_signature_flipped_is_the_token_already_used(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    """ECDSA signatures are malleable: whoever holds a used ES256 token (a log, a proxy)
    can make a second string of it that verifies. It was spent as a string, so it signed
    in once more."""
    token = provider.mint_id_token(user_claims(unique_email()), now=clock.now(), alg="ES256")
    assert (await id_token_sign_in(client, token))["__typename"] == "AuthSession"

    again = await answer_to(client, flipped(token))

    assert again["code"] == "INVALID_TOKEN", again


async def test_a_token_carrying_a_hashed_nonce_needs_the_nonce_not_the_hash(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    """The app hashes its nonce for the provider so that whoever sees the token cannot
    produce the nonce; handing back the hash the token carries must not pass for it."""
    raw = "the app's own nonce, sent to nobody"
    hashed = hashlib.sha256(raw.encode()).hexdigest()
    stolen = provider.mint_id_token(user_claims(unique_email()), now=clock.now(), nonce=hashed)

    refused = await answer_to(client, stolen, nonce=hashed)

    assert refused["code"] == "INVALID_TOKEN", refused
    assert refused["field"] == "nonce"
    # Refused before it was spent: the app holding the nonce still signs in with it.
    assert (await answer_to(client, stolen, nonce=raw))["__typename"] == "AuthSession"


async def test_a_raw_nonce_in_the_token_still_signs_in(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    raw = "a-raw-nonce-the-app-passed-as-it-is"
    token = provider.mint_id_token(user_claims(unique_email()), now=clock.now(), nonce=raw)

    assert (await answer_to(client, token, nonce=raw))["__typename"] == "AuthSession"


# -- what a provider (malicious, compromised or just odd) can make of this server -------------


async def test_an_id_token_that_lives_for_ever_is_refused_not_an_internal_error(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = provider.mint_id_token(user_claims(unique_email(), exp=10**15), now=clock.now())

    assert (await answer_to(client, token))["code"] == "INVALID_TOKEN"


async def test_a_subject_with_control_characters_is_refused(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    claims = user_claims(unique_email(), sub="subject\x00one")
    token = provider.mint_id_token(claims, now=clock.now())

    assert (await answer_to(client, token))["code"] == "INVALID_TOKEN"

    provider.next_user = claims
    returned = await sign_in_by_redirect(client)
    assert returned.query["error"] == "PROVIDER_ERROR"


async def test_a_name_with_control_and_format_characters_is_kept_without_them(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    claims = user_claims(unique_email(), name="Ada\x00\u202e Love\nlace\x1b[2J")
    session = await answer_to(client, provider.mint_id_token(claims, now=clock.now()))

    assert session["__typename"] == "AuthSession", session
    found = await identities_of(client, session["accessToken"])
    assert found[0]["name"] == "Ada Love lace[2J"

    provider.next_user = user_claims(unique_email(), name="Bob\x00")
    returned = await sign_in_by_redirect(client)
    assert "code" in returned.query, returned.location


async def test_a_linked_identitys_new_address_with_a_nul_keeps_the_old_one(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    first = provider.mint_id_token(user_claims(email, sub="linked"), now=clock.now())
    assert (await answer_to(client, first))["__typename"] == "AuthSession"

    odd = user_claims(f"a\x00{email}", sub="linked", jti="2")
    session = await answer_to(client, provider.mint_id_token(odd, now=clock.now()))

    assert session["__typename"] == "AuthSession", session
    assert [i["email"] for i in await identities_of(client, session["accessToken"])] == [email]


async def test_another_provider_account_with_the_holders_address_is_email_taken(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    """The user's provider account was replaced by another with the same verified address
    (one per user and provider): refused as taken, never an internal error."""
    email = unique_email()
    old = provider.mint_id_token(user_claims(email, sub="old"), now=clock.now())
    first = await answer_to(client, old)
    assert first["__typename"] == "AuthSession", first

    new = await answer_to(
        client, provider.mint_id_token(user_claims(email, sub="new"), now=clock.now())
    )

    assert new["code"] == "EMAIL_TAKEN", new
    assert "unlink" in new["message"]
    assert [i["email"] for i in await identities_of(client, first["accessToken"])] == [email]


async def test_a_providers_error_cannot_forge_a_log_line(
    client: httpx.AsyncClient, provider: LocalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    started, _verifier = await authorize(client)
    state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]

    with caplog.at_level(logging.WARNING, logger="strawgate.identities"):
        back = await client.get(
            "/auth/acme/callback",
            params={"state": state, "error": "server_error\n2026-01-01 CRITICAL forged"},
        )

    assert parse_qs(urlsplit(back.headers["location"]).query)["error"] == ["PROVIDER_ERROR"]
    messages = [r.getMessage() for r in caplog.records if r.name == "strawgate.identities"]
    assert messages, caplog.records
    assert not any("\n" in message for message in messages), messages


# -- the callback, posted by anyone ---------------------------------------------------------


@pytest.mark.parametrize(
    "posted",
    [
        {"data": {"state": "made-up", "code": "x"}},
        {"data": {f"field{n}": "x" for n in range(100)}},
        {"files": {"state": ("state.txt", b"made-up")}},
        {
            "content": b"state=%ff%fe&code=x",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
    ],
    ids=["unknown-state", "many-fields", "multipart", "not-utf8"],
)
async def test_a_callback_posted_by_a_stranger_is_a_400_page(
    client: httpx.AsyncClient, posted: dict[str, Any]
) -> None:
    answer = await client.post("/auth/acme/callback", **posted)

    assert answer.status_code == 400, answer.text
    assert "location" not in answer.headers


async def test_a_callback_by_form_post_completes_the_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    """Apple's way back (response_mode=form_post): the provider's answer in a form POST."""
    email = unique_email()
    provider.next_user = user_claims(email)
    started, verifier = await authorize(client)
    async with httpx.AsyncClient(timeout=10) as browser:
        answer = await browser.get(started.headers["location"])
    fields = parse_qs(urlsplit(answer.headers["location"]).query)

    back = await client.post(
        "/auth/acme/callback", data={key: values[0] for key, values in fields.items()}
    )

    assert back.status_code == 303, back.text
    code = parse_qs(urlsplit(back.headers["location"]).query)["code"][0]
    session = await gql(
        client,
        "mutation($i: ExchangeSignInCodeInput!) { exchangeSignInCode(input: $i) {"
        " __typename ... on AuthSession { user { email } } } }",
        {"i": {"code": code, "codeVerifier": verifier}},
    )
    assert session["data"]["exchangeSignInCode"]["user"]["email"] == email
