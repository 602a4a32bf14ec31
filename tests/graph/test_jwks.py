"""Asymmetric access tokens (ES256, RS256): signed by the first key of JWT_KEYS, every
token naming its key, the public parts at /.well-known/jwks.json, so that a resource
server verifies with nothing but that URL (here with joserfc, not the library that
signs), and keys rotated without signing anybody out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt as jose_jwt
from joserfc import jwt as rfc_jwt
from joserfc.jwk import KeySet
from starlette.applications import Starlette

from db.security.jwks import generate
from db.settings import ConfigError, Settings
from graph.app import create_app
from tests.cli import run_strawgate
from tests.conftest import PASSWORD, PRODUCTION_MAIL, MutableClock, client_for, unique_email
from tests.gql import ME, gql, signup


def key_set(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


@asynccontextmanager
async def serving(settings: Settings, clock: MutableClock) -> AsyncIterator[httpx.AsyncClient]:
    app: Starlette = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http


async def resource_server_verifies(http: httpx.AsyncClient, token: str, algorithm: str) -> Any:
    """What a resource server does: fetch the JWKS, verify with another JOSE library."""
    published = (await http.get("/.well-known/jwks.json")).json()
    keys = KeySet.import_key_set(published)
    return rfc_jwt.decode(token, keys, algorithms=[algorithm])


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_tokens_verify_with_nothing_but_the_jwks(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, algorithm: str
) -> None:
    private = generate(algorithm)
    settings = make_settings(algorithm=algorithm, jwt_keys=key_set(private))
    async with serving(settings, clock) as http:
        session = await signup(http, unique_email(), PASSWORD)
        token = session["accessToken"]
        header = jose_jwt.get_unverified_header(token)
        assert (header["alg"], header["kid"], header["typ"]) == (
            algorithm,
            private["kid"],
            "at+jwt",
        )
        answer = await http.get("/.well-known/jwks.json")
        # Resource servers and proxies may cache the keys for a while (key rotation waits
        # that long between its steps); nothing else this server says is cacheable.
        assert answer.headers["cache-control"] == "public, max-age=300"
        assert answer.headers["x-content-type-options"] == "nosniff"
        published = answer.json()
        assert [key["kid"] for key in published["keys"]] == [private["kid"]]
        for key in published["keys"]:  # public parts only
            assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
        verified = await resource_server_verifies(http, token, algorithm)
        assert verified.claims["sub"] == session["user"]["id"]
        assert verified.claims["aud"] == "strawgate" and verified.claims["iss"] == "strawgate"
        assert (await gql(http, ME, token=token))["data"]["me"]["id"] == session["user"]["id"]


async def test_keys_rotate_without_signing_anybody_out(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    old, new = generate("ES256"), generate("ES256")
    email = unique_email()
    # 1. The old key signs.
    async with serving(make_settings(algorithm="ES256", jwt_keys=key_set(old)), clock) as http:
        first = await signup(http, email, PASSWORD)
    # 2. The new key is published second: old tokens verify, the old key still signs.
    settings = make_settings(algorithm="ES256", jwt_keys=key_set(old, new))
    async with serving(settings, clock) as http:
        assert (await gql(http, ME, token=first["accessToken"]))["data"]["me"]
        kids = [key["kid"] for key in (await http.get("/.well-known/jwks.json")).json()["keys"]]
        assert kids == [old["kid"], new["kid"]]
    # 3. The new key moves first: it signs; tokens of the old one still verify.
    settings = make_settings(algorithm="ES256", jwt_keys=key_set(new, old))
    async with serving(settings, clock) as http:
        assert (await gql(http, ME, token=first["accessToken"]))["data"]["me"]
        refreshed = await gql(
            http,
            "mutation($i: RefreshInput!) { refresh(input: $i) {"
            " ... on AuthSession { accessToken refreshToken } } }",
            {"i": {"refreshToken": first["refreshToken"]}},
        )
        second = refreshed["data"]["refresh"]
        assert jose_jwt.get_unverified_header(second["accessToken"])["kid"] == new["kid"]
    # 4. Once the longest token lifetime has passed, the old key goes.
    clock.advance(minutes=16)
    async with serving(make_settings(algorithm="ES256", jwt_keys=key_set(new)), clock) as http:
        body = await gql(http, ME, token=first["accessToken"])
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_token_naming_an_unknown_key_or_signed_otherwise_is_refused(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    ours, stranger = generate("ES256"), generate("ES256")
    async with serving(make_settings(algorithm="ES256", jwt_keys=key_set(ours)), clock) as http:
        session = await signup(http, unique_email(), PASSWORD)
        claims = jose_jwt.get_unverified_claims(session["accessToken"])
        for key, kid in ((stranger, stranger["kid"]), (stranger, ours["kid"])):
            forged = jose_jwt.encode(
                claims, key, algorithm="ES256", headers={"typ": "at+jwt", "kid": kid}
            )
            body = await gql(http, ME, token=forged)
            assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        # An HS256 token made with the public key as a secret (algorithm confusion).
        confused = jose_jwt.encode(
            claims,
            json.dumps(ours),
            algorithm="HS256",
            headers={"typ": "at+jwt", "kid": ours["kid"]},
        )
        body = await gql(http, ME, token=confused)
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_an_asymmetric_algorithm_without_a_usable_key_never_starts(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    private = generate("ES256")
    public = {name: private[name] for name in ("kty", "crv", "x", "y", "kid")}
    cases = [
        (None, "needs JWT_KEYS"),
        ("not json", "neither"),
        (key_set(public), "private"),
        (key_set(generate("RS256")), "not a EC key"),
        ("/nonexistent/keys.json", "neither"),
    ]
    for jwt_keys, why in cases:
        settings = make_settings(
            environment="production", algorithm="ES256", jwt_keys=jwt_keys, **PRODUCTION_MAIL
        )
        with pytest.raises(ConfigError, match=why):
            create_app(settings)
    # A key set in a file works.
    path = tmp_path / "jwks.json"
    path.write_text(key_set(private))
    create_app(make_settings(algorithm="ES256", jwt_keys=str(path)))


async def test_symmetric_tokens_publish_no_keys(client: httpx.AsyncClient) -> None:
    answer = await client.get("/.well-known/jwks.json")
    assert answer.status_code == 404
    assert answer.headers["cache-control"] == "no-store"  # a 404 is not kept


def test_the_cli_generates_a_private_key_to_add(tmp_path: Path) -> None:
    # In this process (tests/cli.py); test_config_errors runs `strawgate keys generate`
    # as the installed console script.
    code, out, err = run_strawgate("keys", "generate", "--alg", "RS256", cwd=tmp_path)
    assert code == 0, err
    key = json.loads(out)
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["kid"] and "d" in key
