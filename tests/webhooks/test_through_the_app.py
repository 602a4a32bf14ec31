"""Webhooks through the app: a change made through the API reaches a real receiver by the
app's own dispatcher (started and stopped with it), and /metrics counts the deliveries and
shows what waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from db.settings import ConfigError, Settings
from db.webhooks.outbound import shown
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import signup
from tests.graph.test_metrics import sample
from tests.webhooks.helpers import SECRET
from tests.webhooks.receiver import Receiver, receiving


async def settle(receiver: Receiver, count: int) -> None:
    """The app's dispatcher works in the background: wait (real time, bounded) for it."""
    await receiver.wait_for(count, limit=15.0)
    await asyncio.sleep(0.2)  # and nothing more arrives meanwhile


async def test_a_signup_reaches_the_endpoint_and_the_metrics_count_it(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    async with receiving([SECRET]) as receiver:
        url = receiver.url + "/kept-out-of-metrics?token=kept-out-of-metrics-too"
        settings = make_settings(
            webhook_allow_private=True,
            webhook_endpoints=[{"url": url, "secrets": [SECRET], "events": ["user.created"]}],
        )
        app = create_app(settings, clock=clock)
        async with app.router.lifespan_context(app), client_for(app) as client:
            email = unique_email()
            session = await signup(client, email, PASSWORD)
            await settle(receiver, 1)
            async with client_for(app, ip="127.0.0.1") as local:
                text = (await local.get("/metrics")).text
        assert receiver.rejected == []
        (got,) = receiver.received
        assert got.payload["type"] == "user.created"
        assert got.payload["data"]["user_id"] == session["user"]["id"]
        assert got.webhook_id.startswith("msg_")
        label = shown(url)  # its origin and a hash of the rest
        counted = "strawgate_webhook_deliveries_total"
        assert sample(text, counted, endpoint=label, outcome="delivered") == 1
        assert sample(text, counted, endpoint=label, outcome="failed") == 0
        assert sample(text, counted, endpoint=label, outcome="given_up") == 0
        assert sample(text, "strawgate_webhook_pending", endpoint=label) == 0
        assert sample(text, "strawgate_webhook_oldest_pending_seconds", endpoint=label) == 0
        assert label.startswith(f"http://127.0.0.1:{receiver.port}/…#")
        assert "kept-out-of-metrics" not in text and email not in text


async def test_what_waits_shows_in_the_metrics(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    async with receiving([SECRET]) as receiver:
        receiver.default = 500
        settings = make_settings(
            webhook_allow_private=True,
            webhook_endpoints=[{"url": receiver.url, "secrets": [SECRET]}],
        )
        app = create_app(settings, clock=clock)
        async with app.router.lifespan_context(app), client_for(app) as client:
            await signup(client, unique_email(), PASSWORD)  # user.created, session.created
            await settle(receiver, 1)
            clock.advance(seconds=30)  # the head's retry is due; the dispatcher sees it at its poll
            async with client_for(app, ip="127.0.0.1") as local:
                text = (await local.get("/metrics")).text
        label = shown(receiver.url)
        assert sample(text, "strawgate_webhook_pending", endpoint=label) == 2
        assert sample(text, "strawgate_webhook_oldest_pending_seconds", endpoint=label) == 30
        assert (
            sample(text, "strawgate_webhook_deliveries_total", endpoint=label, outcome="failed")
            >= 1
        )
        # The same event every time: the second waits behind the failing first.
        assert len(set(receiver.ids)) == 1


def test_an_endpoint_that_cannot_be_delivered_to_never_starts(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        webhook_endpoints=[{"url": "http://hooks.example.com/x", "secrets": [SECRET]}]
    )
    with pytest.raises(ConfigError, match="WEBHOOK_ENDPOINTS"):
        create_app(settings)
