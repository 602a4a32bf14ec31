"""signInWithIdToken, as a native app calls it: ID tokens minted by the local OpenID Connect
provider (tests/identity_provider.py) at the app's injected time, checked by the app against
the provider's published keys fetched over real HTTP, on a real PostgreSQL. Every refusal
is an AuthError in a 200 answer, never a GraphQL error or a 500."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from jose import jwt as jose_jwt
from starlette.applications import Starlette

from db.settings import Settings
from tests.conftest import MutableClock, client_for, unique_email
from tests.gql import ME, SESSIONS, gql
from tests.graph.test_mfa import CONFIRM, SETUP, code_at
from tests.identities import (
    ID_TOKEN,
    IDENTITIES,
    NATIVE_CLIENT,
    provider_settings,
    user_claims,
)
from tests.identity_provider import DEFAULT_CLIENT_ID, LocalProvider


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def provider(local_provider: LocalProvider) -> LocalProvider:
    local_provider.reset()
    local_provider.retire_old_keys()  # a rotation in one test is not the next one's
    return local_provider


@pytest.fixture
def settings(make_settings: Callable[..., Settings], provider: LocalProvider) -> Settings:
    return make_settings(**provider_settings(provider))


def mint(
    provider: LocalProvider,
    clock: MutableClock,
    claims: dict[str, Any] | None = None,
    *,
    email: str | None = None,
    **more: Any,
) -> str:
    """An ID token issued at the app's now (unless `now` is given) for `email` (a fresh
    address by default), with a jti of its own so that no two minted tokens are equal."""
    base = user_claims(email or unique_email())
    more.setdefault("now", clock.now())
    return provider.mint_id_token({**base, "jti": secrets.token_hex(8), **(claims or {})}, **more)


async def sign_in(
    client: httpx.AsyncClient, token: str, *, provider_id: str = "acme", **more: Any
) -> dict[str, Any]:
    """signInWithIdToken's answer; it must be a 200 without GraphQL errors."""
    body = await gql(client, ID_TOKEN, {"i": {"provider": provider_id, "idToken": token, **more}})
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"]["signInWithIdToken"]
    return result


async def refused(client: httpx.AsyncClient, token: str, **more: Any) -> str:
    """The error code of a sign-in that must be refused."""
    answer = await sign_in(client, token, **more)
    assert answer["__typename"] == "AuthError", answer
    return str(answer["code"])


def signed_in(answer: dict[str, Any]) -> str:
    assert answer["__typename"] == "AuthSession", answer
    return str(answer["accessToken"])


# -- signing up and in -------------------------------------------------------------------


