"""The presets against local servers: GitHub (OAuth 2.0 and its REST API, no ID token)
against LocalGitHub, Apple (form_post, the name in the `user` field, a client secret that
is an ES256 JWT signed from the .p8 key, "true" as a string) against LocalProvider;
Microsoft's multi-tenant issuer and Google's issuer alias as focused tests of OidcProvider
with the local provider's keys; and the settings that never start a server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.providers.config import provider_configs
from db.providers.http import ProviderHttp, ProviderUnreachable
from db.providers.oidc import OidcProvider, TokenRejected
from db.settings import ConfigError, Settings
from tests.conftest import MutableClock, unique_email
from tests.gql import gql, signed_up_and_proven
from tests.identities import (
    IDENTITIES,
    PROVIDERS,
    REDIRECT,
    exchange,
    id_token_sign_in,
    provider_settings,
    sign_in_by_redirect,
)
from tests.identity_provider import (
    GITHUB_CLIENT_ID,
    GITHUB_CLIENT_SECRET,
    LocalGitHub,
    LocalProvider,
)

APPLE_CLIENT = "com.example.web"
APPLE_TEAM = "TEAM123456"
APPLE_KEY_ID = "KEY1234567"
APPLE_KEY = ECKey.generate_key("P-256")
APPLE_PEM = APPLE_KEY.as_pem(private=True).decode()


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def local_github() -> Iterator[LocalGitHub]:
    with LocalGitHub() as github:
        yield github


class AppleSecrets:
    """The client secrets the provider's token endpoint got for Apple's client: each
    checked as Apple checks one (signed ES256 by the key, by the key id, for Apple)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, secret: str) -> bool:
        self.seen.append(secret)
        try:
            token = jwt.decode(secret, APPLE_KEY, algorithms=["ES256"])
        except (JoseError, ValueError):  # a secret that does not verify
            return False
        claims = token.claims
        return (
            token.header.get("kid") == APPLE_KEY_ID
            and claims.get("iss") == APPLE_TEAM
            and claims.get("sub") == APPLE_CLIENT
            and claims.get("aud") == "https://appleid.apple.com"
        )


@pytest.fixture
def apple_secrets() -> AppleSecrets:
    return AppleSecrets()


@pytest.fixture
def provider(local_provider: LocalProvider, apple_secrets: AppleSecrets) -> LocalProvider:
    local_provider.reset()
    local_provider.add_client(APPLE_CLIENT, "never-this-string")
    local_provider.secret_checks[APPLE_CLIENT] = apple_secrets
    return local_provider


@pytest.fixture
def github(local_github: LocalGitHub) -> LocalGitHub:
    local_github.reset()
    return local_github


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings],
    provider: LocalProvider,
    github: LocalGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    # GitHub as an operator sets it: by the environment.
    for name, value in {
        "CLIENT_ID": GITHUB_CLIENT_ID,
        "CLIENT_SECRET": GITHUB_CLIENT_SECRET,
        "WEB_URL": github.base_url,
        "API_URL": github.api_url,
    }.items():
        monkeypatch.setenv(f"IDENTITY_PROVIDERS__GITHUB__{name}", value)
    apple = {
        "issuer": provider.issuer,
        "client_id": APPLE_CLIENT,
        "client_secret": APPLE_PEM,
        "team_id": APPLE_TEAM,
        "key_id": APPLE_KEY_ID,
    }
    return make_settings(**provider_settings(provider, providers={"apple": apple}))


def github_user(
    user_id: int, primary: str, *, verified: bool = True, public: str | None = None
) -> dict[str, Any]:
    return {
        "id": user_id,
        "login": f"user{user_id}",
        "name": "Ada Lovelace",
        "email": public,
        "emails": [
            {"email": f"other-{user_id}@example.org", "primary": False, "verified": True},
            {"email": primary, "primary": True, "verified": verified, "visibility": "private"},
        ],
    }


async def test_the_presets_are_listed_with_what_they_take(client: httpx.AsyncClient) -> None:
    listed = (await gql(client, PROVIDERS))["data"]["identityProviders"]
    assert sorted(listed, key=lambda p: p["id"]) == [
        {"id": "acme", "name": "Acme ID", "supportsIdToken": True},
        {"id": "apple", "name": "Apple", "supportsIdToken": True},
        {"id": "github", "name": "GitHub", "supportsIdToken": False},
    ]


# -- GitHub --------------------------------------------------------------------------------


