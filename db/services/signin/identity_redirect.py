"""The web redirect through an identity provider (the contract's identities.graphql): a flow
started at GET /auth/<provider>/authorize (or by startIdentityLink), the provider's callback,
and exchangeSignInCode. Who the provider proved is handed to signin/identity.py, which
makes the account decisions (or the link) and ends in conclude, as every way in does.

A flow holds digests only: its state (sent to the provider and back), the browser binding
(the strawgate_oauth cookie of the browser that started it: a callback from another
browser is refused and spends nothing), and the one-time code (60 s, single use) that
goes back to the app. The nonce and the PKCE verifier sent to the provider are derived
from the state under a key of the server's, never stored. The app's own PKCE challenge
(S256 only) is checked at the exchange before the code is spent, so a code intercepted on
its way back can be neither used nor used up.

What the provider said of the user is vetted before the flow keeps it (signin/identity.py
`vetted`): an answer that cannot be kept comes back as PROVIDER_ERROR. What a provider or a
callback's query sent is logged quoted (repr), so it cannot write a log line of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from sqlalchemy import bindparam, insert, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_input
from db.models import IdentityFlow
from db.providers.http import ProviderUnreachable
from db.providers.oidc import ProvenIdentity, TokenRejected
from db.providers.registry import IdentityProviders
from db.security.access import AccessClaims
from db.security.limiter import RateLimiter, client_key
from db.security.tokens import new_opaque_token, token_digest
from db.services.sessions import Sessions
from db.services.signin.identity import IdentitySignIns, provider_error, vetted
from db.services.types import ClientInfo, IssuedChallenge, IssuedSession, UserView
from db.session import Statements

log = logging.getLogger("strawgate.identities")

SIGN_IN = "SIGN_IN"
LINK = "LINK"
# The provider step must come back within this; the one-time code it yields lives 60 s.
FLOW_LIFETIME = timedelta(minutes=10)
CODE_LIFETIME = timedelta(seconds=60)
UNBOUND = bytes(32)  # a link flow's browser binding before its browser came by
# RFC 7636: a verifier is 43-128 unreserved characters; an S256 challenge 43 base64url.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_BINDING = re.compile(r"[A-Za-z0-9_-]{43}")
# A provider's `error` that means the user said no.
CANCELLED_ERRORS = frozenset({"access_denied", "user_cancelled_authorize", "consent_required"})

_ADD_FLOW = insert(IdentityFlow).values(
    id=bindparam("flow_id"),
    state_hash=bindparam("state_hash"),
    browser_hash=bindparam("browser_hash"),
    provider=bindparam("provider"),
    purpose=bindparam("purpose"),
    user_id=bindparam("uid"),
    session_id=bindparam("session_id"),
    redirect_to=bindparam("redirect_to"),
    code_challenge=bindparam("code_challenge"),
    created_at=bindparam("now"),
    expires_at=bindparam("expires_at"),
)
_FLOW_BY_STATE = select(
    IdentityFlow.id,
    IdentityFlow.provider,
    IdentityFlow.purpose,
    IdentityFlow.browser_hash,
    IdentityFlow.redirect_to,
    IdentityFlow.expires_at,
    IdentityFlow.returned_at,
).where(IdentityFlow.state_hash == bindparam("state_hash"))
# A link flow's first visit by a browser: bound to it, with the state sent to the provider.
_BIND_LINK_FLOW = (
    update(IdentityFlow)
    .where(
        IdentityFlow.state_hash == bindparam("start_hash"),
        IdentityFlow.purpose == LINK,
        IdentityFlow.browser_hash == UNBOUND,
        IdentityFlow.expires_at > bindparam("now"),
    )
    .values(state_hash=bindparam("state_hash"), browser_hash=bindparam("browser_hash"))
    .returning(IdentityFlow.provider)
)
# The state is spent by the first callback that carries it (and the bound browser).
_RETURNED = (
    update(IdentityFlow)
    .where(
        IdentityFlow.id == bindparam("flow_id"),
        IdentityFlow.returned_at.is_(None),
        IdentityFlow.expires_at > bindparam("now"),
    )
    .values(returned_at=bindparam("now"))
    .returning(IdentityFlow.id)
)
_PROVEN = (
    update(IdentityFlow)
    .where(IdentityFlow.id == bindparam("flow_id"))
    .values(
        code_hash=bindparam("code_hash"),
        code_expires_at=bindparam("code_expires_at"),
        subject=bindparam("subject"),
        email=bindparam("email"),
        email_verified=bindparam("email_verified"),
        name=bindparam("name"),
    )
)
_FLOW_BY_CODE = select(
    IdentityFlow.id,
    IdentityFlow.provider,
    IdentityFlow.purpose,
    IdentityFlow.user_id,
    IdentityFlow.session_id,
    IdentityFlow.code_challenge,
    IdentityFlow.subject,
    IdentityFlow.email,
    IdentityFlow.email_verified,
    IdentityFlow.name,
).where(
    IdentityFlow.code_hash == bindparam("code_hash"),
    IdentityFlow.exchanged_at.is_(None),
    IdentityFlow.code_expires_at > bindparam("now"),
)
_EXCHANGED = (
    update(IdentityFlow)
    .where(IdentityFlow.id == bindparam("flow_id"), IdentityFlow.exchanged_at.is_(None))
    .values(exchanged_at=bindparam("now"))
    .returning(IdentityFlow.id)
)


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where the browser goes next, and the binding cookie to set (None: leave it)."""

    url: str
    binding: str | None = None


