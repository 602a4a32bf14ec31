"""Permission classes: every check of the caller's identity goes through one of these."""

from __future__ import annotations

from typing import Any

from strawberry.exceptions import StrawberryGraphQLError
from strawberry.permission import BasePermission
from strawberry.types import Info

from graph.context import UNAUTHENTICATED, Context


class BearerTokenValid(BasePermission):
    """A bearer token, when one is sent, must be valid and its session live.
    No token passes (the field then answers for an anonymous caller)."""

    message = "The access token is invalid or its session has ended."
    error_extensions = {"code": UNAUTHENTICATED}  # noqa: RUF012

    async def has_permission(self, source: Any, info: Info[Context, Any], **kwargs: Any) -> bool:
        try:
            await info.context.user()
        except StrawberryGraphQLError:
            return False  # a database failure is not a refusal: it propagates
        return True


class IsAuthenticated(BasePermission):
    """A valid bearer token of a live session is required."""

    message = "Sign in first: this operation needs a valid access token."
    error_extensions = {"code": UNAUTHENTICATED}  # noqa: RUF012

    async def has_permission(self, source: Any, info: Info[Context, Any], **kwargs: Any) -> bool:
        try:
            return await info.context.user() is not None
        except StrawberryGraphQLError:
            return False
