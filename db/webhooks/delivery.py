"""The delivering side of the webhooks: a dispatcher POSTs each endpoint's events, signed
per Standard Webhooks, at least once and in order.

What it guarantees, and how:

- At least once. A delivery row is written in the transaction of the change (see
  db/webhooks/events.py) and stays pending until an endpoint answered 2xx or it was given up.
  A dispatcher leases what it sends (claimed_until, claim_id) in a short transaction and
  holds no transaction open across the request; one that dies (or loses its database) only
  delays the delivery until the lease ends, then any dispatcher sends it again. A receiver
  deduplicates by `webhook-id`, the same on every attempt.
- In order, per endpoint. Only an endpoint's head, its pending delivery with the lowest
  event seq, is ever handed out, one request at a time: a failing head holds back the
  endpoint's later events until it is delivered or given up, while other endpoints go on.
  On PostgreSQL an event is handed out only once its transaction id is below the xmin of
  the current snapshot (every transaction that took its id no later than the event's own
  has ended), so an event of a transaction that began writing earlier but commits later,
  with a lower seq, is not overtaken by one written after it. An event whose transaction
  began writing after every running transaction began waits for those too: a long writing
  transaction delays deliveries until it ends. A change made after another committed is
  always delivered after it. SQLite has one writer: commit order is seq order.
- Endpoints are independent. The running dispatcher serves each endpoint in a loop of its
  own: once a delivery is recorded it claims that endpoint's next head at once, so an
  endpoint that answers slowly (or not at all, until WEBHOOK_TIMEOUT) delays only its own
  events. At most `concurrency` requests are in flight at a time, across endpoints; an
  endpoint's loop takes a slot per delivery, so one with a long backlog does not keep the
  others waiting for a slot either.
- Retries back off from 1 s, doubling (with a little jitter) up to WEBHOOK_RETRY_MAX_SECONDS;
  a delivery not made WEBHOOK_GIVE_UP_HOURS after it was queued (or replayed) is given up,
  a dead letter (failed_at) that `strawgate webhooks replay` queues again. When a head is
  given up, the deliveries waiting behind it that are as old are given up with it, without
  a request each (the endpoint has just failed). 2xx is success; every other status
  (redirects are not followed; 410 too: remove an endpoint from WEBHOOK_ENDPOINTS to stop
  it), a timeout (WEBHOOK_TIMEOUT) or a connection failure is retried.
- Deliveries to an endpoint this process does not have (not in its WEBHOOK_ENDPOINTS) are
  left alone until WEBHOOK_GIVE_UP_HOURS old, then given up like any other ("not configured
  here"): another process may have it (an old one during a rolling deployment, another
  service configured differently on the same database) and deliver them meanwhile; one that
  lacks an endpoint only gives up what nobody delivered for that long.

Woken in-process after a commit (WebhookEvents.wake), across processes by LISTEN/NOTIFY
(PostgreSQL), and polling every POLL_SECONDS regardless: each wake-up claims, in one short
transaction, the heads of the endpoints whose loop is not running, and starts their loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import aliased
from standardwebhooks.webhooks import Webhook

from db.background import KeptListen, finish_or_cancel
from db.clock import Clock
from db.mail.outbox import backoff
from db.models import WebhookDelivery, WebhookEvent
from db.providers.http import ProviderHttp, ProviderUnreachable
from db.services.batches import AnyOf, Batching, chosen, until_done
from db.session import Statements
from db.settings import Settings
from db.webhooks.events import CHANNEL, WebhookEvents, webhook_id
from db.webhooks.outbound import outbound_http, shown, warn_if_private_allowed

log = logging.getLogger("strawgate.webhooks")

POLL_SECONDS = 5.0
# How long a woken dispatcher waits before its round: the request that caused the event
# finishes its answer first, and the events of a burst share a round.
WAKE_DELAY = 0.05
# A lease is this many times WEBHOOK_TIMEOUT (at least MIN_LEASE): one request, and the
# recording of its result, end well within it.
LEASE_TIMEOUTS = 4
MIN_LEASE = timedelta(seconds=60)
ERROR_MAX = 255  # webhook_deliveries.last_error
# Deliveries to endpoints this process does not have: given up once WEBHOOK_GIVE_UP_HOURS
# old, looked for at start and this often (seconds).
ORPHAN_CHECK_SECONDS = 600.0
GIVE_UP_BATCH = 500  # rows given up in one transaction (waiting behind a head, orphans)

# What became of an attempt (the metric strawgate_webhook_deliveries_total's outcome):
# delivered, failed (to be retried) or given up (a dead letter).
Outcome = Literal["delivered", "failed", "given_up"]
OUTCOMES: tuple[Outcome, ...] = ("delivered", "failed", "given_up")

# The transaction id of PostgreSQL's oldest running transaction, as of this statement's
# snapshot: every event written by a transaction with a lower id is committed (or gone).
_XMIN = func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(Text).cast(BigInteger)


def _claim(postgres: bool) -> Any:
    """Leases the endpoint's head: its pending delivery with the lowest seq, if it is due,
    nobody holds it and (PostgreSQL) its event's transaction is below the xmin horizon.
    The head is found without skipping locked rows; only the head itself is locked with
    SKIP LOCKED, so a head another dispatcher is claiming makes this one skip the endpoint
    instead of taking the event behind it. The lock re-checks the row as it is then: a head
    delivered or claimed meanwhile is not taken."""
    pending = aliased(WebhookDelivery, name="pending")
    head = (
        select(func.min(pending.event_seq))
        .where(pending.endpoint == bindparam("url"), pending.next_attempt_at.is_not(None))
        .scalar_subquery()
    )
    candidate = aliased(WebhookDelivery, name="candidate")
    conditions = [
        candidate.endpoint == bindparam("url"),
        candidate.event_seq == head,
        candidate.next_attempt_at <= bindparam("now"),
        or_(candidate.claimed_until.is_(None), candidate.claimed_until <= bindparam("now")),
    ]
    if postgres:
        conditions.append(
            exists().where(WebhookEvent.seq == candidate.event_seq, WebhookEvent.txid < _XMIN)
        )
    locked = (
        select(candidate.event_seq)
        .where(*conditions)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint == bindparam("url"), WebhookDelivery.event_seq == locked)
        .values(claimed_until=bindparam("until"), claim_id=bindparam("mine"))
        .returning(WebhookDelivery.event_seq, WebhookDelivery.attempts, WebhookDelivery.created_at)
    )


_CLAIM_POSTGRES = _claim(postgres=True)
_CLAIM_SQLITE = _claim(postgres=False)
_EVENT = select(WebhookEvent.id, WebhookEvent.type, WebhookEvent.payload).where(
    WebhookEvent.seq == bindparam("seq")
)


def _this(delivery: Any = WebhookDelivery) -> Any:
    return and_(delivery.event_seq == bindparam("seq"), delivery.endpoint == bindparam("url"))


# Recorded whoever holds the row now: an event the endpoint took must not go out again,
# even if the lease ran out meanwhile and another dispatcher took it over.
_MARK_DELIVERED = (
    update(WebhookDelivery)
    .where(_this(), WebhookDelivery.delivered_at.is_(None))
    .values(
        delivered_at=bindparam("now"),
        failed_at=null(),
        next_attempt_at=null(),
        claimed_until=null(),
        claim_id=null(),
        attempts=WebhookDelivery.attempts + 1,
        last_status=bindparam("status"),
        last_error=null(),
    )
)
# Failures are recorded only while the claim is still ours: a dispatcher whose lease ran
# out never overwrites what the one that took the row over recorded.
_MARK_RETRY = (
    update(WebhookDelivery)
    .where(_this(), WebhookDelivery.claim_id == bindparam("mine"))
    .values(
        next_attempt_at=bindparam("retry_at"),
        claimed_until=null(),
        claim_id=null(),
        attempts=WebhookDelivery.attempts + 1,
        last_status=bindparam("status"),
        last_error=bindparam("error"),
    )
)
_MARK_GIVEN_UP = (
    update(WebhookDelivery)
    .where(_this(), WebhookDelivery.claim_id == bindparam("mine"))
    .values(
        failed_at=bindparam("now"),
        next_attempt_at=null(),
        claimed_until=null(),
        claim_id=null(),
        attempts=WebhookDelivery.attempts + 1,
        last_status=bindparam("status"),
        last_error=bindparam("error"),
    )
)
_RELEASE_ONE = (
    update(WebhookDelivery)
    .where(_this(), WebhookDelivery.claim_id == bindparam("mine"))
    .values(claimed_until=null(), claim_id=null())
)
# Per endpoint: the pending rows of one are found by ix_webhook_deliveries_pending.
_RELEASE_CLAIM = (
    update(WebhookDelivery)
    .where(
        WebhookDelivery.endpoint == bindparam("url"),
        WebhookDelivery.next_attempt_at.is_not(None),
        WebhookDelivery.claim_id == bindparam("mine"),
    )
    .values(claimed_until=null(), claim_id=null())
)


def _waiting() -> Any:
    """Pending deliveries of :url queued before :cutoff that nobody holds, at most
    :batch, oldest event first."""
    row = aliased(WebhookDelivery, name="waiting")
    picked = (
        select(row.event_seq)
        .where(
            row.endpoint == bindparam("url"),
            row.next_attempt_at.is_not(None),
            row.created_at < bindparam("cutoff"),
            or_(row.claimed_until.is_(None), row.claimed_until <= bindparam("now")),
        )
        .order_by(row.event_seq)
        .limit(bindparam("batch"))
        .with_for_update(skip_locked=True)
    )
    return (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint == bindparam("url"),
            WebhookDelivery.event_seq.in_(picked.scalar_subquery()),
        )
        .values(
            failed_at=bindparam("now"),
            next_attempt_at=null(),
            claimed_until=null(),
            claim_id=null(),
            last_error=bindparam("error"),
        )
    )


_GIVE_UP_WAITING = _waiting()
_PENDING_ENDPOINTS = (
    select(WebhookDelivery.endpoint)
    .where(WebhookDelivery.next_attempt_at.is_not(None))
    .group_by(WebhookDelivery.endpoint)
)


# Housekeeping: events older than the retention none of whose deliveries is pending
# (delivered or given up everywhere), found by ix_webhook_events_created_at; their
# deliveries go with them (ON DELETE CASCADE).
def _done_before(event: Any) -> Any:
    still_pending = exists().where(
        WebhookDelivery.event_seq == event.seq, WebhookDelivery.next_attempt_at.is_not(None)
    )
    return and_(event.created_at < bindparam("cutoff"), ~still_pending)


_PRUNE = delete(WebhookEvent).where(
    AnyOf(
        WebhookEvent.seq,
        chosen(WebhookEvent, _done_before, key="seq", order_by=lambda event: event.created_at),
    )
)


async def prune_webhook_events(
    statements: Statements, now: datetime, retention: timedelta, batching: Batching | None = None
) -> int:
    """Deletes the events older than `retention` that are delivered or given up at every
    endpoint (with their deliveries), in batches; how many events."""
    done = await until_done(
        statements,
        "webhook_events",
        _PRUNE,
        {"cutoff": now - retention},
        batching or Batching(),
    )
    return done.rows


def signature(signers: Sequence[Webhook], message_id: str, at: datetime, body: bytes) -> str:
    """`webhook-signature`: one `v1,` signature per secret, space-separated (a receiver that
    knows any one of the secrets verifies it: rotation)."""
    return " ".join(signer.sign(message_id, at, body) for signer in signers)


def signed_headers(
    signers: Sequence[Webhook], message_id: str, at: datetime, body: bytes
) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(math.floor(at.timestamp())),
        "webhook-signature": signature(signers, message_id, at, body),
    }


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """An endpoint's head this dispatcher holds a lease on, with its event."""

    event_seq: int
    endpoint: str
    claim_id: uuid.UUID
    claimed_until: datetime
    attempts: int  # made before this one
    created_at: datetime  # queued (or replayed): the give-up age counts from here
    event_id: uuid.UUID
    event_type: str
    payload: str

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.event_id)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    label: str
    signers: tuple[Webhook, ...]


