"""GET /metrics: requests by route and status with latency, operations and logins by
outcome, outbox depth and the database pool, for operators only."""

from __future__ import annotations

import re

import httpx
from starlette.applications import Starlette

from tests.conftest import PASSWORD, client_for, unique_email
from tests.gql import login, signup


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text."""
    rendered = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(f"{name}{{{rendered}}}" if labels else name) + r" ([0-9.e+-]+|NaN)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, (name, labels, text[:2000])
    return float(found.group(1))


async def test_metrics_count_what_operators_watch(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    await login(client, email, PASSWORD)
    await login(client, email, "a wrong password")
    async with client_for(app, ip="127.0.0.1") as local:
        text = (await local.get("/metrics")).text
    assert sample(text, "strawgate_logins_total", result="AuthSession") == 1
    assert sample(text, "strawgate_logins_total", result="INVALID_CREDENTIALS") == 1
    assert (
        sample(text, "strawgate_operations_total", operation="signup", outcome="AuthSession") == 1
    )
    assert sample(text, "strawgate_http_requests_total", route="/graphql", status="200") == 3
    assert sample(text, "strawgate_http_request_seconds_count", route="/graphql") == 3
    assert sample(text, "strawgate_outbox_pending") >= 0
    assert sample(text, "strawgate_db_pool_connections", state="open") >= 1
    assert PASSWORD not in text and email not in text


async def test_metrics_are_not_public(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 404  # 203.0.113.7: not allowlisted


async def test_mail_failures_count_every_cause_from_zero(app: Starlette) -> None:
    async with client_for(app, ip="127.0.0.1") as local:
        text = (await local.get("/metrics")).text
    causes = ("connection_refused", "timeout", "tls", "auth", "rejected", "unavailable", "other")
    for reason in ("undecryptable", "unrenderable", *causes):
        assert sample(text, "strawgate_mail_failures_total", reason=reason) == 0
    assert 'reason="undeliverable"' not in text
