"""GitHub: OAuth 2.0 with its own user and emails APIs, not OpenID Connect (no ID token, so
native apps cannot sign in with one: `supportsIdToken` is false). The subject is the user's
numeric id (a login can be renamed); the address is the primary one from the emails API,
verified as GitHub says."""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request

from db.providers.config import ProviderConfig
from db.providers.http import ProviderHttp, ProviderUnreachable
from db.providers.oidc import NAME_MAX, ProvenIdentity, _address, _text, token_answer

API_HEADERS = {"accept": "application/vnd.github+json", "x-github-api-version": "2022-11-28"}


class GitHubProvider:
    def __init__(self, config: ProviderConfig, http: ProviderHttp) -> None:
        self.config = config
        self.http = http

    async def authorize_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str
    ) -> str:
        url: str = prepare_grant_uri(
            f"{self.config.web_url}/login/oauth/authorize",
            self.config.client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=self.config.scopes,
            state=state,
            code_challenge=code_challenge,
            code_challenge_method="S256",
            allow_signup="true",
        )
        return url

    async def complete(
        self,
        *,
        code: str,
        redirect_uri: str,
        code_verifier: str,
        nonce: str,
        user_form: dict[str, Any] | None = None,
    ) -> ProvenIdentity:
        if self.config.client_secret is None:
            raise ProviderUnreachable(f"{self.config.id}: no CLIENT_SECRET for the web redirect")
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
            client_id=self.config.client_id,
            client_secret=self.config.client_secret,
        )
        response = await self.http.request(
            "POST",
            f"{self.config.web_url}/login/oauth/access_token",
            content=body,
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "accept": "application/json",
            },
        )
        token = token_answer(self.config.id, response)
        access_token = token.get("access_token")
        if not isinstance(access_token, str):
            raise ProviderUnreachable(f"{self.config.id}: the token answer holds no access token")
        headers = {**API_HEADERS, "authorization": f"Bearer {access_token}"}
        user = await self.http.get_json(f"{self.config.api_url}/user", headers=headers)
        if not isinstance(user, dict) or not isinstance(user.get("id"), int):
            raise ProviderUnreachable(f"{self.config.id}: the user answer has no id")
        email, verified = await self._primary_email(headers, user)
        return ProvenIdentity(
            provider=self.config.id,
            subject=str(user["id"]),
            email=email,
            email_verified=verified,
            name=_text(user.get("name"), NAME_MAX) or _text(user.get("login"), NAME_MAX),
        )

    async def _primary_email(
        self, headers: dict[str, str], user: dict[str, Any]
    ) -> tuple[str | None, bool]:
        """The primary address and whether GitHub verified it; without the emails API
        (a token without user:email), the public address, unverified."""
        try:
            emails = await self.http.get_json(f"{self.config.api_url}/user/emails", headers=headers)
        except ProviderUnreachable:
            emails = None
        if isinstance(emails, list):
            for entry in emails:
                if isinstance(entry, dict) and entry.get("primary") is True:
                    email = _address(entry.get("email"))
                    return email, email is not None and entry.get("verified") is True
        return _address(user.get("email")), False