class WebhookDispatcher:
    """Delivers the webhook events to the endpoints of `events` (WEBHOOK_ENDPOINTS); see
    the module's docstring. It owns `http`: stop() closes it."""

    def __init__(
        self,
        *,
        statements: Statements,
        events: WebhookEvents,
        http: ProviderHttp,
        clock: Clock,
        timeout: float,
        retry_max: timedelta,
        give_up_after: timedelta,
        lease: timedelta | None = None,
        poll_seconds: float = POLL_SECONDS,
        concurrency: int = 8,
    ) -> None:
        self._statements = statements
        self._events = events
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._retry_max = retry_max
        self._give_up_after = give_up_after
        self._lease = lease or max(MIN_LEASE, timedelta(seconds=LEASE_TIMEOUTS * timeout))
        self._poll_seconds = poll_seconds
        self._concurrency = concurrency
        self._postgres = statements.engine.dialect.name == "postgresql"
        self._claim_statement = _CLAIM_POSTGRES if self._postgres else _CLAIM_SQLITE
        self._endpoints = {
            endpoint.url: _Endpoint(
                url=endpoint.url,
                label=shown(endpoint.url),
                signers=tuple(Webhook(s.get_secret_value()) for s in endpoint.secrets),
            )
            for endpoint in events.endpoints
        }
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Claims whose rows may still be ours (one id per endpoint claimed), with the
        # endpoint and the lease's end: stop() releases them.
        self._claims: dict[uuid.UUID, tuple[str, datetime]] = {}
        # The endpoints whose loop runs (_serve), and those asked to look again before theirs
        # ends (a wake-up came while it ran: an event may have been committed behind it).
        self._serving: set[str] = set()
        self._again: set[str] = set()
        self._listen = KeptListen(
            statements,
            CHANNEL,
            self.wake,
            log=log,
            who="webhooks",
            what="new events",
            poll_seconds=self._poll_seconds,
        )
        self._round_failed = False
        self._next_retry: datetime | None = None
        self._orphans_checked: float | None = None
        # Counted per attempt (and per delivery given up unattempted): the app's metrics.
        self.on_outcome: Callable[[str, Outcome, int], None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        statements: Statements,
        events: WebhookEvents | None,
        clock: Clock,
    ) -> WebhookDispatcher:
        """The dispatcher of WEBHOOK_ENDPOINTS (those of `events`, the services' own)."""
        warn_if_private_allowed(settings)
        if events is None:  # no webhooks written: nothing to deliver either
            events = WebhookEvents(endpoints=(), clock=clock, postgres=not settings.is_sqlite)
        return cls(
            statements=statements,
            events=events,
            http=outbound_http(
                timeout=settings.webhook_timeout,
                allow_private=settings.webhook_allow_private,
                keep_body=False,
            ),
            clock=clock,
            timeout=settings.webhook_timeout,
            retry_max=timedelta(seconds=settings.webhook_retry_max_seconds),
            give_up_after=timedelta(hours=settings.webhook_give_up_hours),
        )

    @property
    def events(self) -> WebhookEvents:
        """The writing side whose endpoints this delivers to (it wakes this dispatcher)."""
        return self._events

    @property
    def labels(self) -> list[str]:
        """The endpoints as metrics and logs show them (outbound.shown: no path, no query)."""
        return [endpoint.label for endpoint in self._endpoints.values()]

    @property
    def listening(self) -> bool:
        """Whether NOTIFY from other processes reaches this dispatcher right now."""
        return self._listen.alive

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        """Starts the loop (and, on PostgreSQL, its LISTEN) in a task of its own; nothing
        without endpoints."""
        if self._task is not None or not self._endpoints:
            return
        self._stopping = False
        self._events.add_waker(self.wake)
        self._task = asyncio.create_task(self._run(), name="strawgate-webhooks")

    async def stop(self, grace: float = 5.0) -> None:
        """Stops claiming; requests in flight get `grace` seconds, then are cancelled; every
        claim still held is released so another dispatcher (or the next start) takes it.
        Closes the HTTP client: a stopped dispatcher is done."""
        self._stopping = True
        self._events.remove_waker(self.wake)
        task, self._task = self._task, None
        if task is not None:
            self._wakeup.set()
            await finish_or_cancel(
                task,
                grace=grace,
                log=log,
                overdue="webhooks: deliveries still running after %ss were cancelled; they"
                " stay queued",
                failed="webhooks: the loop failed",
            )
        await self._listen.stop()
        await self._release_all()
        await self._http.aclose()

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        self._serving.clear()
        self._again.clear()
        try:
            # The endpoints' loops are this task's children: stop() waits for them (the
            # requests in flight) and, past its grace, cancels them with it.
            async with asyncio.TaskGroup() as loops:
                while not self._stopping:
                    self._wakeup.clear()  # a wake-up from here on means another round
                    if self._postgres:
                        await self._listen.keep()
                    try:
                        if self._orphans_due():
                            await self.give_up_orphans()
                        await self._start_loops(loops, slots)
                    except Exception as exc:  # the database is down, say: the next round retries
                        self._cannot_read(exc)
                    else:
                        if self._round_failed:
                            log.info("webhooks: the deliveries can be read again")
                        self._round_failed = False
                    if self._stopping:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), self._wait_seconds())
                        await asyncio.sleep(WAKE_DELAY)
        finally:
            await self._listen.stop()

    def _cannot_read(self, exc: Exception) -> None:
        if not self._round_failed:
            log.warning(
                "webhooks: cannot read the deliveries (%s); retrying every %ss",
                type(exc).__name__,
                self._poll_seconds,
            )
        self._round_failed = True

    async def _start_loops(self, loops: asyncio.TaskGroup, slots: asyncio.Semaphore) -> None:
        """Claims the heads of the endpoints whose loop is not running (one transaction) and
        starts a loop for each head claimed; a running loop is asked to look once more."""
        idle = []
        for url in self._endpoints:
            if url in self._serving:
                self._again.add(url)
            else:
                idle.append(url)
        for delivery in await self.claim(idle):
            self._serving.add(delivery.endpoint)
            loops.create_task(
                self._serve(delivery, slots), name=f"strawgate-webhooks {delivery.endpoint}"
            )

    async def _serve(self, first: ClaimedDelivery, slots: asyncio.Semaphore) -> None:
        """One endpoint's loop: delivers `first`, then claims and delivers the endpoint's
        next head as soon as one is recorded, until none is ready (or an attempt failed: its
        retry is not due yet). One request at a time, each within a slot."""
        url = first.endpoint
        delivery: ClaimedDelivery | None = first
        try:
            while not self._stopping:
                async with slots:
                    if self._stopping:
                        break  # a head claimed and not sent stays noted: stop() releases it
                    if delivery is None:
                        self._again.discard(url)
                        claimed = await self.claim([url])
                        if not claimed:
                            if url in self._again:
                                continue  # woken meanwhile: look once more
                            break
                        delivery = claimed[0]
                    result = await self._deliver_one(delivery)
                if result is not None:
                    self._claims.pop(delivery.claim_id, None)
                if not result:
                    break
                delivery = None
        except Exception as exc:  # claiming failed (the database is down, say)
            self._cannot_read(exc)
        finally:
            self._serving.discard(url)

    def _wait_seconds(self) -> float:
        """Until the next poll, or sooner when a retry this process scheduled is due."""
        if self._next_retry is None:
            return self._poll_seconds
        due_in = (self._next_retry - self._clock.now()).total_seconds()
        if due_in <= 0:
            self._next_retry = None
            return self._poll_seconds
        return min(self._poll_seconds, max(due_in, WAKE_DELAY))

    def _orphans_due(self) -> bool:
        now = time.monotonic()
        if self._orphans_checked is None or now - self._orphans_checked >= ORPHAN_CHECK_SECONDS:
            self._orphans_checked = now
            return True
        return False

    async def run_once(self) -> int:
        """Claims every endpoint's head that is ready and delivers them; how many it
        claimed (at most one per endpoint)."""
        claimed, _delivered = await self._round()
        return claimed

    async def _round(self) -> tuple[int, int]:
        deliveries = await self.claim()
        delivered = await self.deliver(deliveries) if deliveries else 0
        return len(deliveries), delivered

    async def claim(self, urls: Sequence[str] | None = None) -> list[ClaimedDelivery]:
        """One short transaction leases the head of every endpoint (or of those of `urls`)
        that is ready (none once stopping); each endpoint's under a claim id of its own."""
        urls = list(self._endpoints) if urls is None else [u for u in urls if u in self._endpoints]
        if self._stopping or not urls:
            return []
        now = self._clock.now()
        for old, (_url, until) in list(self._claims.items()):
            if until <= now:
                del self._claims[old]  # the lease ran out: nothing left to release
        until = now + self._lease
        mine = {url: uuid.uuid4() for url in urls}
        # Noted before the claim commits: a cancellation right after it still releases.
        for url, claim_id in mine.items():
            self._claims[claim_id] = (url, until)
        claimed: list[ClaimedDelivery] = []
        async with self._statements.transaction() as tx:
            for url, claim_id in mine.items():
                row = await tx.first(
                    self._claim_statement,
                    {"url": url, "now": now, "until": until, "mine": claim_id},
                )
                if row is None:
                    continue
                event = await tx.first(_EVENT, {"seq": row["event_seq"]})
                assert event is not None  # noqa: S101 - the foreign key holds it
                claimed.append(
                    ClaimedDelivery(
                        event_seq=row["event_seq"],
                        endpoint=url,
                        claim_id=claim_id,
                        claimed_until=until,
                        attempts=row["attempts"],
                        created_at=row["created_at"],
                        event_id=event["id"],
                        event_type=event["type"],
                        payload=event["payload"],
                    )
                )
        taken = {delivery.claim_id for delivery in claimed}
        for claim_id in mine.values():
            if claim_id not in taken:
                self._claims.pop(claim_id, None)
        return claimed

    async def deliver(self, deliveries: Sequence[ClaimedDelivery]) -> int:
        """Sends claimed deliveries (one per endpoint), `concurrency` at a time, with no
        transaction open, and records each result; how many were delivered. (run_once's
        round: the running dispatcher serves each endpoint in a loop of its own.)"""
        slots = asyncio.Semaphore(self._concurrency)
        results: list[bool | None] = []

        async def one(delivery: ClaimedDelivery) -> None:
            async with slots:
                if self._stopping:
                    return  # not started: its claim stays noted, stop() releases it
                result = await self._deliver_one(delivery)
            results.append(result)
            if result is not None:
                self._claims.pop(delivery.claim_id, None)

        async with asyncio.TaskGroup() as group:
            for delivery in deliveries:
                group.create_task(one(delivery))
        return sum(1 for result in results if result)

    async def _deliver_one(self, delivery: ClaimedDelivery) -> bool | None:
        """True when delivered, False when it failed (recorded), None when the result could
        not be recorded (the row stays claimed until stop() or the lease's end)."""
        try:
            return await self._send_and_record(delivery)
        except Exception as exc:  # recording failed (the database is down, say)
            log.warning(
                "webhook %s to %s: the result could not be recorded (%s)",
                delivery.webhook_id,
                self._label(delivery.endpoint),
                type(exc).__name__,
            )
            return None

    async def _send_and_record(self, delivery: ClaimedDelivery) -> bool | None:
        endpoint = self._endpoints[delivery.endpoint]
        now = self._clock.now()
        if (delivery.claimed_until - now).total_seconds() < self._timeout:
            # Too little of the lease is left for a whole request: another dispatcher could
            # take it over mid-request and send it again, and the next event alongside.
            await self._record(_RELEASE_ONE, delivery, {})
            return False
        body = delivery.payload.encode("utf-8")
        headers = signed_headers(endpoint.signers, delivery.webhook_id, now, body)
        status: int | None = None
        try:
            response = await self._http.request(
                "POST", delivery.endpoint, content=body, headers=headers
            )
        except ProviderUnreachable as exc:
            error = str(exc)
        except Exception as exc:  # a client that broke its contract: retried all the same
            log.error(
                "webhook %s to %s: the request failed unexpectedly (%s)",
                delivery.webhook_id,
                endpoint.label,
                type(exc).__name__,
            )
            error = f"unexpected {type(exc).__name__}"
        else:
            status = response.status_code
            if 200 <= status < 300:
                await self.mark_delivered(delivery, status)
                return True
            error = f"HTTP {status}"
            if 300 <= status < 400:
                error += " (a redirect: not followed; configure the URL it leads to)"
        await self.mark_failed(delivery, error, status)
        return False

    async def mark_delivered(self, delivery: ClaimedDelivery, status: int) -> bool:
        """Records a delivery; False if it was recorded already (by another dispatcher)."""
        done = await self._record(
            _MARK_DELIVERED, delivery, {"now": self._clock.now(), "status": status}, held=False
        )
        self._count(delivery.endpoint, "delivered")
        log.info(
            "webhook %s (%s) delivered to %s (attempt %d, HTTP %d)",
            delivery.webhook_id,
            delivery.event_type,
            self._label(delivery.endpoint),
            delivery.attempts + 1,
            status,
        )
        return done

    async def mark_failed(
        self, delivery: ClaimedDelivery, error: str, status: int | None = None
    ) -> bool:
        """Records a failed attempt: retried after a backoff, or given up once the delivery
        is WEBHOOK_GIVE_UP_HOURS old. False if the claim was lost."""
        now = self._clock.now()
        attempts = delivery.attempts + 1
        if now - delivery.created_at >= self._give_up_after:
            return await self.mark_given_up(delivery, error, status)
        delay = backoff(attempts, self._retry_max)
        retry_at = now + delay
        held = await self._record(
            _MARK_RETRY,
            delivery,
            {"retry_at": retry_at, "status": status, "error": _short(error)},
        )
        self._count(delivery.endpoint, "failed")
        if held:
            if self._next_retry is None or retry_at < self._next_retry:
                self._next_retry = retry_at
            log.warning(
                "webhook %s (%s) to %s: attempt %d failed (%s); next try in %.0fs",
                delivery.webhook_id,
                delivery.event_type,
                self._label(delivery.endpoint),
                attempts,
                _short(error),
                delay.total_seconds(),
            )
        return held

    async def mark_given_up(
        self, delivery: ClaimedDelivery, error: str, status: int | None = None
    ) -> bool:
        """Makes the delivery a dead letter, and those waiting behind it queued as long ago
        with it; False if the claim was lost."""
        now = self._clock.now()
        held = await self._record(
            _MARK_GIVEN_UP, delivery, {"now": now, "status": status, "error": _short(error)}
        )
        if not held:
            return False
        self._count(delivery.endpoint, "given_up")
        label = self._label(delivery.endpoint)
        log.warning(
            "webhook %s (%s) to %s given up after %d attempt(s): %s",
            delivery.webhook_id,
            delivery.event_type,
            label,
            delivery.attempts + 1,
            _short(error),
        )
        behind = await self._give_up_waiting(
            delivery.endpoint,
            cutoff=now - self._give_up_after,
            error=f"not sent: queued more than WEBHOOK_GIVE_UP_HOURS ago, behind event"
            f" {delivery.webhook_id}, which failed ({_short(error)})",
        )
        if behind:
            log.warning(
                "webhooks to %s: %d more given up unsent, older than WEBHOOK_GIVE_UP_HOURS"
                " and behind it",
                label,
                behind,
            )
        return True

    async def _give_up_waiting(self, url: str, *, cutoff: datetime, error: str) -> int:
        """Gives up the endpoint's pending deliveries queued before `cutoff` (in batches)."""
        now = self._clock.now()
        total = 0
        while True:
            async with self._statements.transaction() as tx:
                done = await tx.execute(
                    _GIVE_UP_WAITING,
                    {
                        "url": url,
                        "cutoff": cutoff,
                        "now": now,
                        "batch": GIVE_UP_BATCH,
                        "error": _short(error),
                    },
                )
            total += done
            if done:
                self._count(url, "given_up", done)
            if done < GIVE_UP_BATCH:
                return total

    async def give_up_orphans(self) -> int:
        """Gives up the pending deliveries to endpoints this process does not have (not in
        its WEBHOOK_ENDPOINTS) queued (or replayed) more than WEBHOOK_GIVE_UP_HOURS ago: any
        process that has the endpoint would have delivered or given them up by then; how
        many."""
        async with self._statements.connection() as conn:
            pending = await conn.scalars(_PENDING_ENDPOINTS, {})
        total = 0
        for url in pending:
            if url in self._endpoints:
                continue
            given_up = await self._give_up_waiting(
                url,
                cutoff=self._clock.now() - self._give_up_after,
                error="not sent: queued more than WEBHOOK_GIVE_UP_HOURS ago to an endpoint"
                " not configured here (not in WEBHOOK_ENDPOINTS)",
            )
            if given_up:
                log.warning(
                    "webhooks: gave up %d delivery(ies) to %s, not configured here (not in"
                    " WEBHOOK_ENDPOINTS), queued more than WEBHOOK_GIVE_UP_HOURS ago",
                    given_up,
                    shown(url),
                )
            total += given_up
        return total

    async def _record(
        self,
        statement: Any,
        delivery: ClaimedDelivery,
        params: Mapping[str, Any],
        *,
        held: bool = True,
    ) -> bool:
        async with self._statements.transaction() as tx:
            done = await tx.execute(
                statement,
                {
                    **params,
                    "seq": delivery.event_seq,
                    "url": delivery.endpoint,
                    "mine": delivery.claim_id,
                },
            )
        if not done and held:
            log.info(
                "webhook %s to %s: the lease ran out and another dispatcher took it over",
                delivery.webhook_id,
                self._label(delivery.endpoint),
            )
        return done > 0

    async def _release_all(self) -> None:
        claims, self._claims = self._claims, {}
        if not claims:
            return
        try:
            async with self._statements.transaction() as tx:
                for claim_id, (url, _until) in claims.items():
                    await tx.execute(_RELEASE_CLAIM, {"url": url, "mine": claim_id})
        except Exception as exc:  # their leases run out by themselves
            log.warning("webhooks: claims could not be released (%s)", type(exc).__name__)

    def _label(self, url: str) -> str:
        endpoint = self._endpoints.get(url)
        return endpoint.label if endpoint is not None else shown(url)

    def _count(self, url: str, outcome: Outcome, n: int = 1) -> None:
        if self.on_outcome is not None:
            self.on_outcome(self._label(url), outcome, n)


def _short(error: str) -> str:
    return " ".join(error.split())[:ERROR_MAX]