async def test_a_valid_token_signs_up_then_signs_in_to_the_same_account(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    first = await sign_in(client, mint(provider, clock, email=email))
    token = signed_in(first)

    me = (await gql(client, IDENTITIES, token=token))["data"]["me"]
    assert me["email"] == email
    assert me["emailVerified"] is True
    assert me["hasPassword"] is False
    assert [(i["provider"], i["email"], i["name"]) for i in me["identities"]] == [
        ("acme", email, "Ada Lovelace")
    ]
    assert jose_jwt.get_unverified_claims(token)["amr"] == ["fed"]

    clock.advance(minutes=5)
    second = await sign_in(client, mint(provider, clock, email=email))
    assert second["user"]["id"] == first["user"]["id"]


async def test_the_native_client_id_is_an_accepted_audience(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    signed_in(await sign_in(client, mint(provider, clock, client_id=NATIVE_CLIENT)))


async def test_a_token_signed_es256_with_a_published_key_is_accepted(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    signed_in(await sign_in(client, mint(provider, clock, alg="ES256")))


async def test_the_name_given_is_kept_on_the_identity(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = mint(provider, clock, {"name": None})
    session = signed_in(await sign_in(client, token, name="  Grace   Hopper "))
    me = (await gql(client, IDENTITIES, token=session))["data"]["me"]
    assert me["identities"][0]["name"] == "Grace Hopper"


# -- no token twice ------------------------------------------------------------------------


async def test_a_token_signs_in_once_from_any_address(
    app: Starlette, client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = mint(provider, clock)
    signed_in(await sign_in(client, token))

    assert await refused(client, token) == "INVALID_TOKEN"
    async with client_for(app, ip="198.51.100.23") as elsewhere:
        assert await refused(elsewhere, token) == "INVALID_TOKEN"


async def test_the_same_token_five_times_at_once_gives_one_session(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = mint(provider, clock)
    answers = await asyncio.gather(*(sign_in(client, token) for _ in range(5)))

    sessions = [a for a in answers if a["__typename"] == "AuthSession"]
    assert len(sessions) == 1, answers
    assert [str(a.get("code")) for a in answers if a not in sessions] == ["INVALID_TOKEN"] * 4
    listed = await gql(client, SESSIONS, token=sessions[0]["accessToken"])
    assert len(listed["data"]["sessions"]) == 1


# -- what the token says -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "client_id"),
    [
        ({}, "another-client"),
        ({"aud": [DEFAULT_CLIENT_ID, "another-client"], "azp": "another-client"}, None),
        # A token issued to another app as well (OpenID Connect Core 3.1.3.7).
        ({"aud": [DEFAULT_CLIENT_ID, "another-client"]}, None),
        ({"aud": None}, None),
        ({"iss": "https://elsewhere.example.com"}, None),
        ({"iss": "ISSUER/"}, None),
        ({"sub": None}, None),
        ({"sub": ""}, None),
        ({"sub": "x" * 256}, None),
        ({"exp": None}, None),
        ({"iat": None}, None),
    ],
    ids=[
        "aud-another-client",
        "aud-list-unknown-azp",
        "aud-list-untrusted-extra",
        "no-aud",
        "wrong-iss",
        "iss-trailing-slash",
        "no-sub",
        "empty-sub",
        "long-sub",
        "no-exp",
        "no-iat",
    ],
)
async def test_a_token_not_for_this_app_is_invalid(
    client: httpx.AsyncClient,
    provider: LocalProvider,
    clock: MutableClock,
    claims: dict[str, Any],
    client_id: str | None,
) -> None:
    if claims.get("iss") == "ISSUER/":
        claims = {**claims, "iss": provider.issuer + "/"}
    token = mint(provider, clock, claims, client_id=client_id or DEFAULT_CLIENT_ID)
    assert await refused(client, token) == "INVALID_TOKEN"


async def test_several_audiences_all_ours_with_our_azp_are_accepted(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    claims = {"aud": [DEFAULT_CLIENT_ID, NATIVE_CLIENT], "azp": NATIVE_CLIENT}
    signed_in(await sign_in(client, mint(provider, clock, claims)))


async def test_an_expired_token_is_invalid(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    # Issued 700 s ago for 600 s: expired 100 s ago, beyond the minute of skew.
    old = mint(provider, clock, now=clock.now() - timedelta(seconds=700))
    assert await refused(client, old) == "INVALID_TOKEN"


async def test_expiry_has_a_minute_of_skew_and_no_more(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    within, beyond = mint(provider, clock), mint(provider, clock)  # both exp = now + 600
    clock.advance(seconds=600 + 59)
    signed_in(await sign_in(client, within))
    clock.advance(seconds=2)
    assert await refused(client, beyond) == "INVALID_TOKEN"


async def test_a_token_issued_in_the_future_beyond_the_skew_is_invalid(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    ahead = mint(provider, clock, now=clock.now() + timedelta(seconds=120))
    assert await refused(client, ahead) == "INVALID_TOKEN"
    slightly = mint(provider, clock, now=clock.now() + timedelta(seconds=30))
    signed_in(await sign_in(client, slightly))


# -- the signature -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["foreign-key", "foreign-key-with-published-kid", "alg-none", "hs256-client-secret"]
)
async def test_a_token_not_signed_by_the_provider_is_invalid(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock, how: str
) -> None:
    ways: dict[str, dict[str, Any]] = {
        "foreign-key": {"key": provider.foreign_key()},
        "foreign-key-with-published-kid": {
            "key": provider.foreign_key(),
            "kid": provider.current_key.kid,
        },
        "alg-none": {"alg": "none"},
        # HS256 keyed with the client's secret, as OpenID Connect allows a confidential
        # client: a secret the app's users could learn is never a provider's signature.
        "hs256-client-secret": {"alg": "HS256"},
    }
    signing = ways[how]
    assert await refused(client, mint(provider, clock, **signing)) == "INVALID_TOKEN"


async def test_a_token_whose_signature_was_altered_is_invalid(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    genuine = mint(provider, clock, email=email)
    header, _payload, signature = genuine.split(".")
    other = mint(provider, clock, {"sub": "someone-else"}, email=email).split(".")[1]
    assert await refused(client, f"{header}.{other}.{signature}") == "INVALID_TOKEN"


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "é.é.é"])
async def test_something_that_is_no_jwt_is_invalid(
    client: httpx.AsyncClient, provider: LocalProvider, garbage: str
) -> None:
    assert await refused(client, garbage) == "INVALID_TOKEN"


# -- the nonce -----------------------------------------------------------------------------


@pytest.mark.parametrize("hashed", [False, True], ids=["raw", "sha256-hex"])
async def test_the_nonce_in_the_token_raw_or_hashed_matches_the_raw_one_given(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock, hashed: bool
) -> None:
    raw = secrets.token_urlsafe(24)
    carried = hashlib.sha256(raw.encode()).hexdigest() if hashed else raw
    token = mint(provider, clock, nonce=carried)
    signed_in(await sign_in(client, token, nonce=raw))


@pytest.mark.parametrize(
    ("carried", "given"),
    [
        ("nonce-in-token", "another-nonce"),
        ("nonce-in-token", None),
        (None, "nonce-given"),
        # The hash given as if it were the raw nonce, for a token that carries the raw one.
        ("nonce-in-token", hashlib.sha256(b"nonce-in-token").hexdigest()),
    ],
    ids=["mismatch", "none-given", "none-carried", "hash-given-for-raw"],
)
async def test_a_nonce_that_does_not_match_is_invalid(
    client: httpx.AsyncClient,
    provider: LocalProvider,
    clock: MutableClock,
    carried: str | None,
    given: str | None,
) -> None:
    token = mint(provider, clock, nonce=carried)
    more = {} if given is None else {"nonce": given}
    assert await refused(client, token, **more) == "INVALID_TOKEN"


# -- the provider's keys -------------------------------------------------------------------


async def test_the_key_set_is_fetched_once_for_many_sign_ins_and_again_after_an_hour(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    for _ in range(5):
        signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == 1
    assert provider.discovery_fetches == 1

    clock.advance(minutes=61)
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == 2
    assert provider.discovery_fetches == 1  # kept a day


async def test_a_rotated_key_is_followed(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    old_key = provider.current_key
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == 1

    new_key = provider.rotate_key()
    signed_in(await sign_in(client, mint(provider, clock, key=new_key)))
    assert provider.jwks_fetches == 2  # the new kid made the app fetch the set again
    # The old key is still published: its tokens still verify, with no fetch.
    signed_in(await sign_in(client, mint(provider, clock, key=old_key)))
    assert provider.jwks_fetches == 2


async def test_made_up_key_ids_fetch_the_key_set_at_most_once_a_minute(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == 1

    def made_up(kid: str) -> str:
        return mint(provider, clock, key=provider.foreign_key(kid=kid))

    assert await refused(client, made_up("made-up-1")) == "INVALID_TOKEN"
    assert provider.jwks_fetches == 2
    for n in range(2, 6):
        assert await refused(client, made_up(f"made-up-{n}")) == "INVALID_TOKEN"
    assert provider.jwks_fetches == 2

    clock.advance(seconds=61)
    assert await refused(client, made_up("made-up-6")) == "INVALID_TOKEN"
    assert provider.jwks_fetches == 3
    # Genuine tokens sign in all along.
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == 3


@pytest.mark.parametrize(
    ("endpoint", "mode"),
    [
        ("jwks", "error"),
        ("jwks", "slow"),
        ("jwks", "garbage"),
        ("jwks", "huge"),
        ("discovery", "error"),
        ("discovery", "garbage"),
    ],
)
async def test_a_provider_that_fails_at_first_use_is_a_provider_error_and_spends_nothing(
    client: httpx.AsyncClient,
    provider: LocalProvider,
    clock: MutableClock,
    endpoint: str,
    mode: str,
) -> None:
    token = mint(provider, clock)
    provider.fail(endpoint, mode, delay=5)  # "slow": beyond the app's 2 s

    assert await refused(client, token) == "PROVIDER_ERROR"

    provider.heal()
    signed_in(await sign_in(client, token))


async def test_a_key_set_that_is_no_key_set_is_a_provider_error(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = mint(provider, clock)
    original = provider.jwks
    provider.jwks = lambda: {"keys": [{"kty": "RSA", "n": "AQAB"}]}  # type: ignore[method-assign]
    try:
        assert await refused(client, token) == "PROVIDER_ERROR"
    finally:
        provider.jwks = original  # type: ignore[method-assign]
    signed_in(await sign_in(client, token))


# -- the input -----------------------------------------------------------------------------


async def test_an_unknown_provider_is_invalid_input(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    answer = await sign_in(client, mint(provider, clock), provider_id="nosuch")
    assert (answer["code"], answer["field"]) == ("INVALID_INPUT", "provider")
    assert provider.requests == []


async def test_a_token_of_20_kib_is_invalid_input_and_asks_the_provider_nothing(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    token = mint(provider, clock, {"padding": "x" * 20 * 1024})
    assert len(token) > 20 * 1024
    answer = await sign_in(client, token)
    assert (answer["code"], answer["field"]) == ("INVALID_INPUT", "idToken")
    assert provider.requests == []


# -- two-factor ------------------------------------------------------------------------------


async def test_an_account_with_two_factor_answers_a_totp_challenge(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    session = signed_in(await sign_in(client, mint(provider, clock, email=email)))
    # The session from the token is a recent sign-in: enough to turn two-factor on.
    setup = (await gql(client, SETUP, token=session))["data"]["setupTotp"]
    assert setup["__typename"] == "TotpSetup", setup
    confirmed = await gql(
        client, CONFIRM, {"i": {"code": code_at(setup["secret"], clock)}}, token=session
    )
    assert confirmed["data"]["confirmTotp"]["__typename"] == "RecoveryCodes", confirmed
    assert (await gql(client, ME, token=session))["data"]["me"]["otpEnabled"] is True
    clock.advance(seconds=90)

    answer = await sign_in(client, mint(provider, clock, email=email))

    assert answer["__typename"] == "OtpChallenge", answer
    assert (answer["method"], answer["purpose"]) == ("TOTP", "LOGIN")


async def test_the_keys_kept_serve_while_the_provider_is_down_and_are_asked_again_later(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    signed_in(await sign_in(client, mint(provider, clock)))
    clock.advance(minutes=61)  # the key set kept has aged out
    provider.fail("jwks", "error")

    signed_in(await sign_in(client, mint(provider, clock)))
    fetches = provider.jwks_fetches
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == fetches  # not asked again at once

    provider.heal()
    clock.advance(minutes=5)
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.jwks_fetches == fetches + 1


async def test_discovery_that_fails_later_is_asked_again_in_minutes_not_a_day(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    signed_in(await sign_in(client, mint(provider, clock)))
    clock.advance(hours=25)  # the document kept has aged out, and the keys with it
    provider.fail("discovery", "error")
    signed_in(await sign_in(client, mint(provider, clock)))
    fetches = provider.discovery_fetches

    provider.heal()
    clock.advance(minutes=6)
    signed_in(await sign_in(client, mint(provider, clock)))
    assert provider.discovery_fetches > fetches


async def test_an_address_too_long_to_be_one_is_none(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    # Cut to 254 characters it would be another address, a valid one (...sub.exam).
    long = "ada@" + ".".join(["sub"] * 62) + ".example.com"
    assert len(long) > 254
    answer = await sign_in(client, mint(provider, clock, {"email": long}))
    assert answer["code"] == "PROVIDER_ERROR"  # no address shared: see the linking rules
