"""/readyz and /metrics while the mail server refuses: degraded, still ready, counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from db.mail.outbox import DEGRADED_AFTER
from db.settings import Settings
from graph.app import create_app
from graph.metrics import MAIL_FAILURES
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import signup
from tests.graph.test_metrics import sample
from tests.smtp import SmtpSink


@pytest.fixture
async def busy_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    smtp.refuse = True
    app = create_app(make_settings(require_email_verification=True, **smtp.settings()), clock=clock)
    async with app.router.lifespan_context(app):
        yield app


async def failures(local: httpx.AsyncClient, reason: str) -> float:
    return sample(
        (await local.get("/metrics")).text, "strawgate_mail_failures_total", reason=reason
    )


async def until_counted(app: Starlette, local: httpx.AsyncClient, count: int) -> None:
    """Until the count of 451 refusals reaches `count`, whichever round made the attempt."""
    deadline = time.monotonic() + 5.0
    while await failures(local, "unavailable") < count:
        assert time.monotonic() < deadline, f"not {count} failures within 5 s"
        await app.state.mail_sender.run_once()
        await asyncio.sleep(0.02)


async def ready(local: httpx.AsyncClient) -> tuple[str, str]:
    response = await local.get("/readyz")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body["status"], body["mail"]


async def test_readyz_says_mail_is_degraded_after_failures_in_a_row_and_ok_after_a_send(
    busy_app: Starlette, smtp: SmtpSink, clock: MutableClock
) -> None:
    email = unique_email()
    async with client_for(busy_app) as http, client_for(busy_app, ip="127.0.0.1") as local:
        assert await ready(local) == ("ready", "ok")
        await signup(http, email, PASSWORD)
        for attempt in range(1, DEGRADED_AFTER + 1):
            assert await ready(local) == ("ready", "ok")
            if attempt > 1:
                clock.advance(seconds=10)
            await until_counted(busy_app, local, attempt)

        assert await ready(local) == ("ready (degraded)", "degraded: unavailable")
        text = (await local.get("/metrics")).text
        assert sample(text, "strawgate_mail_failures_total", reason="unavailable") == DEGRADED_AFTER
        for reason in set(MAIL_FAILURES) - {"unavailable"}:
            assert sample(text, "strawgate_mail_failures_total", reason=reason) == 0

        smtp.refuse = False
        clock.advance(seconds=10)
        deadline = time.monotonic() + 5.0
        while await ready(local) != ("ready", "ok"):
            assert time.monotonic() < deadline, "still degraded"
            await busy_app.state.mail_sender.run_once()
            await asyncio.sleep(0.02)
        assert len(smtp.mails(email)) == 1
