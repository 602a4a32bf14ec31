"""The per-request context: request, response, services, and the lazily checked bearer token."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from strawberry.exceptions import StrawberryGraphQLError

from db.security.access import InvalidAccessToken
from db.services.auth import AuthService, ClientInfo, UserView
from db.settings import Settings

UNAUTHENTICATED = "UNAUTHENTICATED"
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


@dataclass(slots=True)
class Context:
    request: Request
    response: Response
    services: AppServices
    request_id: str
    _user: object = field(default=_UNSET)

    @property
    def client(self) -> ClientInfo:
        # request.client is what uvicorn resolved, proxy headers included where trusted.
        host = self.request.client.host if self.request.client else None
        return ClientInfo(ip=host, user_agent=self.request.headers.get("user-agent"))

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
            view = await auth.current_user(auth.decode_access_token(token)) if token else None
        except InvalidAccessToken:
            view = None
        if view is None:
            self._user = unauthenticated_error()
            raise self._user
        self._user = view
        return view