class FlowNotFound(Exception):
    """A callback or start whose state (or link) names no flow this server knows: answered
    with a 400 page, never a redirect (there is no checked place to return to)."""


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def with_params(url: str, **params: str) -> str:
    """`url` with `params` added to its query (what it had kept)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


class IdentityRedirects:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        limiter: RateLimiter,
        sessions: Sessions,
        sign_ins: IdentitySignIns,
        flow_key: bytes,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.limiter = limiter
        self.sessions = sessions
        self.sign_ins = sign_ins
        self.providers: IdentityProviders = sign_ins.providers
        self._flow_key = flow_key

    # -- the web redirect ------------------------------------------------------------

    def _derived(self, state: str, purpose: str) -> str:
        """The nonce or PKCE verifier of the flow whose state this is: derived, so the
        database holds nothing that completes a flow."""
        mac = hmac.new(self._flow_key, f"{purpose}:{state}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def _checked_start(
        self, provider_id: str, redirect_to: str, code_challenge: str, method: str
    ) -> None:
        provider = self.providers.get(provider_id)
        if not provider.config.web_sign_in:
            raise invalid_input(
                f"{provider.config.name} is set up for native apps only (no client secret).",
                "provider",
            )
        if not self.providers.is_allowed_redirect(redirect_to):
            raise invalid_input(
                "redirectTo is not one of the configured redirect URLs.", "redirectTo"
            )
        if method != "S256":
            raise invalid_input(
                "code_challenge_method must be S256 (plain is refused).", "codeChallenge"
            )
        if not _CHALLENGE.fullmatch(code_challenge):
            raise invalid_input(
                "codeChallenge must be the S256 challenge: 43 base64url characters.",
                "codeChallenge",
            )

    async def start(
        self,
        *,
        provider_id: str,
        redirect_to: str,
        code_challenge: str,
        code_challenge_method: str,
        binding: str | None,
        client: ClientInfo,
    ) -> Redirect:
        """GET /auth/<provider>/authorize: a flow, and the provider's authorize URL. The
        browser's binding cookie is kept where it has one (several tabs may sign in at
        once), else made. INVALID_INPUT for a request that is not one (the route answers
        400); PROVIDER_ERROR where the provider cannot be reached."""
        self._checked_start(provider_id, redirect_to, code_challenge, code_challenge_method)
        await self.limiter.hit("start_identity_sign_in_ip", client_key(client.ip))
        binding = binding if binding and _BINDING.fullmatch(binding) else new_opaque_token()
        state = new_opaque_token()
        url = await self._authorize_url(provider_id, state)
        await self._add_flow(
            state_hash=token_digest(state),
            browser_hash=token_digest(binding),
            provider_id=provider_id,
            purpose=SIGN_IN,
            redirect_to=redirect_to,
            code_challenge=code_challenge,
        )
        return Redirect(url=url, binding=binding)

    async def _add_flow(
        self,
        *,
        state_hash: bytes,
        browser_hash: bytes,
        provider_id: str,
        purpose: str,
        redirect_to: str,
        code_challenge: str,
        user_id: uuid.UUID | None = None,
        session_id: uuid.UUID | None = None,
    ) -> None:
        now = self.clock.now()
        try:
            async with self.statements.transaction() as tx:
                await tx.execute(
                    _ADD_FLOW,
                    {
                        "flow_id": uuid.uuid4(),
                        "state_hash": state_hash,
                        "browser_hash": browser_hash,
                        "provider": provider_id,
                        "purpose": purpose,
                        "uid": user_id,
                        "session_id": session_id,
                        "redirect_to": redirect_to,
                        "code_challenge": code_challenge,
                        "now": now,
                        "expires_at": now + FLOW_LIFETIME,
                    },
                )
        except UniqueViolation:
            # A challenge is used once: one seen before may be a victim's, copied from a
            # URL by whoever wants the victim to exchange the copier's code (login CSRF).
            raise invalid_input(
                "This codeChallenge was used before: make a new PKCE pair for every sign-in.",
                "codeChallenge",
            ) from None

    async def _authorize_url(self, provider_id: str, state: str) -> str:
        provider = self.providers.get(provider_id)
        try:
            return await provider.authorize_url(
                redirect_uri=self.providers.callback_url(provider_id),
                state=state,
                nonce=self._derived(state, "nonce"),
                code_challenge=s256(self._derived(state, "pkce")),
            )
        except ProviderUnreachable as exc:
            log.warning("identity provider %s: %r", provider_id, str(exc))
            raise provider_error(provider.config.name) from None

    async def start_link(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        provider_id: str,
        redirect_to: str,
        code_challenge: str,
        client: ClientInfo,
    ) -> str:
        """startIdentityLink: a link flow for this session (a recent sign-in), not yet
        bound to a browser; the URL it answers binds the browser that opens it first."""
        self.sessions.require_recent(claims)
        self._checked_start(provider_id, redirect_to, code_challenge, "S256")
        await self.limiter.hit("start_identity_sign_in_ip", client_key(client.ip))
        start = new_opaque_token()
        await self._add_flow(
            state_hash=token_digest(start),
            browser_hash=UNBOUND,
            provider_id=provider_id,
            purpose=LINK,
            redirect_to=redirect_to,
            code_challenge=code_challenge,
            user_id=user.id,
            session_id=claims.session_id,
        )
        return f"{self.providers.public_url}/auth/{provider_id}/authorize?" + urlencode(
            {"link": start}
        )

    async def start_linking_browser(
        self, *, provider_id: str, link: str, binding: str | None, client: ClientInfo
    ) -> Redirect:
        """GET /auth/<provider>/authorize?link=...: the first browser to open a link flow's
        URL is bound to it, and sent on to the provider. FlowNotFound for a link that is
        unknown, spent or expired."""
        provider = self.providers.get(provider_id)
        await self.limiter.hit("start_identity_sign_in_ip", client_key(client.ip))
        binding = binding if binding and _BINDING.fullmatch(binding) else new_opaque_token()
        state = new_opaque_token()
        try:
            url = await self._authorize_url(provider_id, state)
        except AuthFailure as failure:
            # The provider cannot be reached: back to the app, the link not spent (it may
            # be opened again while it lives).
            async with self.statements.connection() as conn:
                flow = await conn.first(_FLOW_BY_STATE, {"state_hash": token_digest(link)})
            if flow is None or flow["provider"] != provider.config.id:
                raise FlowNotFound from None
            return _error(flow["redirect_to"], "PROVIDER_ERROR", failure.message)
        async with self.statements.transaction() as tx:
            bound = await tx.first(
                _BIND_LINK_FLOW,
                {
                    "start_hash": token_digest(link),
                    "state_hash": token_digest(state),
                    "browser_hash": token_digest(binding),
                    "now": self.clock.now(),
                },
            )
            if bound is None or bound["provider"] != provider.config.id:
                raise FlowNotFound
        return Redirect(url=url, binding=binding)

    async def callback(
        self, *, provider_id: str, params: Mapping[str, str], binding: str | None
    ) -> Redirect:
        """GET|POST /auth/<provider>/callback: the provider's answer for a flow. Back to the
        flow's redirect URL with a one-time code where the provider step succeeded, else
        with error=CANCELLED, PROVIDER_ERROR or INVALID_TOKEN (a state spent or expired, or
        another browser than the one that started). FlowNotFound for an unknown state."""
        state = params.get("state") or ""
        provider = self.providers.get(provider_id)
        now = self.clock.now()
        async with self.statements.connection() as conn:
            flow = await conn.first(_FLOW_BY_STATE, {"state_hash": token_digest(state)})
        if flow is None or flow["provider"] != provider_id:
            raise FlowNotFound
        back = flow["redirect_to"]
        if binding is None or not hmac.compare_digest(token_digest(binding), flow["browser_hash"]):
            log.warning("identity provider %s: a callback from another browser", provider_id)
            return _error(back, "INVALID_TOKEN", "This sign-in was started in another browser.")
        async with self.statements.transaction() as tx:
            returned = await tx.first(_RETURNED, {"flow_id": flow["id"], "now": now})
        if returned is None:
            return _error(back, "INVALID_TOKEN", "This sign-in has expired or was used already.")
        error = params.get("error")
        if error is not None:
            if error in CANCELLED_ERRORS:
                return _error(
                    back, "CANCELLED", f"The sign-in with {provider.config.name} was cancelled."
                )
            log.warning("identity provider %s answered error=%r", provider_id, error[:64])
            return _error(back, "PROVIDER_ERROR", f"{provider.config.name} refused the sign-in.")
        code = params.get("code")
        if not code:
            return _error(back, "PROVIDER_ERROR", f"{provider.config.name} sent no code back.")
        try:
            identity = vetted(
                await provider.complete(
                    code=code,
                    redirect_uri=self.providers.callback_url(provider_id),
                    code_verifier=self._derived(state, "pkce"),
                    nonce=self._derived(state, "nonce"),
                    user_form=_json_object(params.get("user")),
                )
            )
        except (ProviderUnreachable, TokenRejected) as exc:
            log.warning("identity provider %s: %r", provider_id, str(exc))
            return _error(
                back, "PROVIDER_ERROR", f"The sign-in with {provider.config.name} failed."
            )
        one_time = new_opaque_token()
        async with self.statements.transaction() as tx:
            await tx.execute(
                _PROVEN,
                {
                    "flow_id": flow["id"],
                    "code_hash": token_digest(one_time),
                    "code_expires_at": self.clock.now() + CODE_LIFETIME,
                    "subject": identity.subject,
                    "email": identity.email,
                    "email_verified": identity.email_verified,
                    "name": identity.name,
                },
            )
        return Redirect(url=with_params(back, code=one_time))

    async def exchange(
        self,
        *,
        code: str,
        code_verifier: str,
        client: ClientInfo,
        bearer: AccessClaims | None,
    ) -> IssuedSession | IssuedChallenge:
        """exchangeSignInCode: the one-time code of a redirect and the app's PKCE verifier.
        A sign-in flow's identity signs in (the account decisions); a link flow's is linked
        to the user whose session started it (`bearer` must be that session's)."""
        await self.limiter.hit("login_ip", client_key(client.ip))
        if not _VERIFIER.fullmatch(code_verifier):
            raise invalid_input(
                "codeVerifier must be 43 to 128 characters: letters, digits, '-', '.', '_', '~'.",
                "codeVerifier",
            )
        now = self.clock.now()
        async with self.statements.connection() as conn:
            flow = await conn.first(_FLOW_BY_CODE, {"code_hash": token_digest(code), "now": now})
        if flow is None:
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                "This sign-in code is invalid or has expired.",
                field="code",
            )
        # Checked before the code is spent: a code intercepted on its way back cannot be
        # used, nor used up, without the app's verifier.
        if not hmac.compare_digest(s256(code_verifier).encode(), flow["code_challenge"].encode()):
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                "codeVerifier does not match the code's challenge.",
                field="codeVerifier",
            )
        if flow["purpose"] == LINK and (
            bearer is None
            or bearer.session_id != flow["session_id"]
            or bearer.user_id != flow["user_id"]
        ):
            raise AuthFailure(
                ErrorCode.INVALID_TOKEN,
                "Send the bearer token of the session that started this link.",
            )
        identity = ProvenIdentity(
            provider=flow["provider"],
            subject=flow["subject"],
            email=flow["email"],
            email_verified=bool(flow["email_verified"]),
            name=flow["name"],
        )
        if flow["purpose"] != LINK:
            # Counted before the code is spent: RATE_LIMITED leaves it for a retry.
            await self.sign_ins.count(identity)
        async with self.statements.transaction() as tx:
            if await tx.first(_EXCHANGED, {"flow_id": flow["id"], "now": now}) is None:
                raise AuthFailure(
                    ErrorCode.INVALID_TOKEN, "This sign-in code was used already.", field="code"
                )
        if flow["purpose"] == LINK:
            return await self.sign_ins.link(identity, flow["user_id"], flow["session_id"], client)
        return await self.sign_ins.sign_in(identity, client, counted=True)


def _error(url: str, code: str, description: str) -> Redirect:
    return Redirect(url=with_params(url, error=code, error_description=description))


def _json_object(text: str | None) -> dict[str, Any] | None:
    if not text or len(text) > 4096:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
