"""The identity providers the sign-in tests run against (tests/identity_provider.py),
tested through HTTP as a client sees them: they must refuse what Google, Apple or GitHub
refuse, or the tests of the app built on them would prove nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from tests.identity_provider import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    GITHUB_CLIENT_ID,
    GITHUB_CLIENT_SECRET,
    HUGE_BODY,
    LocalGitHub,
    LocalProvider,
    parse_form_post,
    pkce_pair,
)

CALLBACK = "http://127.0.0.1:9/auth/callback"
ADA = {"sub": "ada-1815", "email": "ada@example.com", "email_verified": True, "name": "Ada"}
OCTOCAT = {
    "id": 583231,
    "login": "octocat",
    "name": "The Octocat",
    "email": None,
    "emails": [
        {"email": "octocat@example.com", "primary": True, "verified": True, "visibility": None},
        {"email": "old@example.com", "primary": False, "verified": False, "visibility": None},
    ],
}


@pytest.fixture(scope="module")
def provider_server() -> Iterator[LocalProvider]:
    with LocalProvider() as running:
        yield running


@pytest.fixture
def provider(provider_server: LocalProvider) -> LocalProvider:
    """The module's provider, reset: a start and stop cost about 0.2 s each."""
    provider_server.reset()
    return provider_server


@pytest.fixture(scope="module")
def github_server() -> Iterator[LocalGitHub]:
    with LocalGitHub() as running:
        yield running


@pytest.fixture
def github(github_server: LocalGitHub) -> LocalGitHub:
    github_server.reset()
    return github_server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, follow_redirects=False) as client:
        yield client


def basic(client_id: str, secret: str) -> str:
    """client_secret_basic as RFC 6749 2.3.1 has it: each part form-urlencoded first."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def authorize_query(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "client_id": DEFAULT_CLIENT_ID,
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": "openid email profile",
        "state": "state-1",
        "nonce": "nonce-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


def redirect_params(response: httpx.Response) -> dict[str, str]:
    """The query of a 302 to the callback."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?"), location
    return dict(parse_qsl(urlsplit(location).query))


def get_code(
    http: httpx.Client, provider: LocalProvider, user: dict[str, Any] | None = None
) -> tuple[str, str]:
    """(code, verifier) of a sign-in of `user` (ADA by default)."""
    verifier, challenge = pkce_pair()
    provider.next_user = user or ADA
    response = http.get(provider.base_url + "/authorize", params=authorize_query(challenge))
    return redirect_params(response)["code"], verifier


def redeem(
    http: httpx.Client, provider: LocalProvider, code: str, verifier: str, **form: str
) -> httpx.Response:
    return http.post(
        provider.base_url + "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "code_verifier": verifier,
            **form,
        },
        headers={"authorization": basic(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)},
    )


def verified(
    http: httpx.Client, provider: LocalProvider, token: str, **expect: Any
) -> dict[str, Any]:
    """The claims of `token` checked as a relying party does: signature against the
    published JWKS, iss, aud and `expect`."""
    keys = KeySet.import_key_set(http.get(provider.base_url + "/jwks").json())
    decoded = jwt.decode(token, keys, algorithms=["RS256", "ES256"])
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": provider.issuer},
        "aud": {"essential": True, "value": DEFAULT_CLIENT_ID},
    }
    options.update({name: {"essential": True, "value": value} for name, value in expect.items()})
    JWTClaimsRegistry(**options).validate(decoded.claims)
    return dict(decoded.claims)