async def test_github_signs_up_with_the_primary_verified_address(
    client: httpx.AsyncClient, github: LocalGitHub
) -> None:
    primary = unique_email()
    github.next_user = github_user(4242, primary, public="public@example.org")

    returned = await sign_in_by_redirect(client, provider_id="github")
    assert returned.location.startswith(REDIRECT + "?code=")
    session = await exchange(client, returned)

    assert session["__typename"] == "AuthSession", session
    me = (await gql(client, IDENTITIES, token=session["accessToken"]))["data"]["me"]
    assert (me["email"], me["emailVerified"], me["hasPassword"]) == (primary, True, False)
    assert [(i["provider"], i["name"]) for i in me["identities"]] == [("github", "Ada Lovelace")]
    sent = github.requests_to("/login/oauth/authorize")[0].query
    assert sent["client_id"] == GITHUB_CLIENT_ID
    assert sent["code_challenge_method"] == "S256"
    assert sent["redirect_uri"] == "http://testserver/auth/github/callback"
    assert set(sent["scope"].split()) == {"read:user", "user:email"}
    emails = github.requests_to("/user/emails")
    assert len(emails) == 1 and emails[0].headers["authorization"].startswith("Bearer gho_")


async def test_github_the_same_user_id_signs_in_to_the_same_account(
    client: httpx.AsyncClient, github: LocalGitHub
) -> None:
    github.next_user = github_user(77, unique_email())
    first = await exchange(client, await sign_in_by_redirect(client, provider_id="github"))
    # The address changed at GitHub; the numeric id did not.
    github.next_user = github_user(77, unique_email())
    second = await exchange(client, await sign_in_by_redirect(client, provider_id="github"))
    assert first["user"]["id"] == second["user"]["id"]


async def test_github_takes_no_id_token(client: httpx.AsyncClient, github: LocalGitHub) -> None:
    answer = await id_token_sign_in(client, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", provider_id="github")
    assert (answer["code"], answer["field"]) == ("INVALID_INPUT", "provider")
    assert github.requests == []


async def test_github_an_unverified_primary_address_of_an_account_is_email_taken(
    client: httpx.AsyncClient, github: LocalGitHub
) -> None:
    email = unique_email()
    await signed_up_and_proven(client, email)  # an account whose address is verified
    github.next_user = github_user(9001, email, verified=False)

    returned = await sign_in_by_redirect(client, provider_id="github")
    answer = await exchange(client, returned)

    assert answer["code"] == "EMAIL_TAKEN", answer


# -- Apple ---------------------------------------------------------------------------------


async def test_apple_comes_back_by_form_post_with_the_name_and_a_signed_client_secret(
    client: httpx.AsyncClient, provider: LocalProvider, apple_secrets: AppleSecrets
) -> None:
    email = unique_email()
    # Apple's ID tokens carry no name, and its email_verified is a string.
    provider.next_user = {"sub": "001234.apple", "email": email, "email_verified": "true"}
    provider.form_post_user = {"name": {"firstName": "Ada", "lastName": "Lovelace"}}

    returned = await sign_in_by_redirect(client, provider_id="apple")

    assert returned.response.status_code == 303  # after the POST, the browser GETs
    assert returned.location.startswith(REDIRECT + "?code=")
    callbacks = [r for r in provider.requests if r.path == "/authorize"]
    sent = callbacks[0].query
    assert sent["response_mode"] == "form_post"
    assert sent["scope"] == "openid name email"
    assert sent["client_id"] == APPLE_CLIENT

    session = await exchange(client, returned)
    assert session["__typename"] == "AuthSession", session
    me = (await gql(client, IDENTITIES, token=session["accessToken"]))["data"]["me"]
    assert (me["email"], me["emailVerified"]) == (email, True)
    assert [(i["provider"], i["name"]) for i in me["identities"]] == [("apple", "Ada Lovelace")]

    # The client secret the token endpoint got: an ES256 JWT signed by the .p8 key.
    assert len(apple_secrets.seen) == 1
    secret = jwt.decode(apple_secrets.seen[0], APPLE_KEY, algorithms=["ES256"])
    assert (secret.header["alg"], secret.header["kid"]) == ("ES256", APPLE_KEY_ID)
    claims = secret.claims
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        APPLE_TEAM,
        APPLE_CLIENT,
        "https://appleid.apple.com",
    )
    assert 0 < claims["exp"] - claims["iat"] <= 180 * 24 * 3600  # at most six months
    assert apple_secrets(apple_secrets.seen[0]) is True


