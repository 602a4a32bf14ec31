"""The guarantee end to end, with real processes: a change committed by a server that is
killed (SIGKILL) before its event could be delivered still reaches the endpoint, once,
from the next server, signed as the receiver expects."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import WebhookDelivery, WebhookEvent
from db.webhooks.events import webhook_id
from tests.conftest import PASSWORD, TEST_FERNET_KEY, TEST_SECRET, unique_email
from tests.gql import SIGNUP, post
from tests.pg import free_port
from tests.servers import running, server_env, start
from tests.webhooks.helpers import SECRET
from tests.webhooks.receiver import receiving

pytestmark = pytest.mark.slow

ATTEMPT_WAIT = 15.0  # seconds for the first server's dispatcher to try (and fail) once


async def delivery_of(database_url: str, user_id: uuid.UUID) -> dict[str, Any] | None:
    """The user.created delivery of the user, with its event's id."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(WebhookEvent.id.label("event_id"), WebhookDelivery)
                    .join(WebhookDelivery, WebhookDelivery.event_seq == WebhookEvent.seq)
                    .where(WebhookEvent.user_id == user_id, WebhookEvent.type == "user.created")
                )
            ).first()
    finally:
        await engine.dispose()
    return None if row is None else dict(row._mapping)


async def test_an_event_committed_before_a_kill_arrives_once_from_the_next_server(
    tmp_path: Path, database_url: str, clean_db: None
) -> None:
    port = free_port()  # the receiver's, once it listens
    endpoints = [
        {"url": f"http://127.0.0.1:{port}/hook", "secrets": [SECRET], "events": ["user.created"]}
    ]
    env = server_env(
        ENVIRONMENT="development",
        SECRET_KEY=TEST_SECRET,
        ENCRYPTION_KEYS=TEST_FERNET_KEY,
        DATABASE_URL=database_url,
        REQUIRE_EMAIL_VERIFICATION="false",
        WEBHOOK_ENDPOINTS=json.dumps(endpoints),
        WEBHOOK_ALLOW_PRIVATE="true",
    )
    logs = tmp_path / "logs"
    email = unique_email()
    first = await start(env=env, cwd=tmp_path, logs=logs)
    try:
        async with first.client() as http:
            answer = await post(http, SIGNUP, {"i": {"email": email, "password": PASSWORD}})
        session = answer.json()["data"]["signup"]
        assert session["__typename"] == "AuthSession", answer.text
        user_id = uuid.UUID(session["user"]["id"])
        # Committed with the signup; nothing listens at the endpoint yet, so the server's
        # first attempt fails. Killed once that attempt is recorded (no lease held: the next
        # server need not wait one out), before any delivery.
        deadline = time.monotonic() + ATTEMPT_WAIT
        while True:
            row = await delivery_of(database_url, user_id)
            if row is not None and row["attempts"] >= 1 and row["claim_id"] is None:
                break
            assert time.monotonic() < deadline, (row, first.log())
            await asyncio.sleep(0.05)
    finally:
        first.process.kill()
        await first.process.wait()
    assert row["delivered_at"] is None and row["next_attempt_at"] is not None
    assert row["last_error"] is not None and "127.0.0.1" in row["last_error"]

    async with (
        receiving([SECRET], port=port) as receiver,
        running(env=env, cwd=tmp_path, logs=logs) as second,
    ):
        await receiver.wait_for(1, limit=20.0)
        await asyncio.sleep(1.5)  # past the retry the first attempt set: nothing more comes
        assert "Traceback" not in second.log()

    assert receiver.rejected == []
    (got,) = receiver.received
    assert got.webhook_id == webhook_id(row["event_id"])
    assert got.payload["type"] == "user.created"
    assert got.payload["data"]["user_id"] == str(user_id)
    assert got.payload["data"]["email"] == email
    done = await delivery_of(database_url, user_id)
    assert done is not None and done["delivered_at"] is not None
    assert done["attempts"] == row["attempts"] + 1 and done["last_status"] == 200
