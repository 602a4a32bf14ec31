"""The configured identity providers (IDENTITY_PROVIDERS__*), presets filled in and checked
at start: a provider that cannot work never starts a server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from db.providers.http import check_url
from db.settings import PROVIDER_ID, ConfigError, IdentityProviderSettings, Settings

OIDC_SCOPES = "openid email profile"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    kind: Literal["oidc", "github"] = "oidc"
    issuer: str | None = None
    scopes: str = OIDC_SCOPES
    trust_email_verified: bool = False
    # Apple answers by a form POST (and only then sends the user's name).
    response_mode: Literal["query", "form_post"] = "query"
    # Other spellings of the issuer the provider's tokens carry.
    issuer_aliases: tuple[str, ...] = ()
    # Microsoft's multi-tenant issuer: a template naming `{tenantid}`, each token's `tid`.
    tenant_issuer: bool = False


PRESETS: dict[str, Preset] = {
    "google": Preset(
        name="Google",
        issuer="https://accounts.google.com",
        trust_email_verified=True,
        issuer_aliases=("accounts.google.com",),
    ),
    "apple": Preset(
        name="Apple",
        issuer="https://appleid.apple.com",
        scopes="openid name email",
        trust_email_verified=True,
        response_mode="form_post",
    ),
    # Any Microsoft account (personal, work or school); a tenant's issuer narrows it.
    "microsoft": Preset(
        name="Microsoft",
        issuer="https://login.microsoftonline.com/common/v2.0",
        tenant_issuer=True,
    ),
    "github": Preset(
        name="GitHub", kind="github", scopes="read:user user:email", trust_email_verified=True
    ),
    "gitlab": Preset(name="GitLab", issuer="https://gitlab.com"),
}
GENERIC = Preset(name="")
GITHUB_WEB_URL = "https://github.com"
GITHUB_API_URL = "https://api.github.com"


@dataclass(frozen=True, slots=True)
class AppleKey:
    team_id: str
    key_id: str
    pem: str


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: str
    name: str
    kind: Literal["oidc", "github"]
    client_id: str
    client_secret: str | None
    scopes: str
    trust_email_verified: bool
    # Every `aud` an ID token may carry: the web client and the native apps.
    audiences: tuple[str, ...]
    response_mode: Literal["query", "form_post"] = "query"
    issuer: str | None = None
    issuer_aliases: tuple[str, ...] = ()
    tenant_issuer: bool = False
    apple: AppleKey | None = None
    web_url: str = GITHUB_WEB_URL
    api_url: str = GITHUB_API_URL

    @property
    def web_sign_in(self) -> bool:
        """Whether the web redirect is set up (a client secret, or Apple's key)."""
        return self.client_secret is not None

    @property
    def supports_id_token(self) -> bool:
        return self.kind == "oidc"


def provider_configs(settings: Settings) -> dict[str, ProviderConfig]:
    """The providers by id, in the order configured; ConfigError for one that cannot work."""
    configured = settings.identity_providers
    if not configured:
        return {}
    public_url(settings)  # required, and checked, with any provider
    allow = settings.identity_providers_allow_insecure
    providers: dict[str, ProviderConfig] = {}
    for provider_id, given in configured.items():
        providers[provider_id] = _config(provider_id, given, allow_insecure=allow)
    return providers


def _config(
    provider_id: str, given: IdentityProviderSettings, *, allow_insecure: bool
) -> ProviderConfig:
    setting = f"IDENTITY_PROVIDERS__{provider_id.upper()}"
    if not PROVIDER_ID.fullmatch(provider_id):
        raise ConfigError(
            f"{setting}: a provider id is a lowercase letter, then up to 31 lowercase letters,"
            " digits or underscores"
        )
    preset = PRESETS.get(provider_id, GENERIC)
    if not given.client_id.strip():
        raise ConfigError(f"{setting}__CLIENT_ID must be set (the client id the provider gave you)")
    # As the provider writes it: its tokens' `iss` must equal it (Auth0's ends in "/").
    issuer = (given.issuer or preset.issuer or "").strip() or None
    if preset.kind == "oidc":
        if issuer is None:
            raise ConfigError(
                f"{setting}__ISSUER must be set: {provider_id!r} is not a preset (google, apple,"
                " microsoft, github, gitlab), so it is found by OpenID Connect discovery at its"
                " issuer"
            )
        if (problem := check_url(issuer, allow_insecure=allow_insecure)) is not None:
            raise ConfigError(f"{setting}__ISSUER {problem}")
    web_url = (given.web_url or GITHUB_WEB_URL).rstrip("/")
    api_url = (given.api_url or GITHUB_API_URL).rstrip("/")
    if preset.kind == "github":
        for name, url in (("WEB_URL", web_url), ("API_URL", api_url)):
            if (problem := check_url(url, allow_insecure=allow_insecure)) is not None:
                raise ConfigError(f"{setting}__{name} {problem}")
    secret = given.client_secret.get_secret_value().strip() if given.client_secret else ""
    if secret.startswith("-----BEGIN") and "\\n" in secret:
        # A PEM key written on one line, its line breaks as "\n" (as in an environment
        # variable or a container's settings).
        secret = secret.replace("\\n", "\n")
    apple = None
    if provider_id == "apple" and secret:
        if not (given.team_id and given.key_id):
            raise ConfigError(
                f"{setting}__TEAM_ID and {setting}__KEY_ID must be set with its CLIENT_SECRET"
                " (the .p8 key Strawgate signs the client-secret JWT with)"
            )
        from db.providers.apple import key_problem

        if (problem := key_problem(secret)) is not None:
            raise ConfigError(f"{setting}__CLIENT_SECRET {problem}")
        apple = AppleKey(team_id=given.team_id.strip(), key_id=given.key_id.strip(), pem=secret)
    natives = tuple(part.strip() for part in given.native_client_ids.split(",") if part.strip())
    client_id = given.client_id.strip()
    return ProviderConfig(
        id=provider_id,
        name=(given.name or preset.name or provider_id).strip(),
        kind=preset.kind,
        client_id=client_id,
        client_secret=secret or None,
        scopes=" ".join((given.scopes or preset.scopes).split()),
        trust_email_verified=(
            preset.trust_email_verified
            if given.trust_email_verified is None
            else given.trust_email_verified
        ),
        audiences=tuple(dict.fromkeys((client_id, *natives))),
        response_mode=preset.response_mode,
        issuer=issuer,
        issuer_aliases=preset.issuer_aliases,
        tenant_issuer=preset.tenant_issuer,
        apple=apple,
        web_url=web_url,
        api_url=api_url,
    )


def public_url(settings: Settings) -> str:
    """PUBLIC_URL, without a trailing slash; ConfigError where it cannot be a callback's base."""
    url = (settings.public_url or "").strip().rstrip("/")
    if not url:
        raise ConfigError(
            "PUBLIC_URL must be set with IDENTITY_PROVIDERS: Strawgate's own external URL"
            " (https://auth.example.com), the base of <PUBLIC_URL>/auth/<provider>/callback"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"PUBLIC_URL {url!r} is not an absolute http(s) URL")
    if parts.path not in ("", "/"):
        raise ConfigError(
            f"PUBLIC_URL {url!r} must be an origin, without a path (https://auth.example.com):"
            " the callback is <PUBLIC_URL>/auth/<provider>/callback, and the sign-in's cookie"
            " is set for /auth/"
        )
    if settings.is_production and parts.scheme != "https":
        raise ConfigError("PUBLIC_URL must use https in production")
    return url


def redirect_urls(settings: Settings) -> frozenset[str]:
    """AUTH_REDIRECT_URLS; ConfigError for one that is not an absolute URL or has a fragment."""
    urls = [part.strip() for part in settings.auth_redirect_urls.split(",") if part.strip()]
    for url in urls:
        parts = urlsplit(url)
        if not parts.scheme or parts.fragment or "#" in url or not (parts.netloc or parts.path):
            raise ConfigError(
                f"AUTH_REDIRECT_URLS: {url!r} must be an absolute URL without a fragment"
                " (https://app.example.com/auth/callback, com.example.app:/auth)"
            )
        if parts.scheme in ("javascript", "data", "file", "vbscript"):
            raise ConfigError(f"AUTH_REDIRECT_URLS: {url!r} is not a place to return to")
    return frozenset(urls)