async def test_apple_a_later_sign_in_keeps_the_first_name(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    user = {"sub": "002345.apple", "email": email, "email_verified": "true"}
    provider.next_user = user
    provider.form_post_user = {"name": {"firstName": "Ada", "lastName": "Lovelace"}}
    first = await exchange(client, await sign_in_by_redirect(client, provider_id="apple"))
    # Apple sends the name at the first consent only.
    provider.next_user = user
    provider.form_post_user = None
    second = await exchange(client, await sign_in_by_redirect(client, provider_id="apple"))

    assert first["user"]["id"] == second["user"]["id"]
    me = (await gql(client, IDENTITIES, token=second["accessToken"]))["data"]["me"]
    assert me["identities"][0]["name"] == "Ada Lovelace"


async def test_apple_a_client_secret_apple_would_refuse_is_a_provider_error(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    provider.next_user = {"sub": "003456.apple", "email": unique_email(), "email_verified": True}
    provider.secret_checks[APPLE_CLIENT] = lambda secret: False
    returned = await sign_in_by_redirect(client, provider_id="apple")
    assert returned.query["error"] == "PROVIDER_ERROR"


# -- OidcProvider on its own: Microsoft's tenants, Google's issuer alias, the caches ---------


class TenantProvider(LocalProvider):
    """The local provider publishing Microsoft's multi-tenant discovery document: its
    issuer a template, `{tenantid}` standing for the token's `tid`."""

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "issuer": self.base_url + "/{tenantid}/v2.0"}

    def routes(self) -> list[Route]:
        async def discovery(request: Request) -> Response:
            self.discovery_fetches += 1
            return JSONResponse(self.metadata())

        common = Route("/common/v2.0/.well-known/openid-configuration", discovery)
        return [common, *super().routes()]


@pytest.fixture(scope="module")
def tenant_provider() -> Iterator[TenantProvider]:
    with TenantProvider() as provider:
        yield provider


@contextlib.asynccontextmanager
async def oidc_provider(
    provider_id: str, issuer: str, clock: MutableClock
) -> AsyncIterator[OidcProvider]:
    """An OidcProvider as the app makes one from settings, on its own."""
    settings = Settings(
        _env_file=None,
        public_url="http://testserver",
        identity_providers={provider_id: {"issuer": issuer, "client_id": "web-client"}},
        identity_providers_allow_insecure=True,
        identity_provider_timeout=2.0,
    )
    http = ProviderHttp(timeout=2.0, allow_insecure=True)
    try:
        yield OidcProvider(provider_configs(settings)[provider_id], http, clock)
    finally:
        await http.aclose()


@pytest.fixture
async def microsoft(
    tenant_provider: TenantProvider, clock: MutableClock
) -> AsyncIterator[OidcProvider]:
    tenant_provider.reset()
    async with oidc_provider("microsoft", tenant_provider.base_url + "/common/v2.0", clock) as made:
        yield made


async def verify(provider: OidcProvider, token: str) -> dict[str, Any]:
    return await provider.verify(
        token, audiences=provider.config.audiences, nonce=None, hashed_nonce=True
    )


async def test_microsoft_multi_tenant_takes_the_issuer_of_the_tokens_tenant(
    microsoft: OidcProvider, tenant_provider: TenantProvider, clock: MutableClock
) -> None:
    tenant = str(uuid.uuid4())
    own = tenant_provider.base_url + f"/{tenant}/v2.0"
    token = tenant_provider.mint_id_token(
        {"sub": "ms-user", "tid": tenant, "iss": own}, now=clock.now()
    )
    claims = await verify(microsoft, token)
    assert (claims["sub"], claims["iss"]) == ("ms-user", own)


@pytest.mark.parametrize(
    "claims",
    [
        # Another tenant's issuer than the token's own tid.
        {"tid": "11111111-1111-1111-1111-111111111111", "iss": "OTHER_TENANT"},
        {"tid": None, "iss": "OWN_TENANT"},
        {"iss": "BASE/{tenantid}/v2.0"},
        {"iss": "BASE/common/v2.0"},
    ],
    ids=["another-tenants-iss", "no-tid", "the-template-itself", "common"],
)
async def test_microsoft_multi_tenant_refuses_an_issuer_not_of_the_tokens_tenant(
    microsoft: OidcProvider,
    tenant_provider: TenantProvider,
    clock: MutableClock,
    claims: dict[str, Any],
) -> None:
    tenant = "22222222-2222-2222-2222-222222222222"
    base = tenant_provider.base_url
    spelled = {
        "OTHER_TENANT": f"{base}/33333333-3333-3333-3333-333333333333/v2.0",
        "OWN_TENANT": f"{base}/{tenant}/v2.0",
    }
    given = {"sub": "ms-user", "tid": tenant, **claims}
    given["iss"] = spelled.get(given["iss"], given["iss"].replace("BASE", base))
    token = tenant_provider.mint_id_token(given, now=clock.now())
    with pytest.raises(TokenRejected, match="iss"):
        await verify(microsoft, token)


@pytest.fixture
async def google(provider: LocalProvider, clock: MutableClock) -> AsyncIterator[OidcProvider]:
    async with oidc_provider("google", provider.issuer, clock) as made:
        yield made


@pytest.mark.parametrize(
    ("iss", "accepted"),
    [
        ("accounts.google.com", True),
        ("ISSUER", True),
        ("https://accounts.google.com.example.com", False),
        ("http://accounts.google.com", False),
        ("accounts.google.com/", False),
    ],
)
async def test_google_takes_its_issuer_without_the_scheme_too(
    google: OidcProvider, provider: LocalProvider, clock: MutableClock, iss: str, accepted: bool
) -> None:
    issuer = provider.issuer if iss == "ISSUER" else iss
    token = provider.mint_id_token({"sub": "g-user", "iss": issuer}, now=clock.now())
    if accepted:
        assert (await verify(google, token))["iss"] == issuer
    else:
        with pytest.raises(TokenRejected, match="iss"):
            await verify(google, token)


async def test_keys_asked_for_after_the_discovery_document_aged_out_do_not_hang(
    google: OidcProvider, provider: LocalProvider, clock: MutableClock
) -> None:
    """The key set's fetch reads the discovery document: with one lock for both, a key set
    asked for when both had aged out waited on itself, for good."""
    # Nothing fetched yet: the document, then the keys.
    await asyncio.wait_for(google.keys(None), timeout=10)
    clock.advance(hours=25)
    keys = await asyncio.wait_for(google.keys(provider.current_key.kid), timeout=10)
    assert [key.kid for key in keys.keys] == [provider.current_key.kid]
    assert (provider.discovery_fetches, provider.jwks_fetches) == (2, 2)


# -- settings that never start a server ----------------------------------------------------


def p384_pem() -> str:
    return ECKey.generate_key("P-384").as_pem(private=True).decode()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"identity_providers": {"acme": {"client_id": "x"}}},
            "IDENTITY_PROVIDERS__ACME__ISSUER must be set",
        ),
        (
            {"identity_providers": {"acme": {"issuer": "https://id.example.com"}}},
            "IDENTITY_PROVIDERS__ACME__CLIENT_ID must be set",
        ),
        (
            {"identity_providers": {"apple": {"client_id": "x", "client_secret": APPLE_PEM}}},
            "IDENTITY_PROVIDERS__APPLE__TEAM_ID and IDENTITY_PROVIDERS__APPLE__KEY_ID must be set",
        ),
        (
            {
                "identity_providers": {
                    "apple": {
                        "client_id": "x",
                        "client_secret": APPLE_PEM,
                        "team_id": APPLE_TEAM,
                    }
                }
            },
            "KEY_ID must be set",
        ),
        (
            {
                "identity_providers": {
                    "apple": {
                        "client_id": "x",
                        "client_secret": "a-plain-secret",
                        "team_id": APPLE_TEAM,
                        "key_id": APPLE_KEY_ID,
                    }
                }
            },
            "IDENTITY_PROVIDERS__APPLE__CLIENT_SECRET is not a PEM private key",
        ),
        (
            {
                "identity_providers": {
                    "apple": {
                        "client_id": "x",
                        "client_secret": "P384",
                        "team_id": APPLE_TEAM,
                        "key_id": APPLE_KEY_ID,
                    }
                }
            },
            "IDENTITY_PROVIDERS__APPLE__CLIENT_SECRET must be the P-256 private key",
        ),
        (
            {
                "identity_providers": {
                    "apple": {
                        "client_id": "x",
                        "client_secret": "P256_PUBLIC",
                        "team_id": APPLE_TEAM,
                        "key_id": APPLE_KEY_ID,
                    }
                }
            },
            "IDENTITY_PROVIDERS__APPLE__CLIENT_SECRET must be the P-256 private key",
        ),
        (
            {
                "identity_providers": {
                    "apple": {
                        "client_id": "x",
                        "client_secret": "RSA",
                        "team_id": APPLE_TEAM,
                        "key_id": APPLE_KEY_ID,
                    }
                }
            },
            "IDENTITY_PROVIDERS__APPLE__CLIENT_SECRET is not a PEM private key",
        ),
        (
            {"identity_providers": {"acme": {"issuer": "http://id.example.com", "client_id": "x"}}},
            "IDENTITY_PROVIDERS__ACME__ISSUER must use https",
        ),
        (
            {"identity_providers": {"github": {"client_id": "x", "api_url": "http://gh.local"}}},
            "IDENTITY_PROVIDERS__GITHUB__API_URL must use https",
        ),
        (
            {
                "public_url": None,
                "identity_providers": {"google": {"client_id": "x"}},
            },
            "PUBLIC_URL must be set with IDENTITY_PROVIDERS",
        ),
        (
            {
                "public_url": "auth.example.com",
                "identity_providers": {"google": {"client_id": "x"}},
            },
            "is not an absolute http(s) URL",
        ),
        (
            {"identity_providers": {"bad-id": {"issuer": "https://id.example.com"}}},
            "IDENTITY_PROVIDERS__BAD-ID: a provider id is a lowercase letter",
        ),
        (
            {"identity_providers": {"9lives": {"issuer": "https://id.example.com"}}},
            "IDENTITY_PROVIDERS__9LIVES: a provider id is a lowercase letter",
        ),
        (
            {"auth_redirect_urls": "https://app.example.com/done#frag"},
            "AUTH_REDIRECT_URLS: 'https://app.example.com/done#frag' must be an absolute URL"
            " without a fragment",
        ),
        (
            {"auth_redirect_urls": "https://app.example.com/ok,/relative/path"},
            "AUTH_REDIRECT_URLS: '/relative/path' must be an absolute URL",
        ),
        (
            {"auth_redirect_urls": "javascript:alert(1)"},
            "AUTH_REDIRECT_URLS: 'javascript:alert(1)' is not a place to return to",
        ),
    ],
    ids=[
        "generic-without-issuer",
        "without-client-id",
        "apple-secret-without-team-and-key-id",
        "apple-secret-without-key-id",
        "apple-secret-not-pem",
        "apple-secret-p384",
        "apple-secret-public-key",
        "apple-secret-rsa",
        "http-issuer",
        "http-github-api",
        "no-public-url",
        "relative-public-url",
        "bad-provider-id",
        "provider-id-starting-with-a-digit",
        "redirect-url-with-fragment",
        "relative-redirect-url",
        "javascript-redirect-url",
    ],
)
def test_settings_that_cannot_work_refuse_to_start_saying_what_to_fix(
    make_settings: Callable[..., Settings], overrides: dict[str, Any], message: str
) -> None:
    values: dict[str, Any] = {"public_url": "https://auth.example.com", **overrides}
    for given in values.get("identity_providers", {}).values():
        secret = given.get("client_secret")
        if secret == "P384":
            given["client_secret"] = p384_pem()
        elif secret == "P256_PUBLIC":
            given["client_secret"] = APPLE_KEY.as_pem(private=False).decode()
        elif secret == "RSA":
            given["client_secret"] = RSAKey.generate_key(2048).as_pem(private=True).decode()
    settings = make_settings(**values)

    with pytest.raises(ConfigError) as raised:
        settings.prepare()

    assert message in str(raised.value)
    assert "PRIVATE KEY" not in str(raised.value)  # a key is never echoed


