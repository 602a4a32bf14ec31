"""The writing side of the webhooks: an event is a row written in the transaction of the
change it reports (and one delivery row per endpoint that wants it), so a committed change
always produces its event and a rolled-back one never does."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Text, bindparam, func, insert, literal, null, select

from db.clock import Clock
from db.models import WebhookDelivery, WebhookEvent
from db.session import Runner
from db.settings import Settings, WebhookEndpointSettings
from db.webhooks.catalogue import EVENT_TYPES

CHANNEL = "strawgate_webhooks"  # NOTIFY'd by every emit on PostgreSQL

# The transaction's own id (PostgreSQL): see WebhookEvent.txid.
_TXID = func.pg_current_xact_id().cast(Text).cast(BigInteger)


def _insert_event(postgres: bool) -> Any:
    return (
        insert(WebhookEvent)
        .values(
            id=bindparam("event_id"),
            type=bindparam("type"),
            user_id=bindparam("user_id"),
            payload=bindparam("payload"),
            created_at=bindparam("now"),
            txid=_TXID if postgres else null(),
        )
        .returning(WebhookEvent.seq)
    )


_INSERT_DELIVERY = insert(WebhookDelivery).values(
    event_seq=bindparam("seq"),
    endpoint=bindparam("endpoint"),
    created_at=bindparam("now"),
    next_attempt_at=bindparam("now"),
    attempts=literal(0),
)
_NOTIFY = select(func.pg_notify(literal(CHANNEL), literal("")))


def webhook_id(event_id: uuid.UUID) -> str:
    """The `webhook-id` header (and the payload's id): the same on every attempt."""
    return f"msg_{event_id.hex}"


def timestamp(at: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, as Standard Webhooks' examples."""
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


class WebhookEvents:
    """Services emit events in their own transactions; `wake` after the commit."""

    def __init__(
        self,
        *,
        endpoints: Sequence[WebhookEndpointSettings],
        clock: Clock,
        postgres: bool,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self._clock = clock
        self._postgres = postgres
        self._insert_event = _insert_event(postgres)
        self._wakers: set[Callable[[], None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock) -> WebhookEvents:
        """The server's and the command line's: every process that changes accounts writes
        the events of WEBHOOK_ENDPOINTS."""
        return cls(
            endpoints=settings.webhook_endpoints, clock=clock, postgres=not settings.is_sqlite
        )

    def wanted(self, event_type: str) -> list[str]:
        """The URLs of the endpoints that get `event_type`."""
        return [endpoint.url for endpoint in self.endpoints if endpoint.wants(event_type)]

    async def emit(
        self,
        tx: Runner,
        event_type: str,
        *,
        user_id: uuid.UUID | None,
        data: Mapping[str, Any] | None = None,
    ) -> uuid.UUID | None:
        """Writes the event in `tx` for every endpoint that wants it (none: nothing is
        written): it goes out only if `tx` commits. `data` holds the facts (never a
        secret); the user id leads it. The event's id, or None when nobody wants it."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown webhook event type {event_type!r}")
        endpoints = self.wanted(event_type)
        if not endpoints:
            return None
        now = self._clock.now()
        event_id = uuid.uuid4()
        body = {
            "type": event_type,
            "timestamp": timestamp(now),
            "data": _jsonable({"user_id": user_id, **dict(data or {})}),
        }
        row = await tx.first(
            self._insert_event,
            {
                "event_id": event_id,
                "type": event_type,
                "user_id": user_id,
                "payload": orjson.dumps(body).decode("utf-8"),
                "now": now,
            },
        )
        assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
        for endpoint in endpoints:
            await tx.execute(
                _INSERT_DELIVERY, {"seq": row["seq"], "endpoint": endpoint, "now": now}
            )
        if self._postgres:
            await tx.execute(_NOTIFY, {})
        return event_id

    def wake(self) -> None:
        """Tells this process's dispatcher to look now; call it after the commit."""
        for wake in list(self._wakers):
            wake()

    def add_waker(self, wake: Callable[[], None]) -> None:
        self._wakers.add(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        self._wakers.discard(wake)
