"""The webhook tests' dispatchers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest

from db.session import Statements
from db.settings import WebhookEndpointSettings
from db.webhooks.delivery import WebhookDispatcher
from db.webhooks.events import WebhookEvents
from db.webhooks.outbound import outbound_http
from tests.conftest import MutableClock
from tests.webhooks.helpers import LEASE, MakeDispatcher, emitter


@pytest.fixture
async def make_dispatcher(clock: MutableClock) -> AsyncIterator[MakeDispatcher]:
    """Dispatchers over the given endpoints (allow-private unless told otherwise), stopped
    at the end."""
    made: list[WebhookDispatcher] = []

    def make(
        statements: Statements,
        endpoints: Sequence[WebhookEndpointSettings],
        *,
        allow_private: bool = True,
        timeout: float = 2.0,
        give_up_after: timedelta = timedelta(hours=24),
        events: WebhookEvents | None = None,
    ) -> WebhookDispatcher:
        dispatcher = WebhookDispatcher(
            statements=statements,
            events=events or emitter(statements, endpoints, clock),
            http=outbound_http(timeout=timeout, allow_private=allow_private, keep_body=False),
            clock=clock,
            timeout=timeout,
            retry_max=timedelta(seconds=300),
            give_up_after=give_up_after,
            lease=LEASE,
        )
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.stop(grace=1.0)