def test_settings_that_can_work_start(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        public_url="https://auth.example.com",
        auth_redirect_urls="https://app.example.com/done, com.example.app:/oauth",
        identity_providers={
            "google": {"client_id": "g", "client_secret": "s", "native_client_ids": "ios, and"},
            "apple": {
                "client_id": APPLE_CLIENT,
                "client_secret": APPLE_PEM,
                "team_id": APPLE_TEAM,
                "key_id": APPLE_KEY_ID,
            },
            "microsoft": {"client_id": "m"},
            "github": {"client_id": "gh", "client_secret": "s"},
            "gitlab": {"client_id": "gl"},
            "corp_sso": {"issuer": "https://sso.example.com/", "client_id": "c"},
        },
    )
    settings.prepare()
    configs = provider_configs(settings)
    assert configs["google"].audiences == ("g", "ios", "and")
    assert configs["apple"].response_mode == "form_post"
    # As configured: tokens carry it exactly (Auth0's issuer ends in "/").
    assert configs["corp_sso"].issuer == "https://sso.example.com/"
    trusted = {pid: config.trust_email_verified for pid, config in configs.items()}
    assert trusted == {
        "google": True,
        "apple": True,
        "microsoft": False,
        "github": True,
        "gitlab": False,
        "corp_sso": False,
    }
    assert configs["github"].supports_id_token is False


