"""The configured providers, ready to be asked: what the services and the HTTP routes use."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from db.clock import Clock
from db.errors import invalid_input
from db.providers.config import ProviderConfig, provider_configs, public_url, redirect_urls
from db.providers.github import GitHubProvider
from db.providers.http import ProviderHttp
from db.providers.oidc import OidcProvider, ProvenIdentity
from db.settings import Settings

log = logging.getLogger("strawgate.providers")


class Provider(Protocol):
    config: ProviderConfig

    async def authorize_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str
    ) -> str: ...

    async def complete(
        self,
        *,
        code: str,
        redirect_uri: str,
        code_verifier: str,
        nonce: str,
        user_form: dict[str, Any] | None = None,
    ) -> ProvenIdentity: ...


class IdentityProviders:
    def __init__(
        self,
        *,
        configs: dict[str, ProviderConfig],
        http: ProviderHttp,
        clock: Clock,
        public_url: str | None,
        redirect_urls: frozenset[str],
    ) -> None:
        self.configs = configs
        self.http = http
        self.public_url = public_url
        self.redirect_urls = redirect_urls
        self._providers: dict[str, OidcProvider | GitHubProvider] = {}
        for provider_id, config in configs.items():
            if config.kind == "github":
                self._providers[provider_id] = GitHubProvider(config, http)
            else:
                self._providers[provider_id] = OidcProvider(config, http, clock)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock) -> IdentityProviders:
        configs = provider_configs(settings)
        if configs and settings.identity_providers_allow_insecure:
            log.warning(
                "IDENTITY_PROVIDERS_ALLOW_INSECURE is on: providers may be reached on private,"
                " loopback and link-local addresses, and over plain HTTP there"
            )
        return cls(
            configs=configs,
            http=ProviderHttp(
                timeout=settings.identity_provider_timeout,
                allow_insecure=settings.identity_providers_allow_insecure,
                # Plain HTTP never crosses the internet: ID tokens, codes and client
                # secrets travel on it, readable and changeable by anyone on the way.
                http_private_only=True,
            ),
            clock=clock,
            public_url=public_url(settings) if configs else None,
            redirect_urls=redirect_urls(settings),
        )

    def get(self, provider_id: str) -> OidcProvider | GitHubProvider:
        """The provider of that id; INVALID_INPUT for one not configured."""
        provider = self._providers.get(provider_id)
        if provider is None:
            raise invalid_input("No identity provider has that id.", "provider")
        return provider

    def oidc(self, provider_id: str) -> OidcProvider:
        """A provider whose ID tokens are taken; INVALID_INPUT otherwise."""
        provider = self.get(provider_id)
        if not isinstance(provider, OidcProvider):
            raise invalid_input(
                f"{provider.config.name} gives no ID token; sign in with it by the web redirect.",
                "provider",
            )
        return provider

    def callback_url(self, provider_id: str) -> str:
        return f"{self.public_url}/auth/{provider_id}/callback"

    def is_allowed_redirect(self, url: str) -> bool:
        return url in self.redirect_urls

    async def aclose(self) -> None:
        await self.http.aclose()