def test_discovery_and_jwks(provider: LocalProvider, http: httpx.Client) -> None:
    meta = http.get(provider.discovery_url).json()
    base = provider.base_url
    assert provider.issuer == base == f"http://127.0.0.1:{provider.port}"
    assert meta["issuer"] == base
    assert meta["authorization_endpoint"] == base + "/authorize"
    assert meta["token_endpoint"] == base + "/token"
    assert meta["userinfo_endpoint"] == base + "/userinfo"
    assert meta["jwks_uri"] == base + "/jwks"
    assert meta["response_types_supported"] == ["code"]
    assert meta["response_modes_supported"] == ["query", "form_post"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256", "ES256"]
    assert meta["subject_types_supported"] == ["public"]
    assert meta["scopes_supported"] == ["openid", "email", "profile"]

    keys = http.get(meta["jwks_uri"]).json()["keys"]
    assert [key["kid"] for key in keys] == [provider.current_key.kid]
    assert keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256" and "d" not in keys[0]
    assert (provider.discovery_fetches, provider.jwks_fetches) == (1, 1)


def test_code_flow_with_pkce(provider: LocalProvider, http: httpx.Client) -> None:
    verifier, challenge = pkce_pair()
    provider.next_user = ADA
    response = http.get(provider.base_url + "/authorize", params=authorize_query(challenge))
    params = redirect_params(response)
    assert params["state"] == "state-1"
    assert provider.next_user is None, "a signed-in user is consumed"

    answer = redeem(http, provider, params["code"], verifier)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "openid email profile"
    assert answer.headers["cache-control"] == "no-store"
    claims = verified(http, provider, body["id_token"], nonce="nonce-1", sub="ada-1815")
    assert claims["email"] == "ada@example.com" and claims["email_verified"] is True
    assert claims["name"] == "Ada"
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 5
    assert jwt.decode(body["id_token"], provider.current_key).header["kid"] == (
        provider.current_key.kid
    )

    userinfo = http.get(
        provider.base_url + "/userinfo", headers={"authorization": "Bearer " + body["access_token"]}
    )
    assert userinfo.json() == ADA
    assert http.get(provider.base_url + "/userinfo").status_code == 401

    [sent] = provider.requests_to("/authorize")
    assert sent.query["code_challenge"] == challenge and sent.query["nonce"] == "nonce-1"
    [token_request] = provider.requests_to("/token")
    method, path, _, form = token_request
    assert (method, path) == ("POST", "/token")
    assert "client_secret" not in form and token_request.headers["authorization"].startswith(
        "Basic "
    )


def test_client_authentication(provider: LocalProvider, http: httpx.Client) -> None:
    """client_secret_post works as Basic does; a wrong secret, an unknown client or both
    ways at once are refused."""
    code, verifier = get_code(http, provider)
    answer = http.post(
        provider.base_url + "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "code_verifier": verifier,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        },
    )
    assert answer.status_code == 200, answer.text

    provider.add_client("odd:client", "s3cret/+&")
    assert provider.clients["odd:client"] == "s3cret/+&"
    for header in (basic(DEFAULT_CLIENT_ID, "wrong"), basic("nobody", DEFAULT_CLIENT_SECRET)):
        code, verifier = get_code(http, provider)
        refused = http.post(
            provider.base_url + "/token",
            data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
            headers={"authorization": header},
        )
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    code, verifier = get_code(http, provider)
    both = redeem(http, provider, code, verifier, client_secret=DEFAULT_CLIENT_SECRET)
    assert both.status_code == 400 and both.json()["error"] == "invalid_request"


def test_form_urlencoded_basic_credentials() -> None:
    """A client ID and secret with ':' and '+' in them go form-urlencoded in Basic."""
    with (
        LocalProvider(clients={"odd:client": "s3cret/+&"}) as provider,
        httpx.Client(timeout=5.0) as http,
    ):
        verifier, challenge = pkce_pair()
        provider.next_user = ADA
        query = authorize_query(challenge, client_id="odd:client")
        code = redirect_params(http.get(provider.base_url + "/authorize", params=query))["code"]
        answer = http.post(
            provider.base_url + "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            },
            headers={"authorization": basic("odd:client", "s3cret/+&")},
        )
        assert answer.status_code == 200, answer.text
        assert jwt.decode(answer.json()["id_token"], provider.current_key).claims["aud"] == (
            "odd:client"
        )


def test_wrong_verifier_reused_code_and_other_redirect_uri(
    provider: LocalProvider, http: httpx.Client
) -> None:
    code, verifier = get_code(http, provider)
    other_verifier, _ = pkce_pair()
    wrong = redeem(http, provider, code, other_verifier)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    again = redeem(http, provider, code, verifier)
    assert again.status_code == 400, "a code is spent by a wrong attempt too"

    code, verifier = get_code(http, provider)
    assert redeem(http, provider, code, verifier).status_code == 200
    reused = redeem(http, provider, code, verifier)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"

    code, verifier = get_code(http, provider)
    moved = redeem(http, provider, code, verifier, redirect_uri=CALLBACK + "/other")
    assert moved.status_code == 400 and moved.json()["error"] == "invalid_grant"

    code, _ = get_code(http, provider)
    missing = redeem(http, provider, code, "")
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_grant"

    provider.code_lifetime = 0.0
    code, verifier = get_code(http, provider)
    expired = redeem(http, provider, code, verifier)
    assert expired.status_code == 400 and "expired" in expired.json()["error_description"]


@pytest.mark.parametrize(
    "change",
    [
        {"code_challenge": ""},
        {"code_challenge_method": "plain"},
        {"response_type": "token"},
        {"scope": "email"},
        {"state": ""},
        {"response_mode": "fragment"},
    ],
)
def test_authorize_refuses_a_bad_request(
    provider: LocalProvider, http: httpx.Client, change: dict[str, str]
) -> None:
    _, challenge = pkce_pair()
    provider.next_user = ADA
    response = http.get(
        provider.base_url + "/authorize", params=authorize_query(challenge, **change)
    )
    params = redirect_params(response)
    assert params["error"] == "invalid_request"
    assert params.get("state") == (change.get("state", "state-1") or None)
    assert provider.next_user == ADA, "nobody signed in"


def test_authorize_never_redirects_for_an_unknown_client(
    provider: LocalProvider, http: httpx.Client
) -> None:
    _, challenge = pkce_pair()
    for change in ({"client_id": "nobody"}, {"redirect_uri": "javascript:alert(1)"}):
        response = http.get(
            provider.base_url + "/authorize", params=authorize_query(challenge, **change)
        )
        assert response.status_code == 400 and "location" not in response.headers


def test_form_post_carries_code_state_and_user(provider: LocalProvider, http: httpx.Client) -> None:
    verifier, challenge = pkce_pair()
    provider.next_user = ADA
    provider.form_post_user = {
        "name": {"firstName": "Ada", "lastName": "Lovelace"},
        "email": "ada@example.com",
    }
    response = http.get(
        provider.base_url + "/authorize",
        params=authorize_query(challenge, response_mode="form_post"),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "document.forms[0].submit()" in response.text
    action, fields = parse_form_post(response.text)
    assert action == CALLBACK
    assert set(fields) == {"code", "state", "user"} and fields["state"] == "state-1"
    assert json.loads(fields["user"])["name"] == {"firstName": "Ada", "lastName": "Lovelace"}
    assert redeem(http, provider, fields["code"], verifier).status_code == 200

    provider.form_post_user = None
    provider.deny_next = True
    denied = http.get(
        provider.base_url + "/authorize",
        params=authorize_query(challenge, response_mode="form_post"),
    )
    action, fields = parse_form_post(denied.text)
    assert action == CALLBACK and fields["error"] == "access_denied"
    assert fields["state"] == "state-1" and fields["error_description"]


def test_deny_next(provider: LocalProvider, http: httpx.Client) -> None:
    _, challenge = pkce_pair()
    provider.next_user = ADA
    provider.deny_next = True
    params = redirect_params(
        http.get(provider.base_url + "/authorize", params=authorize_query(challenge))
    )
    assert params["error"] == "access_denied" and params["state"] == "state-1"
    assert params["error_description"] and "code" not in params
    assert provider.deny_next is False, "only the next sign-in is refused"
    again = redirect_params(
        http.get(provider.base_url + "/authorize", params=authorize_query(challenge))
    )
    assert "code" in again


def test_sticky_user_signs_in_again(provider: LocalProvider, http: httpx.Client) -> None:
    provider.sticky_user = True
    get_code(http, provider)
    assert provider.next_user == ADA


def test_consent_page(provider: LocalProvider, http: httpx.Client) -> None:
    """Without next_user, a page a person (here, httpx) fills in: its claims sign in;
    Cancel answers access_denied."""
    verifier, challenge = pkce_pair()
    query = authorize_query(challenge)
    page = http.get(provider.base_url + "/authorize", params=query)
    assert page.status_code == 200
    for text in ('name="sub"', ">Subject<", 'name="email"', ">Email<", 'name="name"'):
        assert text in page.text
    assert 'name="email_verified"' in page.text and "checked" in page.text
    assert ">Continue<" in page.text and ">Cancel<" in page.text
    action, fields = parse_form_post(page.text)
    assert action == "/authorize" and fields["email_verified"] == "true"

    form = {**fields, "sub": "grace", "email": "grace@example.com", "action": "continue"}
    params = redirect_params(http.post(provider.base_url + action, data=form))
    assert params["state"] == "state-1"
    body = redeem(http, provider, params["code"], verifier).json()
    claims = verified(http, provider, body["id_token"], nonce="nonce-1", sub="grace")
    assert claims["email"] == "grace@example.com" and claims["email_verified"] is True
    assert "name" not in claims

    unverified = {key: value for key, value in form.items() if key != "email_verified"}
    params = redirect_params(http.post(provider.base_url + action, data=unverified))
    assert "code" in params
    cancel = redirect_params(
        http.post(provider.base_url + action, data={**form, "action": "cancel"})
    )
    assert cancel["error"] == "access_denied" and cancel["state"] == "state-1"


def test_id_token_overrides(provider: LocalProvider, http: httpx.Client) -> None:
    provider.id_token_overrides = {"aud": "someone-else", "nonce": None, "iss": "http://evil"}
    code, verifier = get_code(http, provider)
    token = redeem(http, provider, code, verifier).json()["id_token"]
    claims = jwt.decode(token, provider.current_key).claims
    assert claims["aud"] == "someone-else" and claims["iss"] == "http://evil"
    assert "nonce" not in claims
    provider.id_token_overrides = {}
    code, verifier = get_code(http, provider)
    verified(http, provider, redeem(http, provider, code, verifier).json()["id_token"])


@pytest.mark.parametrize("endpoint", ["discovery", "jwks", "authorize", "token", "userinfo"])
def test_failure_modes(provider: LocalProvider, http: httpx.Client, endpoint: str) -> None:
    paths = {
        "discovery": ("GET", "/.well-known/openid-configuration"),
        "jwks": ("GET", "/jwks"),
        "authorize": ("GET", "/authorize"),
        "token": ("POST", "/token"),
        "userinfo": ("GET", "/userinfo"),
    }
    method, path = paths[endpoint]
    url = provider.base_url + path

    provider.fail(endpoint, "garbage")
    garbage = http.request(method, url)
    assert garbage.status_code == 200 and garbage.headers["content-type"] == "application/json"
    assert garbage.content == b"not json{"
    provider.fail(endpoint, "error")
    assert http.request(method, url).status_code == 500
    provider.fail(endpoint, "huge")
    huge = http.request(method, url)
    assert huge.status_code == 200 and len(huge.content) == len(HUGE_BODY) > 5_000_000
    assert huge.json()["padding"].startswith("x")
    provider.heal()
    assert http.request(method, url).status_code in {400, 401, 200}


async def test_slow_endpoint_times_out_and_answers_later(provider: LocalProvider) -> None:
    provider.fail("jwks", "slow", delay=1.5)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=provider.base_url) as http:

        async def impatient() -> None:
            with pytest.raises(httpx.ReadTimeout):
                await http.get("/jwks", timeout=0.5)
            # The server answers other requests meanwhile.
            assert (await http.get(provider.discovery_url, timeout=0.5)).status_code == 200

        late, _ = await asyncio.gather(http.get("/jwks", timeout=3.0), impatient())
    assert late.status_code == 200 and late.json()["keys"]
    assert 1.5 <= time.monotonic() - started < 2.5
    assert provider.jwks_fetches == 2


def test_stop_does_not_wait_for_a_slow_request() -> None:
    provider = LocalProvider().start()
    provider.fail("token", "slow")  # 10 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(provider.base_url + "/token", timeout=0.3)
    started = time.monotonic()
    provider.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(provider.discovery_url, timeout=0.5)


def test_mint_id_token_with_injected_time(provider: LocalProvider, http: httpx.Client) -> None:
    then = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    token = provider.mint_id_token({"sub": "ada", "email": "a@example.com"}, now=then, nonce="n")
    decoded = jwt.decode(token, provider.public_keys())
    claims = decoded.claims
    assert claims["iat"] == int(then.timestamp()) and claims["exp"] == claims["iat"] + 600
    assert claims["iss"] == provider.issuer and claims["aud"] == DEFAULT_CLIENT_ID
    assert claims["nonce"] == "n" and claims["sub"] == "ada"
    assert decoded.header == {"alg": "RS256", "kid": provider.current_key.kid, "typ": "JWT"}
    JWTClaimsRegistry(now=claims["iat"] + 599).validate(claims)
    with pytest.raises(JoseError):
        JWTClaimsRegistry(now=claims["iat"] + 601).validate(claims)

    epoch = provider.mint_id_token({"sub": "x"}, now=1_000_000, lifetime=5, client_id="app")
    assert jwt.decode(epoch, provider.current_key).claims == {
        "iss": provider.issuer,
        "aud": "app",
        "sub": "x",
        "iat": 1_000_000,
        "auth_time": 1_000_000,
        "exp": 1_000_005,
    }
    overridden = provider.mint_id_token({"sub": "x", "iss": "http://other", "aud": ["a", "b"]})
    assert jwt.decode(overridden, provider.current_key).claims["aud"] == ["a", "b"]

    foreign = provider.foreign_key()
    forged = provider.mint_id_token({"sub": "x"}, key=foreign)
    assert jwt.decode(forged, foreign).header["kid"] == foreign.kid
    with pytest.raises(JoseError):
        verified(http, provider, forged)
    same_kid = provider.mint_id_token(
        {"sub": "x"}, key=provider.foreign_key(), kid=provider.current_key.kid
    )
    with pytest.raises(BadSignatureError):
        verified(http, provider, same_kid)

    unsigned = provider.mint_id_token({"sub": "x"}, alg="none")
    assert unsigned.endswith(".") and json.loads(
        base64.urlsafe_b64decode(unsigned.split(".")[0] + "==")
    ) == {"alg": "none", "typ": "JWT"}
    # Signed with the client secret, as OpenID Connect allows: an RS256-only client refuses.
    hmac_signed = provider.mint_id_token({"sub": "x"}, alg="HS256")
    assert json.loads(base64.urlsafe_b64decode(hmac_signed.split(".")[0] + "=="))["alg"] == "HS256"
    with pytest.raises(JoseError):
        verified(http, provider, hmac_signed)


def test_key_rotation(provider: LocalProvider, http: httpx.Client) -> None:
    old = provider.current_key
    old_token = provider.mint_id_token({"sub": "ada"})
    new = provider.rotate_key()
    assert new.kid != old.kid and provider.current_key is new
    kids = [key["kid"] for key in http.get(provider.base_url + "/jwks").json()["keys"]]
    assert kids == [old.kid, new.kid]
    verified(http, provider, old_token)

    code, verifier = get_code(http, provider)
    token = redeem(http, provider, code, verifier).json()["id_token"]
    assert jwt.decode(token, new).header["kid"] == new.kid

    provider.retire_old_keys()
    kids = [key["kid"] for key in http.get(provider.base_url + "/jwks").json()["keys"]]
    assert kids == [new.kid]
    with pytest.raises(JoseError):
        verified(http, provider, old_token)
    verified(http, provider, token)


def test_es256_id_tokens(provider: LocalProvider, http: httpx.Client) -> None:
    provider.id_token_alg = "ES256"
    code, verifier = get_code(http, provider)
    token = redeem(http, provider, code, verifier).json()["id_token"]
    claims = verified(http, provider, token, nonce="nonce-1")
    assert claims["sub"] == ADA["sub"]
    assert jwt.decode(token, provider.ec_key()).header["alg"] == "ES256"
    kinds = {key["kty"] for key in provider.jwks()["keys"]}
    assert kinds == {"RSA", "EC"}


def test_two_providers_run_side_by_side() -> None:
    with LocalProvider() as first, LocalProvider() as second:
        assert first.port != second.port
        assert first.current_key.kid != second.current_key.kid
        assert httpx.get(second.discovery_url).json()["issuer"] == second.issuer
        assert first.requests == [] and len(second.requests) == 1


# -- GitHub -----------------------------------------------------------------------------


def github_code(
    http: httpx.Client, github: LocalGitHub, scope: str = "read:user user:email"
) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    github.next_user = OCTOCAT
    response = http.get(
        github.authorize_url,
        params={
            "client_id": GITHUB_CLIENT_ID,
            "redirect_uri": CALLBACK,
            "state": "gh-state",
            "scope": scope,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    params = redirect_params(response)
    assert params["state"] == "gh-state"
    return params["code"], verifier


def github_token(
    http: httpx.Client, github: LocalGitHub, code: str, verifier: str, **headers: str
) -> httpx.Response:
    return http.post(
        github.token_url,
        data={
            "client_id": GITHUB_CLIENT_ID,
            "client_secret": headers.pop("secret", GITHUB_CLIENT_SECRET),
            "code": code,
            "redirect_uri": CALLBACK,
            "code_verifier": verifier,
        },
        headers=headers,
    )


def test_github_flow(github: LocalGitHub, http: httpx.Client) -> None:
    code, verifier = github_code(http, github)
    answer = github_token(http, github, code, verifier, accept="application/json")
    assert answer.status_code == 200
    body = answer.json()
    assert body["token_type"] == "bearer" and body["scope"] == "read:user,user:email"
    token = body["access_token"]

    for scheme in ("Bearer", "token"):
        user = http.get(github.api_url + "/user", headers={"authorization": f"{scheme} {token}"})
        assert user.status_code == 200
        assert {key: user.json()[key] for key in ("id", "login", "name", "email")} == {
            "id": 583231,
            "login": "octocat",
            "name": "The Octocat",
            "email": None,
        }
    emails = http.get(github.api_url + "/user/emails", headers={"authorization": "token " + token})
    assert emails.json() == OCTOCAT["emails"]

    for path in ("/user", "/user/emails"):
        refused = http.get(github.api_url + path, headers={"authorization": "token nope"})
        assert refused.status_code == 401 and refused.json()["message"] == "Bad credentials"
        assert http.get(github.api_url + path).status_code == 401


def test_github_form_encoded_answer_and_errors(github: LocalGitHub, http: httpx.Client) -> None:
    code, verifier = github_code(http, github, scope="read:user")
    answer = github_token(http, github, code, verifier)
    assert answer.headers["content-type"].startswith("application/x-www-form-urlencoded")
    fields = parse_qs(answer.text)
    assert fields["token_type"] == ["bearer"] and fields["scope"] == ["read:user"]
    token = fields["access_token"][0]
    # Without user:email GitHub does not show the addresses.
    hidden = http.get(github.api_url + "/user/emails", headers={"authorization": "token " + token})
    assert hidden.status_code == 404

    reused = github_token(http, github, code, verifier, accept="application/json")
    assert reused.status_code == 200 and reused.json()["error"] == "bad_verification_code"
    as_form = github_token(http, github, code, verifier)
    assert parse_qs(as_form.text)["error"] == ["bad_verification_code"]

    code, _ = github_code(http, github)
    other, _ = pkce_pair()
    wrong = github_token(http, github, code, other, accept="application/json")
    assert wrong.status_code == 200 and wrong.json()["error"] == "bad_verification_code"

    code, verifier = github_code(http, github)
    secret = github_token(http, github, code, verifier, accept="application/json", secret="x")
    assert secret.status_code == 200 and secret.json()["error"] == "incorrect_client_credentials"
    assert set(secret.json()) == {"error", "error_description", "error_uri"}

    form = github.requests_to("/login/oauth/access_token")[-1].form
    assert form["client_secret"] == "x" and form["code_verifier"] == verifier


def test_github_deny_and_failures(github: LocalGitHub, http: httpx.Client) -> None:
    github.deny_next = True
    response = http.get(
        github.authorize_url,
        params={"client_id": GITHUB_CLIENT_ID, "redirect_uri": CALLBACK, "state": "s"},
    )
    params = redirect_params(response)
    assert params["error"] == "access_denied" and params["state"] == "s"
    assert params["error_description"]

    code, verifier = github_code(http, github)
    token = github_token(http, github, code, verifier, accept="application/json").json()
    auth = {"authorization": "Bearer " + token["access_token"]}
    github.fail("user", "error")
    assert http.get(github.api_url + "/user", headers=auth).status_code == 500
    github.fail("emails", "garbage")
    assert http.get(github.api_url + "/user/emails", headers=auth).content == b"not json{"
    github.fail("token", "huge")
    assert len(http.post(github.token_url).content) == len(HUGE_BODY)
    github.fail("authorize", "slow", delay=1.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(github.authorize_url, timeout=0.5)
    github.heal()
    assert http.get(github.api_url + "/user", headers=auth).status_code == 200
    with pytest.raises(AssertionError):
        github.fail("userinfo", "error")


def test_github_consent_page(github: LocalGitHub, http: httpx.Client) -> None:
    query = {"client_id": GITHUB_CLIENT_ID, "redirect_uri": CALLBACK, "state": "s"}
    page = http.get(github.authorize_url, params=query)
    assert page.status_code == 200 and ">Login<" in page.text and ">Cancel<" in page.text
    action, fields = parse_form_post(page.text)
    form = {**fields, "id": "42", "login": "grace", "email": "g@example.com"}
    params = redirect_params(http.post(github.base_url + action, data=form))
    answer = github_token(http, github, params["code"], "", accept="application/json")
    token = answer.json()["access_token"]
    user = http.get(github.api_url + "/user", headers={"authorization": "token " + token})
    assert user.json()["id"] == 42 and user.json()["login"] == "grace"
    cancel = http.post(github.base_url + action, data={**form, "action": "cancel"})
    assert redirect_params(cancel)["error"] == "access_denied"
