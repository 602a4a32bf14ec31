"""me and the bearer token: claims, and every way a forged or stale token is refused."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from jose import jwt
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import OctKey

from tests.conftest import PASSWORD, TEST_SECRET, MutableClock, unique_email
from tests.gql import ME, gql, signup


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_claims(token)  # type: ignore[no-any-return]


async def assert_unauthenticated(client: httpx.AsyncClient, token: str) -> None:
    body = await gql(client, ME, token=token)
    assert body["data"] == {"me": None}, body
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAUTHENTICATED"]


async def test_no_token_means_no_user(client: httpx.AsyncClient) -> None:
    assert await gql(client, ME) == {"data": {"me": None}}


async def test_access_token_claims_and_header(client: httpx.AsyncClient) -> None:
    session = await signup(client, unique_email(), PASSWORD)
    token = session["accessToken"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "at+jwt"}
    claims = claims_of(token)
    assert set(claims) == {
        "sub",
        "sid",
        "jti",
        "iat",
        "exp",
        "iss",
        "aud",
        "amr",
        "auth_time",
        "roles",
    }
    assert claims["roles"] == []
    assert claims["sub"] == session["user"]["id"]
    uuid.UUID(claims["sid"])
    assert claims["iss"] == "strawgate" and claims["aud"] == "strawgate"
    assert claims["amr"] == ["pwd"]
    assert claims["exp"] - claims["iat"] == 15 * 60
    # When the user proved a credential on this session (RFC 9068): at sign-in.
    assert claims["auth_time"] == claims["iat"]


async def test_another_service_holding_the_secret_can_verify(client: httpx.AsyncClient) -> None:
    """HS256 keyed with the UTF-8 bytes of SECRET_KEY, checked here with another library."""
    session = await signup(client, unique_email(), PASSWORD)
    key = OctKey.import_key(TEST_SECRET.encode("utf-8"))
    token = joserfc_jwt.decode(session["accessToken"], key, algorithms=["HS256"])
    assert token.claims["sub"] == session["user"]["id"]


def forge(
    claims: dict[str, Any],
    *,
    key: str = TEST_SECRET,
    alg: str = "HS256",
    typ: str | None = "at+jwt",
) -> str:
    headers = {"typ": typ} if typ is not None else {}
    return str(jwt.encode(claims, key, algorithm=alg, headers=headers))


@pytest.fixture
async def good_claims(client: httpx.AsyncClient) -> dict[str, Any]:
    session = await signup(client, unique_email(), PASSWORD)
    return claims_of(session["accessToken"])


async def test_a_reforged_copy_of_good_claims_is_accepted(
    client: httpx.AsyncClient, good_claims: dict[str, Any]
) -> None:
    """The control for the cases below: forge() itself makes tokens the server accepts."""
    body = await gql(client, ME, token=forge(good_claims))
    assert body["data"]["me"]["id"] == good_claims["sub"]


@pytest.mark.parametrize(
    "case",
    [
        "wrong_key",
        "alg_none",
        "other_hmac_alg",
        "wrong_typ",
        "no_typ",
        "tampered_payload",
        "wrong_audience",
        "no_audience",
        "wrong_issuer",
        "no_exp",
        "expired",
        "future_iat",
        "unknown_session",
        "other_users_session",
        "not_a_uuid",
        "garbage",
    ],
)
async def test_forged_and_invalid_tokens_are_refused(
    client: httpx.AsyncClient, good_claims: dict[str, Any], case: str
) -> None:
    claims = dict(good_claims)
    now = int(time.time())
    token: str
    if case == "wrong_key":
        token = forge(claims, key="another-secret-key-that-is-long-enough-000")
    elif case == "alg_none":
        token = f"{b64({'alg': 'none', 'typ': 'at+jwt'})}.{b64(claims)}."
    elif case == "other_hmac_alg":
        token = forge(claims, alg="HS512")
    elif case == "wrong_typ":
        token = forge(claims, typ="JWT")
    elif case == "no_typ":
        token = forge(claims, typ=None)
    elif case == "tampered_payload":
        header, _, signature = forge(claims).split(".")
        other = {**claims, "sub": str(uuid.uuid4())}
        token = f"{header}.{b64(other)}.{signature}"
    elif case == "wrong_audience":
        token = forge({**claims, "aud": "someone-else"})
    elif case == "no_audience":
        token = forge({k: v for k, v in claims.items() if k != "aud"})
    elif case == "wrong_issuer":
        token = forge({**claims, "iss": "evil"})
    elif case == "no_exp":
        token = forge({k: v for k, v in claims.items() if k != "exp"})
    elif case == "expired":
        token = forge({**claims, "iat": now - 3600, "exp": now - 60})
    elif case == "future_iat":
        token = forge({**claims, "iat": now + 3600, "exp": now + 7200})
    elif case == "unknown_session":
        token = forge({**claims, "sid": str(uuid.uuid4())})
    elif case == "other_users_session":
        token = forge({**claims, "sub": str(uuid.uuid4())})
    elif case == "not_a_uuid":
        token = forge({**claims, "sid": "1 OR 1=1"})
    else:
        token = "not.a.jwt"
    await assert_unauthenticated(client, token)


async def test_expiry_follows_the_injected_clock(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    session = await signup(client, unique_email(), PASSWORD)
    clock.advance(minutes=14)
    assert (await gql(client, ME, token=session["accessToken"]))["data"]["me"] is not None
    clock.advance(minutes=2)
    await assert_unauthenticated(client, session["accessToken"])


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc"])
async def test_malformed_authorization_headers(client: httpx.AsyncClient, header: str) -> None:
    body = await gql(client, ME, headers={"authorization": header})
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_disabled_account_loses_access_at_once(
    client: httpx.AsyncClient, database_url: str
) -> None:
    from tests.graph.test_login import set_user

    email = unique_email()
    session = await signup(client, email, PASSWORD)
    await set_user(database_url, email, is_active=False)
    await assert_unauthenticated(client, session["accessToken"])


async def test_verify_otp_has_no_challenges_yet(client: httpx.AsyncClient) -> None:
    from tests.gql import VERIFY_OTP

    body = await gql(client, VERIFY_OTP, {"i": {"challengeToken": "anything", "code": "123456"}})
    assert body["data"]["verifyOtp"]["code"] == "INVALID_TOKEN"
    body = await gql(client, VERIFY_OTP, {"i": {"challengeToken": "a\x00", "code": "123456"}})
    assert body["data"]["verifyOtp"]["code"] == "INVALID_INPUT"
    assert body["data"]["verifyOtp"]["field"] == "challengeToken"
