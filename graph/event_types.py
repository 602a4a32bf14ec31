"""GraphQL types of the user's security log (the contract's abuse.graphql)."""

from __future__ import annotations

from datetime import datetime

import strawberry

from db.services.events import EventKind, EventView, Page

SecurityEventKind = strawberry.enum(EventKind, name="SecurityEventKind")

# The contract's descriptions of single values (db/ knows nothing of Strawberry).
_VALUE_DESCRIPTIONS = {
    EventKind.IDENTITY_LINKED.name: (
        "A provider account was linked (from settings, or at a sign-in)."
    ),
    EventKind.IDENTITY_UNLINKED.name: "A provider account was unlinked.",
    EventKind.PASSKEY_CLONE_SUSPECTED.name: (
        "A sign-in refused because the passkey's sign count went backwards (a possible clone)."
    ),
}
for _value in SecurityEventKind.__strawberry_definition__.values:  # type: ignore[attr-defined]
    _value.description = _VALUE_DESCRIPTIONS.get(_value.name, _value.description)


@strawberry.type(
    description="One security-relevant thing that happened to the signed-in user's account."
)
class SecurityEvent:
    id: strawberry.ID
    at: datetime
    kind: SecurityEventKind  # type: ignore[valid-type]
    ip_address: str | None
    user_agent: str | None
    session_id: strawberry.ID | None

    @classmethod
    def from_view(cls, view: EventView) -> SecurityEvent:
        return cls(
            id=strawberry.ID(str(view.id)),
            at=view.at,
            kind=view.kind,
            ip_address=view.ip,
            user_agent=view.user_agent,
            session_id=strawberry.ID(str(view.session_id)) if view.session_id else None,
        )


@strawberry.type
class SecurityEventEdge:
    cursor: str
    node: SecurityEvent


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class SecurityEventConnection:
    edges: list[SecurityEventEdge]
    page_info: PageInfo

    @classmethod
    def from_page(cls, page: Page) -> SecurityEventConnection:
        return cls(
            edges=[
                SecurityEventEdge(cursor=view.cursor, node=SecurityEvent.from_view(view))
                for view in page.events
            ],
            page_info=PageInfo(has_next_page=page.has_next_page, end_cursor=page.end_cursor),
        )
