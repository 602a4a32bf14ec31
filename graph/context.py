"""The per-request context: request, response, services, and the lazily checked bearer token."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from strawberry.exceptions import StrawberryGraphQLError

from db.mail.languages import bounded_accept_language
from db.security.access import AccessClaims, InvalidAccessToken
from db.services.account import AccountService
from db.services.auth import AuthService
from db.services.events import SecurityEvents
from db.services.lifecycle import LifecycleService
from db.services.passkeys import PasskeyService
from db.services.types import ClientInfo, UserView
from db.settings import Settings
from graph.metrics import Metrics

UNAUTHENTICATED = "UNAUTHENTICATED"
DEVICE_COOKIE = "strawgate_device"
REFRESH_COOKIE = "strawgate_refresh"
GRAPHQL_PATH = "/graphql"
_UNSET = object()


def unauthenticated_error() -> StrawberryGraphQLError:
    return StrawberryGraphQLError(
        "The access token is invalid or its session has ended.",
        extensions={"code": UNAUTHENTICATED},
    )


@dataclass(slots=True)
class AppServices:
    """What lives as long as the app: built in create_app, started in the lifespan."""

    settings: Settings
    auth: AuthService
    account: AccountService
    lifecycle: LifecycleService
    events: SecurityEvents
    metrics: Metrics
    passkeys: PasskeyService


def client_of(request: Request) -> ClientInfo:
    """Who asks: request.client is what uvicorn resolved, proxy headers included where
    trusted; the device token is the cookie's (an input's wins: Context.client_with)."""
    return ClientInfo(
        ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        device_token=request.cookies.get(DEVICE_COOKIE),
        accept_language=bounded_accept_language(request.headers.get("accept-language")),
    )


@dataclass(slots=True)
class Context:
    request: Request
    response: Response
    services: AppServices
    request_id: str
    _user: object = field(default=_UNSET)
    _claims: AccessClaims | None = None
    # The signed-in user's profile and locale, read once for the fields asking for them.
    profile: tuple[str, str | None] | None = None

    @property
    def client(self) -> ClientInfo:
        return client_of(self.request)

    def client_with(self, device_token: str | None) -> ClientInfo:
        """The client, with the device token an input carries (it wins over a cookie)."""
        client = self.client
        if device_token:
            return dataclasses.replace(client, device_token=device_token)
        return client

    @property
    def refresh_in_cookie(self) -> bool:
        return self.services.settings.refresh_token_transport == "cookie"  # noqa: S105

    def refresh_token(self, given: str | None) -> str | None:
        """The refresh token an input gives, else (cookie transport) the cookie's."""
        if given:
            return given
        return self.request.cookies.get(REFRESH_COOKIE) if self.refresh_in_cookie else None

    def hand_out_refresh_token(self, token: str) -> bool:
        """Sets the refresh-token cookie under cookie transport; whether the token goes in
        the answer's body instead (it never does then: JavaScript must not see it)."""
        if not self.refresh_in_cookie:
            return True
        self.response.set_cookie(
            REFRESH_COOKIE,
            token,
            max_age=self.services.settings.refresh_token_expire_days * 86400,
            path=GRAPHQL_PATH,
            httponly=True,
            secure=True,
            samesite="strict",
        )
        return False

    def clear_refresh_cookie(self) -> None:
        if self.refresh_in_cookie:
            self.response.delete_cookie(
                REFRESH_COOKIE, path=GRAPHQL_PATH, httponly=True, secure=True, samesite="strict"
            )

    def hand_out_device_token(self, token: str | None) -> bool:
        """Sets the device-token cookie where tokens travel as cookies; whether the token
        goes in the answer's body instead."""
        settings = self.services.settings
        if settings.device_token_transport != "cookie":  # noqa: S105 - a mode
            return True
        if token:
            self.response.set_cookie(
                DEVICE_COOKIE,
                token,
                max_age=settings.device_token_days * 86400,
                path="/graphql",
                httponly=True,
                secure=settings.is_production,
                samesite=settings.device_cookie_samesite,
            )
        return False

    def bearer_token(self) -> str | None:
        """The token of an `Authorization: Bearer` header; "" when the header is present
        but not a bearer token; None when there is no header."""
        header = self.request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    async def user(self) -> UserView | None:
        """The signed-in user, checked once per request: None without a bearer token;
        an UNAUTHENTICATED error when the token fails or its session has ended."""
        if self._user is not _UNSET:
            if isinstance(self._user, Exception):
                raise self._user
            return self._user  # type: ignore[return-value]
        token = self.bearer_token()
        if token is None:
            self._user = None
            return None
        auth = self.services.auth
        try:
            claims = auth.decode_access_token(token) if token else None
            current = await auth.current_user(claims) if claims else None
        except InvalidAccessToken:
            current = None
        if current is None:
            self._user = unauthenticated_error()
            raise self._user
        # The claims as the session row has them (auth_time is the session's own).
        self._user, self._claims = current
        return current[0]

    async def signed_in(self) -> tuple[UserView, AccessClaims]:
        """The user and the claims of a request that a permission class let through as
        signed in."""
        view = await self.user()
        if view is None or self._claims is None:
            raise unauthenticated_error()
        return view, self._claims
