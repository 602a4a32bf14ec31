"""OpenID Connect providers (Google, Apple, Microsoft, GitLab, any issuer by discovery): the
authorize URL, the code exchange, and the ID token's checks, shared by the web redirect and
by native apps' tokens.

The discovery document is kept for a day and the key set for an hour, per process; a
token signed with a key id not in the kept set fetches the set again (at most once a
minute, so tokens with made-up key ids cannot make this server hammer the provider), which
is how a provider's key rotation is followed. An ID token is accepted only signed by one
of the provider's keys with an asymmetric algorithm, from its issuer, for one of our client
ids, unexpired (a minute of skew), not issued in the future, and carrying the nonce it was
asked for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from db.clock import Clock
from db.providers.apple import AppleClientSecret
from db.providers.config import ProviderConfig
from db.providers.http import ProviderHttp, ProviderUnreachable, json_of

log = logging.getLogger("strawgate.providers")

METADATA_TTL = timedelta(hours=24)
KEYS_TTL = timedelta(hours=1)
# The least time between two fetches of a key set forced by an unknown key id.
FORCED_REFRESH_INTERVAL = timedelta(minutes=1)
# A document or key set kept from before serves while the provider cannot be reached; it
# is asked again this much later.
RETRY_AFTER_FAILURE = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=60)
# Asymmetric only: a provider's token is never checked with a shared secret (HS*), and
# "none" is never a signature.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
SUBJECT_MAX = 255
NAME_MAX = 255
EMAIL_MAX = 254


@dataclass(frozen=True, slots=True)
class ProvenIdentity:
    """Who the provider says signed in: its subject, and what it said of them."""

    provider: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None


class TokenRejected(Exception):
    """An ID token that does not pass; `reason` is for the log (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def nonce_digest(nonce: str) -> str:
    """The SHA-256 of a nonce, hex: what Sign in with Apple (and apps that hash their nonce
    for Google) put in the token when the app passed the hash on."""
    return hashlib.sha256(nonce.encode("utf-8")).hexdigest()


def _is_true(value: Any) -> bool:
    # Apple sends "true" and "false" as strings.
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value[:limit] or None


def _address(value: Any) -> str | None:
    """An address as the provider gave it, or None: one too long to be an address is none
    (cut short, it would be another address)."""
    if not isinstance(value, str) or len(value.strip()) > EMAIL_MAX:
        return None
    return value.strip() or None


class OidcProvider:
    def __init__(self, config: ProviderConfig, http: ProviderHttp, clock: Clock) -> None:
        assert config.issuer is not None  # noqa: S101 - checked at start (config.py)
        self.config = config
        self.http = http
        self.clock = clock
        self._metadata: dict[str, Any] | None = None
        self._metadata_at: datetime | None = None
        self._keys: KeySet | None = None
        self._keys_at: datetime | None = None
        self._forced_at: datetime | None = None
        # One fetch of each at a time. Two locks, not one: a key set's fetch reads the
        # discovery document (jwks_uri), and an asyncio.Lock is not reentrant, so one lock
        # hung every sign-in of the provider for good where the document had aged out.
        self._metadata_lock = asyncio.Lock()
        self._keys_lock = asyncio.Lock()
        self._apple = (
            AppleClientSecret(config.apple, config.client_id) if config.apple is not None else None
        )

    # -- what the provider publishes -----------------------------------------------

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (kept a day; an older one still serves while the
        provider cannot be reached)."""
        now = self.clock.now()
        if (
            self._metadata is not None
            and self._metadata_at
            and now - self._metadata_at < METADATA_TTL
        ):
            return self._metadata
        async with self._metadata_lock:
            if (
                self._metadata is not None
                and self._metadata_at
                and now - self._metadata_at < METADATA_TTL
            ):
                return self._metadata
            issuer = str(self.config.issuer)
            try:
                # The issuer as configured is what tokens carry ("https://x.auth0.com/" keeps
                # its slash); the document lives under it either way.
                document = await self.http.get_json(
                    f"{issuer.rstrip('/')}/.well-known/openid-configuration"
                )
                self._metadata = self._checked_metadata(document)
            except ProviderUnreachable:
                if self._metadata is None:
                    raise
                log.warning(
                    "%s: discovery failed; using the document fetched before", self.config.id
                )
                # Asked again in a few minutes, not a day.
                now = now - METADATA_TTL + RETRY_AFTER_FAILURE
            self._metadata_at = now
            return self._metadata

    def _checked_metadata(self, document: Any) -> dict[str, Any]:
        if not isinstance(document, dict):
            raise ProviderUnreachable(f"{self.config.id}: the discovery document is not an object")
        issuer = document.get("issuer")
        # Microsoft's multi-tenant document names a template: each token says its tenant.
        # (The microsoft preset only: no other provider's issuer is a template.)
        if issuer != self.config.issuer and not (
            self.config.tenant_issuer and isinstance(issuer, str) and "{tenantid}" in issuer
        ):
            raise ProviderUnreachable(
                f"{self.config.id}: the discovery document's issuer is not {self.config.issuer}"
            )
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(name)
            if not isinstance(value, str):
                raise ProviderUnreachable(f"{self.config.id}: the discovery document has no {name}")
            self.http.checked(value)
        userinfo = document.get("userinfo_endpoint")
        if userinfo is not None and not isinstance(userinfo, str):
            raise ProviderUnreachable(f"{self.config.id}: userinfo_endpoint is not a URL")
        return document

    async def keys(self, kid: str | None) -> KeySet:
        """The provider's keys: those kept (an hour), fetched again for a key id not among
        them (at most once a minute)."""
        now = self.clock.now()
        fresh = (
            self._keys is not None and self._keys_at is not None and now - self._keys_at < KEYS_TTL
        )
        if fresh and self._known(kid):
            assert self._keys is not None  # noqa: S101
            return self._keys
        async with self._keys_lock:
            fresh = (
                self._keys is not None
                and self._keys_at is not None
                and now - self._keys_at < KEYS_TTL
            )
            if fresh and self._known(kid):
                assert self._keys is not None  # noqa: S101
                return self._keys
            if (
                fresh
                and self._forced_at is not None
                and now - self._forced_at < FORCED_REFRESH_INTERVAL
            ):
                assert self._keys is not None  # noqa: S101
                return self._keys  # an unknown key id, asked again too soon
            try:
                keys = await self._fetch_keys()
            except ProviderUnreachable:
                if self._keys is None:
                    raise
                # The keys fetched before still check the tokens they signed while the
                # provider cannot be reached; asked again in a few minutes.
                log.warning("%s: its key set failed; using the one fetched before", self.config.id)
                self._keys_at = now - KEYS_TTL + RETRY_AFTER_FAILURE
                self._forced_at = now
                return self._keys
            if fresh:
                self._forced_at = now
            self._keys, self._keys_at = keys, now
            return keys

    async def _fetch_keys(self) -> KeySet:
        metadata = await self.metadata()
        document = await self.http.get_json(metadata["jwks_uri"])
        try:
            return KeySet.import_key_set(document)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ProviderUnreachable(
                f"{self.config.id}: its key set does not parse ({exc})"
            ) from None

    def _known(self, kid: str | None) -> bool:
        if self._keys is None:
            return False
        if kid is None:
            return len(self._keys.keys) == 1
        return any(key.kid == kid for key in self._keys.keys)

    # -- the web redirect ------------------------------------------------------------

    async def authorize_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str
    ) -> str:
        metadata = await self.metadata()
        extra: dict[str, str] = {
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        if self.config.response_mode == "form_post":
            extra["response_mode"] = "form_post"
        url: str = prepare_grant_uri(
            metadata["authorization_endpoint"],
            self.config.client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=self.config.scopes,
            state=state,
            **extra,
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
        """The code exchanged (with our PKCE verifier) for an ID token, checked against
        the nonce this redirect sent; the user info where the token holds no address."""
        metadata = await self.metadata()
        token = await self._exchange(metadata, code, redirect_uri, code_verifier)
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise ProviderUnreachable(f"{self.config.id}: the token answer holds no ID token")
        claims = await self.verify(
            id_token, audiences=(self.config.client_id,), nonce=nonce, hashed_nonce=False
        )
        if not isinstance(claims.get("email"), str) and isinstance(token.get("access_token"), str):
            info = await self._userinfo(metadata, token["access_token"], claims["sub"])
            # The address and whether it is verified come from one source: the token's
            # `email_verified` never vouches for the user info's address.
            claims = {k: v for k, v in claims.items() if k not in ("email", "email_verified")}
            claims = {**claims, **{k: info[k] for k in ("email", "email_verified") if k in info}}
            if "name" in info and "name" not in claims:
                claims["name"] = info["name"]
        return self.identity(claims, name=_apple_name(user_form))

    async def _exchange(
        self, metadata: dict[str, Any], code: str, redirect_uri: str, code_verifier: str
    ) -> dict[str, Any]:
        secret = self.client_secret()
        body = prepare_token_request(
            "authorization_code", code=code, redirect_uri=redirect_uri, code_verifier=code_verifier
        )
        headers = {"content-type": "application/x-www-form-urlencoded"}
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods:
            # RFC 6749 2.3.1: each part form-encoded before Basic.
            pair = f"{quote(self.config.client_id, safe='')}:{quote(secret, safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            body = prepare_token_request(
                "authorization_code",
                code=code,
                redirect_uri=redirect_uri,
                code_verifier=code_verifier,
                client_id=self.config.client_id,
                client_secret=secret,
            )
        response = await self.http.request(
            "POST", metadata["token_endpoint"], content=body, headers=headers
        )
        return token_answer(self.config.id, response)

    async def _userinfo(
        self, metadata: dict[str, Any], access_token: str, subject: str
    ) -> dict[str, Any]:
        url = metadata.get("userinfo_endpoint")
        if not isinstance(url, str):
            return {}
        info = await self.http.get_json(url, headers={"authorization": f"Bearer {access_token}"})
        # Only about the same user (OpenID Connect Core 5.3.2).
        if not isinstance(info, dict) or info.get("sub") != subject:
            return {}
        return {key: info[key] for key in ("email", "email_verified", "name") if key in info}

    def client_secret(self) -> str:
        if self._apple is not None:
            return self._apple.current(self.clock.now())
        if self.config.client_secret is None:
            raise ProviderUnreachable(f"{self.config.id}: no CLIENT_SECRET for the web redirect")
        return self.config.client_secret

    # -- ID tokens -------------------------------------------------------------------

    async def verify(
        self,
        token: str,
        *,
        audiences: tuple[str, ...],
        nonce: str | None,
        hashed_nonce: bool,
    ) -> dict[str, Any]:
        """The claims of a valid ID token; TokenRejected otherwise (ProviderUnreachable
        where the provider's keys cannot be had)."""
        try:
            header = jws.extract_compact(token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeEncodeError):
            raise TokenRejected("not a signed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRejected(f"alg {alg!r} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("kid is not a string")
        metadata = await self.metadata()
        offered = metadata.get("id_token_signing_alg_values_supported")
        if isinstance(offered, list) and alg not in offered:
            raise TokenRejected(f"alg {alg} is not one the provider signs with")
        keys = await self.keys(kid)
        try:
            decoded = jwt.decode(token, keys, algorithms=[alg])
        except (JoseError, ValueError) as exc:
            raise TokenRejected(f"signature: {exc.__class__.__name__}") from None
        claims = dict(decoded.claims)
        self._check_claims(claims, metadata, audiences)
        self._check_nonce(claims, nonce, hashed_nonce=hashed_nonce)
        return claims

    def _check_claims(
        self, claims: dict[str, Any], metadata: dict[str, Any], audiences: tuple[str, ...]
    ) -> None:
        issuer = claims.get("iss")
        accepted = {self.config.issuer, *self.config.issuer_aliases}
        template = metadata.get("issuer")
        if self.config.tenant_issuer and isinstance(template, str) and "{tenantid}" in template:
            tenant = claims.get("tid")
            accepted = (
                {template.replace("{tenantid}", tenant)} if isinstance(tenant, str) else set()
            )
        if issuer not in accepted:
            raise TokenRejected("iss is not the provider's")
        audience = claims.get("aud")
        given = [audience] if isinstance(audience, str) else audience
        if not isinstance(given, list) or not any(aud in audiences for aud in given):
            raise TokenRejected("aud is none of this provider's client ids")
        # OpenID Connect Core 3.1.3.7: refused where it also names an audience not trusted
        # (a token issued to another app as well is that app's to replay here).
        if not all(aud in audiences for aud in given):
            raise TokenRejected("aud names a client that is not this provider's")
        if len(given) > 1 and claims.get("azp") is not None and claims.get("azp") not in audiences:
            raise TokenRejected("azp is none of this provider's client ids")
        now = self.clock.now().timestamp()
        expires, issued = claims.get("exp"), claims.get("iat")
        if not isinstance(expires, int | float) or not isinstance(issued, int | float):
            raise TokenRejected("exp or iat is missing")
        skew = CLOCK_SKEW.total_seconds()
        if now >= expires + skew:
            raise TokenRejected("expired")
        if issued > now + skew:
            raise TokenRejected("issued in the future")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > SUBJECT_MAX:
            raise TokenRejected("sub is missing or too long")

    def _check_nonce(
        self, claims: dict[str, Any], nonce: str | None, *, hashed_nonce: bool
    ) -> None:
        carried = claims.get("nonce")
        if nonce is None:
            if carried is not None:
                raise TokenRejected("the token carries a nonce and none was given")
            return
        if not isinstance(carried, str):
            raise TokenRejected("the token carries no nonce")
        expected = [nonce, nonce_digest(nonce)] if hashed_nonce else [nonce]
        if not any(hmac.compare_digest(carried.encode(), value.encode()) for value in expected):
            raise TokenRejected("nonce mismatch")

    def identity(self, claims: dict[str, Any], *, name: str | None = None) -> ProvenIdentity:
        email = _address(claims.get("email"))
        return ProvenIdentity(
            provider=self.config.id,
            subject=claims["sub"],
            email=email,
            email_verified=email is not None and _is_true(claims.get("email_verified")),
            name=name or _text(claims.get("name"), NAME_MAX),
        )


def token_answer(provider_id: str, response: Any) -> dict[str, Any]:
    """A token endpoint's answer; ProviderUnreachable for an error or anything unusable
    (the provider's error code is logged, never its description verbatim to a user)."""
    try:
        body = json_of(response)
    except ProviderUnreachable:
        try:
            error = response.json().get("error") if response.status_code in (400, 401) else None
        except ValueError:
            error = None
        if isinstance(error, str):
            raise ProviderUnreachable(
                f"{provider_id}: the token endpoint refused: {error[:64]}"
            ) from None
        raise
    if not isinstance(body, dict):
        raise ProviderUnreachable(f"{provider_id}: the token answer is not an object")
    if "error" in body:
        raise ProviderUnreachable(
            f"{provider_id}: the token endpoint refused: {str(body['error'])[:64]}"
        )
    return body


def _apple_name(user_form: dict[str, Any] | None) -> str | None:
    """The name in Apple's `user` form field (sent at the first consent only)."""
    if not isinstance(user_form, dict):
        return None
    name = user_form.get("name")
    if not isinstance(name, dict):
        return None
    parts = [name.get("firstName"), name.get("lastName")]
    return _text(" ".join(part for part in parts if isinstance(part, str)), NAME_MAX)
