"""What the webhook delivery tests share: endpoints, events written as services write
them, dispatcher rounds, and the delivery rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import BigInteger, Text, func, select

from db.models import WebhookDelivery, WebhookEvent
from db.session import Statements
from db.settings import WebhookEndpointSettings
from db.webhooks.delivery import WebhookDispatcher
from db.webhooks.events import WebhookEvents
from tests.conftest import MutableClock
from tests.webhooks.receiver import secret_for

SECRET = secret_for("one")
OLD_SECRET = secret_for("old")
NEW_SECRET = secret_for("new")
LEASE = timedelta(seconds=60)
# A dispatcher's rounds: on PostgreSQL an event is handed out once every transaction that
# began writing before it has ended, anywhere on the cluster (other tests' too): a round
# that finds nothing ready is tried again, briefly, before a test concludes anything.
SETTLE = 10.0


MakeDispatcher = Callable[..., WebhookDispatcher]


def endpoint(url: str, *secrets: str, events: list[str] | None = None) -> WebhookEndpointSettings:
    return WebhookEndpointSettings.model_validate(
        {"url": url, "secrets": list(secrets or [SECRET]), "events": events}
    )


def emitter(
    statements: Statements, endpoints: Sequence[WebhookEndpointSettings], clock: MutableClock
) -> WebhookEvents:
    return WebhookEvents(
        endpoints=endpoints,
        clock=clock,
        postgres=statements.engine.dialect.name == "postgresql",
    )


async def emit(
    statements: Statements, events: WebhookEvents, event_type: str = "user.created", **data: Any
) -> uuid.UUID:
    """One event, written as a service writes it: in a transaction of its own."""
    async with statements.transaction() as tx:
        event_id = await events.emit(
            tx, event_type, user_id=uuid.uuid4(), data={"email": "ada@example.com", **data}
        )
    assert event_id is not None
    events.wake()
    return event_id


async def settled(dispatcher: WebhookDispatcher, expected: int) -> int:
    """run_once, and again (briefly) until `expected` were claimed in all; how many were."""
    claimed = await dispatcher.run_once()
    deadline = asyncio.get_running_loop().time() + SETTLE
    while claimed < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        claimed += await dispatcher.run_once()
    return claimed


# Events whose transaction is not yet below the xmin horizon (statements are constants).
_NOT_HANDED_OUT = (
    select(func.count())
    .select_from(WebhookEvent)
    .where(
        WebhookEvent.txid
        >= func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(Text).cast(BigInteger)
    )
)


async def handed_out(statements: Statements) -> None:
    """PostgreSQL: until every event written so far may be handed out (below the xmin
    horizon, which other tests' transactions on the cluster may hold back), briefly."""
    if statements.engine.dialect.name != "postgresql":
        return
    deadline = asyncio.get_running_loop().time() + SETTLE
    while True:
        async with statements.connection() as conn:
            if not (await conn.scalars(_NOT_HANDED_OUT, {}))[0]:
                return
        assert asyncio.get_running_loop().time() < deadline, "the xmin horizon did not pass"
        await asyncio.sleep(0.05)


async def deliveries(statements: Statements) -> list[dict[str, Any]]:
    async with statements.connection() as conn:
        rows = await conn.all(
            select(WebhookDelivery, WebhookEvent.id.label("event_id"))
            .join(WebhookEvent, WebhookEvent.seq == WebhookDelivery.event_seq)
            .order_by(WebhookDelivery.event_seq, WebhookDelivery.endpoint),
            {},
        )
    return [dict(row) for row in rows]


async def delivery(statements: Statements, event_id: uuid.UUID, url: str) -> dict[str, Any]:
    (row,) = [
        row
        for row in await deliveries(statements)
        if row["event_id"] == event_id and row["endpoint"] == url
    ]
    return row


async def payload_of(statements: Statements, event_id: uuid.UUID) -> str:
    async with statements.connection() as conn:
        row = await conn.first(select(WebhookEvent.payload).where(WebhookEvent.id == event_id), {})
    assert row is not None
    return str(row["payload"])
