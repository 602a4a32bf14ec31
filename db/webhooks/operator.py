"""What an operator sees and does from the command line (`strawgate webhooks list|replay`):
the deliveries per endpoint, the recent dead letters, and queueing dead letters again.
Nothing shown here is a payload or a secret: events by id and type, endpoints as
db/webhooks/outbound.py's shown() shows them (scheme, host and port, a hash of the rest)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, Uuid, bindparam, func, literal, or_, select, update

from db.base import UTCDateTime
from db.models import WebhookDelivery, WebhookEvent
from db.session import Statements
from db.webhooks.events import CHANNEL, webhook_id
from db.webhooks.outbound import names, shown

RECENT_DEAD_LETTERS = 10

_pending = WebhookDelivery.next_attempt_at.is_not(None)
_COUNTS = select(
    WebhookDelivery.endpoint,
    func.count().filter(_pending).label("pending"),
    func.count().filter(WebhookDelivery.delivered_at.is_not(None)).label("delivered"),
    func.count().filter(WebhookDelivery.failed_at.is_not(None)).label("dead"),
    func.min(WebhookDelivery.created_at).filter(_pending).label("oldest_pending"),
).group_by(WebhookDelivery.endpoint)
_DEAD_LETTERS = (
    select(
        WebhookEvent.id,
        WebhookEvent.type,
        WebhookDelivery.endpoint,
        WebhookDelivery.attempts,
        WebhookDelivery.last_status,
        WebhookDelivery.last_error,
        WebhookDelivery.failed_at,
    )
    .join(WebhookEvent, WebhookEvent.seq == WebhookDelivery.event_seq)
    .where(WebhookDelivery.failed_at.is_not(None))
    .order_by(WebhookDelivery.failed_at.desc(), WebhookDelivery.event_seq.desc())
    .limit(bindparam("n"))
)

# Each filter applies when given (NULL: any).
_ENDPOINT = bindparam("url", type_=String)
_SINCE = bindparam("since", type_=UTCDateTime)
_EVENT_ID = bindparam("event_id", type_=Uuid)
# Queued again as if new: due now, no attempts yet, and WEBHOOK_GIVE_UP_HOURS counted
# from now (created_at is when a delivery was queued, or queued again).
_REPLAY = (
    update(WebhookDelivery)
    .where(
        WebhookDelivery.failed_at.is_not(None),
        or_(_ENDPOINT.is_(None), WebhookDelivery.endpoint == _ENDPOINT),
        or_(_SINCE.is_(None), WebhookDelivery.failed_at >= _SINCE),
        or_(
            _EVENT_ID.is_(None),
            WebhookDelivery.event_seq.in_(
                select(WebhookEvent.seq).where(WebhookEvent.id == _EVENT_ID).scalar_subquery()
            ),
        ),
    )
    .values(
        failed_at=None,
        next_attempt_at=bindparam("now"),
        created_at=bindparam("now"),
        attempts=0,
        claimed_until=None,
        claim_id=None,
        last_status=None,
        last_error=None,
    )
)
_NOTIFY = select(func.pg_notify(literal(CHANNEL), literal("")))
_DEAD_ENDPOINTS = (
    select(WebhookDelivery.endpoint)
    .where(WebhookDelivery.failed_at.is_not(None))
    .group_by(WebhookDelivery.endpoint)
)


@dataclass(frozen=True, slots=True)
class EndpointCounts:
    endpoint: str  # as shown: scheme, host, port and a hash of the rest
    configured: bool
    pending: int
    delivered: int
    dead: int
    oldest_pending: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: uuid.UUID
    type: str
    endpoint: str  # as shown
    attempts: int
    last_status: int | None
    last_error: str | None
    failed_at: datetime

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.event_id)


@dataclass(frozen=True, slots=True)
class QueueReport:
    at: datetime
    endpoints: list[EndpointCounts]
    dead_letters: list[DeadLetter]

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "endpoints": [
                {
                    "endpoint": counts.endpoint,
                    "configured": counts.configured,
                    "pending": counts.pending,
                    "delivered": counts.delivered,
                    "dead": counts.dead,
                    "oldest_pending_seconds": None
                    if counts.oldest_pending is None
                    else max(0.0, (self.at - counts.oldest_pending).total_seconds()),
                }
                for counts in self.endpoints
            ],
            "dead_letters": [
                {
                    "event_id": str(letter.event_id),
                    "webhook_id": letter.webhook_id,
                    "type": letter.type,
                    "endpoint": letter.endpoint,
                    "attempts": letter.attempts,
                    "last_status": letter.last_status,
                    "last_error": letter.last_error,
                    "failed_at": letter.failed_at.isoformat(),
                }
                for letter in self.dead_letters
            ],
        }


async def queue_report(
    statements: Statements,
    *,
    configured: Sequence[str],
    now: datetime,
    recent: int = RECENT_DEAD_LETTERS,
) -> QueueReport:
    """Every endpoint's deliveries (the configured ones first, in their order; then any
    other that has rows) and the `recent` newest dead letters."""
    async with statements.connection() as conn:
        rows = await conn.all(_COUNTS, {})
        letters = await conn.all(_DEAD_LETTERS, {"n": recent})
    found = {row["endpoint"]: row for row in rows}
    endpoints = [
        *configured,
        *sorted(url for url in found if url not in set(configured)),
    ]
    counts = []
    for url in endpoints:
        row = found.get(url)
        counts.append(
            EndpointCounts(
                endpoint=shown(url),
                configured=url in configured,
                pending=int(row["pending"]) if row else 0,
                delivered=int(row["delivered"]) if row else 0,
                dead=int(row["dead"]) if row else 0,
                oldest_pending=_aware(row["oldest_pending"]) if row else None,
            )
        )
    return QueueReport(
        at=now,
        endpoints=counts,
        dead_letters=[
            DeadLetter(
                event_id=letter["id"],
                type=letter["type"],
                endpoint=shown(letter["endpoint"]),
                attempts=letter["attempts"],
                last_status=letter["last_status"],
                last_error=letter["last_error"],
                failed_at=_aware(letter["failed_at"]) or now,
            )
            for letter in letters
        ],
    )


async def replay(
    statements: Statements,
    *,
    now: datetime,
    event_id: uuid.UUID | None = None,
    endpoint: str | None = None,
    since: datetime | None = None,
) -> int:
    """Queues the dead letters that match (all of them without a filter) again, as new
    deliveries (no attempts yet, due now); how many. `endpoint` is its URL or the endpoint
    as `list` shows it. The dispatchers of running servers are woken (PostgreSQL)."""
    async with statements.transaction() as tx:
        urls: list[str | None] = [None]
        if endpoint is not None:
            dead_at = await tx.scalars(_DEAD_ENDPOINTS, {})
            urls = [url for url in dead_at if names(endpoint, url)]
        count = 0
        for url in urls:
            count += await tx.execute(
                _REPLAY, {"now": now, "event_id": event_id, "url": url, "since": since}
            )
        if count and statements.engine.dialect.name == "postgresql":
            await tx.first(_NOTIFY, {})
    return count


def _aware(value: datetime | str | None) -> datetime | None:
    """An aggregate's timestamp: PostgreSQL gives an aware datetime; SQLite (min() of a
    column keeps no type there) may give the stored text, naive UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