def test_an_apple_secret_is_renewed_an_hour_before_it_expires() -> None:
    from db.providers.apple import AppleClientSecret
    from db.providers.config import AppleKey

    secrets = AppleClientSecret(AppleKey(APPLE_TEAM, APPLE_KEY_ID, APPLE_PEM), APPLE_CLIENT)
    clock = MutableClock()
    first = secrets.current(clock.now())
    clock.advance(hours=22, minutes=59)
    assert secrets.current(clock.now()) == first
    clock.advance(minutes=2)
    renewed = secrets.current(clock.now())
    assert renewed != first
    claims = jwt.decode(renewed, APPLE_KEY, algorithms=["ES256"]).claims
    assert claims["iat"] == int(clock.now().timestamp())
    assert claims["exp"] - claims["iat"] == int(timedelta(days=1).total_seconds())


class SlashProvider(LocalProvider):
    """A provider whose issuer ends in "/", as Auth0's does: its document and tokens say so."""

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "issuer": self.base_url + "/"}


async def test_an_issuer_ending_in_a_slash_is_taken_as_written(clock: MutableClock) -> None:
    with SlashProvider() as slash:
        async with oidc_provider("auth0", slash.base_url + "/", clock) as made:
            token = slash.mint_id_token({"sub": "a0", "iss": slash.base_url + "/"}, now=clock.now())
            claims = await verify(made, token)
            assert claims["sub"] == "a0"
            # The document is found under the issuer, not at "//.well-known".
            assert [r.path for r in slash.requests_to("/.well-known/openid-configuration")]
            without = slash.mint_id_token({"sub": "a0", "iss": slash.base_url}, now=clock.now())
            with pytest.raises(TokenRejected):
                await verify(made, without)


