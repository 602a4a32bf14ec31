"""GET /metrics in Prometheus's text format, for operators only: reachable from the
networks in METRICS_ALLOW_NETWORKS (loopback by default) or with METRICS_TOKEN as a
bearer token; anyone else gets a 404, as if there were nothing there.

What it shows so far: where the rate limits count (and whether Redis is away), and the
rate-limit refusals by limit. The registry is the app's own (several apps in one process,
as in the tests, do not share one)."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from math import nan
from typing import Any, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from db.mail.outbox import MailFailure
from db.models import OutboxMail, WebhookDelivery
from db.security.limiter import RateLimiter, Status
from db.services.housekeeping import KINDS as HOUSEKEEPING_KINDS
from db.settings import ConfigError, Settings
from db.webhooks.delivery import OUTCOMES as WEBHOOK_OUTCOMES
from db.webhooks.delivery import Outcome as WebhookOutcome
from db.webhooks.outbound import shown

_OUTBOX_PENDING = select(func.count(OutboxMail.id).label("pending")).where(
    OutboxMail.next_attempt_at.is_not(None)
)
_WEBHOOKS_PENDING = (
    select(
        WebhookDelivery.endpoint,
        func.count().label("pending"),
        func.min(WebhookDelivery.created_at).label("oldest"),
    )
    .where(WebhookDelivery.next_attempt_at.is_not(None))
    .group_by(WebhookDelivery.endpoint)
)

STORES = get_args(Status)
MAIL_FAILURES = get_args(MailFailure)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rate_limit_store = Gauge(
            "strawgate_rate_limit_store",
            "Where the rate limits count: 1 for the current store.",
            ["store"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.rate_limit_degraded = Gauge(
            "strawgate_rate_limit_degraded",
            "1 while a configured Redis is unreachable and limits count per process.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.rate_limited = Counter(
            "strawgate_rate_limited",
            "Requests refused by a rate limit, by limit.",
            ["limit"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "strawgate_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "strawgate_http_request_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.operations = Counter(
            "strawgate_operations",
            "GraphQL mutations answering AuthResult, by field and outcome (the answer's"
            " type, or its AuthError code).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.logins = Counter(
            "strawgate_logins",
            "login answers by result: AuthSession, OtpChallenge or the AuthError code.",
            ["result"],
            registry=self.registry,
        )
        self.mail_failures = Counter(
            "strawgate_mail_failures",
            "Failed attempts to send a mail, by reason: undecryptable (its code is sealed"
            " under a key missing from this process's ENCRYPTION_KEYS), unrenderable; and"
            " what the mail server did: connection_refused, timeout, tls (STARTTLS not"
            " offered, the handshake, the certificate), auth (login refused or impossible),"
            " rejected (a 5xx refusal), unavailable (a 4xx refusal), other.",
            ["reason"],
            registry=self.registry,
        )
        for reason in MAIL_FAILURES:
            self.mail_failures.labels(reason=reason)
        self.outbox_pending = Gauge(
            "strawgate_outbox_pending",
            "Mails waiting in the outbox (all processes).",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.db_pool_connections = Gauge(
            "strawgate_db_pool_connections",
            "The request path's PostgreSQL connections, by state (per process under"
            " several workers: the pid label).",
            ["state"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.housekeeping_deleted = Counter(
            "strawgate_housekeeping_deleted",
            "Rows housekeeping removed, by kind: challenges, unverified_users,"
            " mail_secrets (mails whose secrets were erased), outbox_rows, security_events,"
            " ended_sessions, spent_generations, throttles. Counted batch by batch, so a"
            " long pass shows its progress.",
            ["kind"],
            registry=self.registry,
        )
        for kind in HOUSEKEEPING_KINDS:
            self.housekeeping_deleted.labels(kind=kind)
        self.webhook_deliveries = Counter(
            "strawgate_webhook_deliveries",
            "Webhook deliveries by endpoint (its scheme, host and port and a short hash of its"
            " path and query string: https://hooks.example.com/…#a1b2c3d4) and outcome:"
            " delivered (a 2xx answer), failed (another answer, a timeout or a connection"
            " failure: retried), given_up (a dead letter, counted also for deliveries given"
            " up unsent: behind a failing one, or to an endpoint not configured here).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.webhook_pending = Gauge(
            "strawgate_webhook_pending",
            "Webhook deliveries waiting, by endpoint (all processes; read at scrape time).",
            ["endpoint"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.webhook_oldest_pending = Gauge(
            "strawgate_webhook_oldest_pending_seconds",
            "Age of the oldest waiting webhook delivery, by endpoint: since it was queued (or"
            " replayed); 0 when none waits.",
            ["endpoint"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self._webhook_endpoints: set[str] = set()

    def webhook_outcome(self, endpoint: str, outcome: WebhookOutcome, count: int = 1) -> None:
        """WebhookDispatcher.on_outcome: `count` deliveries to `endpoint` (as shown)."""
        self.webhook_deliveries.labels(endpoint=endpoint, outcome=outcome).inc(count)

    def webhook_queue(
        self, configured: list[str], rows: list[Mapping[str, Any]] | None, now: datetime
    ) -> None:
        """The waiting deliveries per endpoint (`rows` of _WEBHOOKS_PENDING; None: the
        database did not answer). Every endpoint seen once keeps a value (0 when none waits)."""
        labels = {shown(url) for url in configured}
        for label in labels:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhook_deliveries.labels(endpoint=label, outcome=outcome)
        found: dict[str, tuple[int, float]] = {}
        for row in rows or ():
            label = shown(row["endpoint"])
            pending, oldest = found.get(label, (0, 0.0))
            age = max(0.0, (now - row["oldest"]).total_seconds()) if row["oldest"] else 0.0
            found[label] = (pending + int(row["pending"]), max(oldest, age))
        self._webhook_endpoints |= labels | set(found)
        for label in self._webhook_endpoints:
            pending, age = found.get(label, (0, 0.0))
            self.webhook_pending.labels(endpoint=label).set(pending if rows is not None else nan)
            self.webhook_oldest_pending.labels(endpoint=label).set(age if rows is not None else nan)

    def housekept(self, kind: str, rows: int) -> None:
        """Housekeeper.on_deleted: `rows` of `kind` removed."""
        self.housekeeping_deleted.labels(kind=kind).inc(rows)

    def operation(self, name: str, outcome: str) -> None:
        self.operations.labels(operation=name, outcome=outcome).inc()
        if name == "login":
            self.logins.labels(result=outcome).inc()

    def observe(self, limiter: RateLimiter) -> None:
        status = limiter.status
        for store in STORES:
            self.rate_limit_store.labels(store=store).set(1 if store == status else 0)
        self.rate_limit_degraded.set(1 if limiter.degraded else 0)


def allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for part in settings.metrics_allow_networks.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"METRICS_ALLOW_NETWORKS: {part.strip()!r} is no network"
                ) from None
    return networks


def metrics_endpoint(
    settings: Settings, metrics: Callable[[Request], tuple[Metrics, RateLimiter]]
) -> Callable[[Request], Awaitable[Response]]:
    networks = allowed_networks(settings)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    def permitted(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if token and scheme.lower() == "bearer":
            return hmac.compare_digest(presented.strip().encode(), token.encode())
        host = request.client.host if request.client else None
        try:
            address = ipaddress.ip_address(host) if host else None
        except ValueError:
            address = None
        return address is not None and any(address in network for network in networks)

    async def endpoint(request: Request) -> Response:
        if not permitted(request):
            return PlainTextResponse("Not Found", status_code=404)
        registry, limiter = metrics(request)
        registry.observe(limiter)
        statements = request.app.state.services.auth.statements
        try:
            async with statements.connection() as conn:
                pending = await conn.first(_OUTBOX_PENDING, {})
            registry.outbox_pending.set(pending["pending"] if pending else 0)
        except Exception:  # the database is away: the other figures still answer
            registry.outbox_pending.set(float("nan"))
        configured = [endpoint.url for endpoint in settings.webhook_endpoints]
        try:
            async with statements.connection() as conn:
                waiting: list[Mapping[str, Any]] | None = await conn.all(_WEBHOOKS_PENDING, {})
        except Exception:
            waiting = None
        registry.webhook_queue(configured, waiting, request.app.state.services.auth.clock.now())
        size, idle = statements.pool_use()
        registry.db_pool_connections.labels(state="open").set(size)
        registry.db_pool_connections.labels(state="idle").set(idle)
        return Response(generate_latest(exposed(registry)), media_type=CONTENT_TYPE_LATEST)

    return endpoint


def exposed(metrics: Metrics) -> CollectorRegistry:
    """This process's registry; under several workers (PROMETHEUS_MULTIPROC_DIR, set by
    `strawgate serve --workers N`) every worker's values, summed where they add up."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
