"""securityEvents: the signed-in user's own security log."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.types import Info

from db.errors import AuthFailure
from graph.context import Context
from graph.event_types import SecurityEventConnection
from graph.permissions import IsAuthenticated


@strawberry.type
class EventsQuery:
    @strawberry.field(
        description=(
            "The signed-in user's own events, newest first; first defaults to 20, at most "
            "100; cursors are opaque."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def security_events(
        self,
        info: Info[Context, Any],
        first: int | None = strawberry.UNSET,
        after: str | None = strawberry.UNSET,
    ) -> SecurityEventConnection:
        ctx = info.context
        user, _claims = await ctx.signed_in()
        try:
            page = await ctx.services.events.page(
                ctx.services.auth.statements,
                user_id=user.id,
                first=None if first is strawberry.UNSET else first,
                after=None if after is strawberry.UNSET else after,
            )
        except AuthFailure as failure:
            # A negative `first` or a cursor this server did not make: the caller's mistake,
            # answered as a GraphQL error (the connection has no error member).
            raise StrawberryGraphQLError(
                failure.message, extensions={"code": failure.code.value, "field": failure.field}
            ) from None
        return SecurityEventConnection.from_page(page)