def test_allowing_insecure_providers_says_so_at_start(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    from db.clock import SystemClock
    from db.providers.registry import IdentityProviders

    insecure = make_settings(
        public_url="http://127.0.0.1:8000",
        identity_providers={"corp": {"issuer": "http://10.0.0.5", "client_id": "c"}},
        identity_providers_allow_insecure=True,
    ).prepare()
    with caplog.at_level("WARNING", logger="strawgate.providers"):
        IdentityProviders.from_settings(insecure, SystemClock())
    assert "IDENTITY_PROVIDERS_ALLOW_INSECURE is on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="strawgate.providers"):
        IdentityProviders.from_settings(make_settings().prepare(), SystemClock())
    assert caplog.text == ""


def test_an_apple_key_on_one_line_with_escaped_line_breaks_is_taken(
    make_settings: Callable[..., Settings],
) -> None:
    one_line = APPLE_PEM.strip().replace("\n", "\\n")
    settings = make_settings(
        public_url="https://auth.example.com",
        identity_providers={
            "apple": {
                "client_id": APPLE_CLIENT,
                "client_secret": one_line,
                "team_id": APPLE_TEAM,
                "key_id": APPLE_KEY_ID,
            }
        },
    ).prepare()
    assert provider_configs(settings)["apple"].apple is not None


async def test_only_microsoft_may_publish_an_issuer_template(
    tenant_provider: TenantProvider, clock: MutableClock
) -> None:
    tenant_provider.reset()
    async with oidc_provider("corp", tenant_provider.base_url + "/common/v2.0", clock) as corp:
        token = tenant_provider.mint_id_token(
            {"sub": "x", "tid": "t1", "iss": tenant_provider.base_url + "/t1/v2.0"},
            now=clock.now(),
        )
        with pytest.raises(ProviderUnreachable, match="issuer"):
            await verify(corp, token)


def test_a_public_url_with_a_path_never_starts(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        public_url="https://example.com/auth-service",
        identity_providers={"google": {"client_id": "g", "client_secret": "s"}},
    )
    with pytest.raises(ConfigError, match="without a path"):
        settings.prepare()
