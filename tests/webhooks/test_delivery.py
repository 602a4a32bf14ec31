"""Webhook delivery (db/webhooks/delivery.py) to real receivers on loopback that verify
every request with the standardwebhooks library, on a real PostgreSQL (and SQLite).

Events are written the way services write them (WebhookEvents.emit in a transaction); the
dispatcher is driven round by round with run_once, and time moves with the test clock:
backoff, leases and give-up are never slept through."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from db.migrate import upgrade_head
from db.providers.http import ProviderUnreachable
from db.session import Statements, create_engine
from db.settings import Settings
from db.webhooks.delivery import WebhookDispatcher
from db.webhooks.events import webhook_id
from db.webhooks.outbound import endpoint_problem, names, outbound_http, shown
from tests.conftest import MutableClock, OpenStatements
from tests.db.test_provider_http import tripwired
from tests.webhooks.helpers import (
    LEASE,
    NEW_SECRET,
    OLD_SECRET,
    SECRET,
    MakeDispatcher,
    delivery,
    emit,
    emitter,
    endpoint,
    handed_out,
    payload_of,
    settled,
)
from tests.webhooks.receiver import receiving, secret_for

# -- signed, delivered -----------------------------------------------------------------


async def test_an_event_is_delivered_signed_and_verifies(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET]) as receiver:
        hooks = [endpoint(receiver.url)]
        dispatcher = make_dispatcher(statements, hooks)
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 1) == 1

        (got,) = receiver.received
        assert receiver.rejected == []
        assert got.webhook_id == webhook_id(event_id) == f"msg_{event_id.hex}"
        assert got.content_type == "application/json"
        assert got.timestamp == math.floor(clock.now().timestamp())
        assert len(got.signatures) == 1 and got.signatures[0].startswith("v1,")
        # The body is the stored payload, byte for byte.
        stored = await payload_of(statements, event_id)
        assert got.body == stored.encode("utf-8")
        assert got.payload == orjson.loads(stored)
        assert got.payload["type"] == "user.created"
        assert got.payload["data"]["email"] == "ada@example.com"

        row = await delivery(statements, event_id, receiver.url)
        assert row["delivered_at"] == clock.now()
        assert (row["attempts"], row["last_status"], row["last_error"]) == (1, 200, None)
        assert row["next_attempt_at"] is None and row["claim_id"] is None
        # Nothing more to send.
        assert await dispatcher.run_once() == 0
        assert len(receiver.received) == 1


async def test_a_failed_attempt_is_retried_after_about_a_second_with_the_same_id(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET], answers=[500]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)])
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 1) == 1
        assert [item.status for item in receiver.received] == [500]
        row = await delivery(statements, event_id, receiver.url)
        assert (row["attempts"], row["last_status"], row["last_error"]) == (1, 500, "HTTP 500")
        wait = row["next_attempt_at"] - clock.now()
        assert timedelta(seconds=0.8) <= wait <= timedelta(seconds=1)

        # Not before its time.
        assert await dispatcher.run_once() == 0
        clock.advance(seconds=0.5)
        assert await dispatcher.run_once() == 0
        clock.advance(seconds=0.5)
        assert await settled(dispatcher, 1) == 1
        assert await dispatcher.run_once() == 0

    # Twice, never more, and the same webhook-id both times (signed anew each time).
    assert [item.status for item in receiver.received] == [500, 200]
    assert receiver.ids == [webhook_id(event_id)] * 2
    first, second = receiver.received
    assert second.timestamp == first.timestamp + 1
    assert first.signatures != second.signatures
    row = await delivery(statements, event_id, receiver.url)
    assert (row["attempts"], row["last_status"], row["last_error"]) == (2, 200, None)
    assert row["delivered_at"] == clock.now()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (404, "HTTP 404"),
        (410, "HTTP 410"),
        (302, "HTTP 302 (a redirect: not followed; configure the URL it leads to)"),
    ],
)
async def test_any_answer_but_2xx_is_a_failure_to_retry(
    statements: Statements,
    clock: MutableClock,
    make_dispatcher: MakeDispatcher,
    answer: int,
    error: str,
) -> None:
    async with receiving([SECRET], answers=[answer]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)])
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 1) == 1
        row = await delivery(statements, event_id, receiver.url)
        assert (row["last_status"], row["last_error"]) == (answer, error)
        assert row["next_attempt_at"] is not None and row["failed_at"] is None
        clock.advance(seconds=1)
        assert await settled(dispatcher, 1) == 1
        assert [item.status for item in receiver.received] == [answer, 200]


async def test_a_receiver_that_does_not_answer_in_time_is_retried(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET], answers=["hang"]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)], timeout=0.3)
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 1) == 1
        row = await delivery(statements, event_id, receiver.url)
        assert row["last_status"] is None
        assert row["last_error"] == "127.0.0.1 did not answer within 0.3 s"
        clock.advance(seconds=1)
        assert await settled(dispatcher, 1) == 1
        assert (await delivery(statements, event_id, receiver.url))["delivered_at"] is not None


async def test_an_answer_s_body_is_read_only_so_far_and_dropped(
    statements: Statements, make_dispatcher: MakeDispatcher
) -> None:
    """Only the status counts: a receiver that answers 200 with megabytes is delivered to,
    and the dispatcher stops reading after MAX_DRAINED_BYTES."""
    async with receiving([SECRET], answers=["huge"]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)])
        event_id = await emit(statements, dispatcher.events)
        started = asyncio.get_running_loop().time()
        assert await settled(dispatcher, 1) == 1
        assert asyncio.get_running_loop().time() - started < 5.0
        row = await delivery(statements, event_id, receiver.url)
        assert (row["last_status"], row["delivered_at"] is not None) == (200, True)
        for _ in range(100):  # the receiver notices the connection gone
            if receiver.cut_short:
                break
            await asyncio.sleep(0.05)
        assert receiver.cut_short == 1


async def test_secret_rotation_both_secrets_sign_every_request(
    statements: Statements, make_dispatcher: MakeDispatcher
) -> None:
    """During a rotation an endpoint lists the new secret beside the old: a receiver still
    on the old one and one already on the new one both verify every request."""
    async with (
        receiving([OLD_SECRET]) as on_old,
        receiving([NEW_SECRET]) as on_new,
        receiving([secret_for("another")]) as stranger,
    ):
        hooks = [
            endpoint(on_old.url, OLD_SECRET, NEW_SECRET),
            endpoint(on_new.url, OLD_SECRET, NEW_SECRET),
            endpoint(stranger.url, OLD_SECRET, NEW_SECRET),
        ]
        dispatcher = make_dispatcher(statements, hooks)
        await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 3) == 3

    for receiver in (on_old, on_new):
        assert receiver.rejected == []
        (got,) = receiver.received
        assert len(got.signatures) == 2
        headers = {
            "webhook-id": got.webhook_id,
            "webhook-timestamp": str(got.timestamp),
            "webhook-signature": " ".join(got.signatures),
        }
        for secret in (OLD_SECRET, NEW_SECRET):
            assert Webhook(secret).verify(got.body, headers) == got.payload
    # A receiver that knows neither refuses it (and it is retried).
    assert stranger.received == []
    assert len(stranger.rejected) == 1


# -- order -------------------------------------------------------------------------------


async def test_a_failing_head_holds_back_its_endpoint_only(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET], answers=[500]) as failing, receiving([SECRET]) as healthy:
        dispatcher = make_dispatcher(statements, [endpoint(failing.url), endpoint(healthy.url)])
        events = dispatcher.events
        first = await emit(statements, events, "user.created")
        second = await emit(statements, events, "user.email_verified")
        third = await emit(statements, events, "session.created")
        expected = [webhook_id(event) for event in (first, second, third)]

        assert await settled(dispatcher, 2) == 2  # both heads: the first event
        assert failing.ids == expected[:1] and healthy.ids == expected[:1]
        # The failing endpoint's head is not due: its later events wait behind it, while
        # the other endpoint goes on.
        assert await settled(dispatcher, 1) == 1
        assert await settled(dispatcher, 1) == 1
        assert await dispatcher.run_once() == 0
        assert healthy.ids == expected
        assert failing.ids == expected[:1]
        row = await delivery(statements, second, failing.url)
        assert (row["attempts"], row["next_attempt_at"]) == (0, clock.now())

        clock.advance(seconds=1)
        for _ in expected:
            assert await settled(dispatcher, 1) == 1
        assert await dispatcher.run_once() == 0
    assert failing.ids == [expected[0], *expected]
    assert [item.status for item in failing.received] == [500, 200, 200, 200]
    assert healthy.ids == expected


async def test_a_slow_endpoint_does_not_hold_back_the_others(
    statements: Statements, make_dispatcher: MakeDispatcher
) -> None:
    """The running dispatcher serves each endpoint on its own: while one endpoint takes its
    time over its first event (well within WEBHOOK_TIMEOUT), another gets every event, in
    order; the slow one still gets one request at a time, then the rest."""
    count = 5
    async with receiving([SECRET], answers=["hold"]) as slow, receiving([SECRET]) as quick:
        hooks = [endpoint(slow.url), endpoint(quick.url)]
        dispatcher = make_dispatcher(statements, hooks, timeout=5.0)
        ids = [webhook_id(await emit(statements, dispatcher.events)) for _ in range(count)]
        await handed_out(statements)
        await dispatcher.start()
        await quick.wait_for(count, limit=2.0)
        assert quick.ids == ids
        assert slow.ids == ids[:1]  # still waiting for its answer: nothing more sent
        slow.release()
        await slow.wait_for(count, limit=2.0)
        await dispatcher.stop()
    assert slow.ids == ids
    assert quick.ids == ids


async def test_stop_releases_the_claim_of_a_request_it_cut_short(
    statements: Statements, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET], answers=["hang"]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)], timeout=5.0)
        event_id = await emit(statements, dispatcher.events)
        await handed_out(statements)
        await dispatcher.start()
        await receiver.wait_for(1, limit=2.0)
        assert (await delivery(statements, event_id, receiver.url))["claim_id"] is not None
        await dispatcher.stop(grace=0.1)
        row = await delivery(statements, event_id, receiver.url)
        assert (row["claim_id"], row["claimed_until"], row["attempts"]) == (None, None, 0)
        assert row["next_attempt_at"] is not None and row["delivered_at"] is None


async def test_an_event_waits_for_an_earlier_transaction_still_open(
    statements: Statements,
    open_statements: OpenStatements,
    clock: MutableClock,
    make_dispatcher: MakeDispatcher,
) -> None:
    """PostgreSQL: an event is not handed out while a transaction that began writing before
    it is open; the open one may still commit an event with a lower seq."""
    other = await open_statements()
    async with receiving([SECRET]) as receiver:
        dispatcher = make_dispatcher(statements, [endpoint(receiver.url)])
        events = dispatcher.events
        async with other.transaction() as slow:
            first = await events.emit(slow, "user.created", user_id=uuid.uuid4())
            later = await emit(statements, events, "session.created")  # committed
            assert await dispatcher.run_once() == 0
            assert receiver.received == []
        assert first is not None
        assert await settled(dispatcher, 1) == 1
        assert await settled(dispatcher, 1) == 1
    assert receiver.ids == [webhook_id(first), webhook_id(later)]


# -- give-up, dead letters, replay -------------------------------------------------------


async def test_a_delivery_is_given_up_when_too_old_with_those_behind_it(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET]) as receiver:
        receiver.default = 503
        hooks = [endpoint(receiver.url)]
        dispatcher = make_dispatcher(statements, hooks, give_up_after=timedelta(minutes=2))
        events = dispatcher.events
        first = await emit(statements, events)
        second = await emit(statements, events)
        assert await settled(dispatcher, 1) == 1  # attempt 1
        clock.advance(seconds=61)
        assert await settled(dispatcher, 1) == 1  # attempt 2
        assert (await delivery(statements, first, receiver.url))["failed_at"] is None
        clock.advance(seconds=61)
        outcomes: list[tuple[str, str, int]] = []
        dispatcher.on_outcome = lambda label, outcome, n: outcomes.append((label, outcome, n))
        third = await emit(statements, events)  # younger: it stays
        assert await settled(dispatcher, 1) == 1  # attempt 3: too old, given up
        assert await settled(dispatcher, 1) == 1  # the young one's turn
    assert receiver.ids == [webhook_id(e) for e in (first, first, first, third)]

    dead = await delivery(statements, first, receiver.url)
    assert dead["failed_at"] == clock.now() and dead["next_attempt_at"] is None
    assert (dead["attempts"], dead["last_status"], dead["last_error"]) == (3, 503, "HTTP 503")
    behind = await delivery(statements, second, receiver.url)
    assert behind["failed_at"] == clock.now() and behind["attempts"] == 0
    assert behind["last_error"].startswith("not sent: queued more than WEBHOOK_GIVE_UP_HOURS")
    young = await delivery(statements, third, receiver.url)
    assert young["failed_at"] is None and young["next_attempt_at"] is not None
    label = shown(receiver.url)
    assert outcomes == [(label, "given_up", 1), (label, "given_up", 1), (label, "failed", 1)]


async def test_a_dispatcher_that_dies_mid_delivery_is_taken_over_after_its_lease(
    statements: Statements,
    open_statements: OpenStatements,
    clock: MutableClock,
    make_dispatcher: MakeDispatcher,
) -> None:
    async with receiving([SECRET]) as receiver:
        hooks = [endpoint(receiver.url)]
        dead = make_dispatcher(statements, hooks)
        event_id = await emit(statements, dead.events)
        for _ in range(200):  # claimed, and never delivered nor recorded: it died
            claimed = await dead.claim()
            if claimed:
                break
            await asyncio.sleep(0.05)
        assert len(claimed) == 1
        survivor = make_dispatcher(await open_statements(), hooks)
        assert await survivor.run_once() == 0
        clock.advance(seconds=LEASE.total_seconds() - 1)
        assert await survivor.run_once() == 0
        clock.advance(seconds=1)
        assert await settled(survivor, 1) == 1
        assert receiver.ids == [webhook_id(event_id)]
        # Were the first one to come back, what it records no longer counts.
        assert await dead.mark_failed(claimed[0], "late") is False
        row = await delivery(statements, event_id, receiver.url)
        assert row["delivered_at"] == clock.now() and row["last_error"] is None


async def test_stop_releases_what_a_dispatcher_holds(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET]) as receiver:
        hooks = [endpoint(receiver.url)]
        stopping = make_dispatcher(statements, hooks)
        event_id = await emit(statements, stopping.events)
        for _ in range(200):
            if await stopping.claim():
                break
            await asyncio.sleep(0.05)
        assert (await delivery(statements, event_id, receiver.url))["claim_id"] is not None
        await stopping.stop()
        assert (await delivery(statements, event_id, receiver.url))["claim_id"] is None
        # Another takes it at once, no lease to wait for.
        assert await settled(make_dispatcher(statements, hooks), 1) == 1
        assert receiver.ids == [webhook_id(event_id)]


async def test_deliveries_to_an_endpoint_not_configured_here_wait_out_the_give_up_age(
    statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    """A process that lacks an endpoint (an old one in a rolling deployment, another service
    configured differently on the same database) leaves its deliveries to the processes
    that have it: it gives up only what nobody delivered for WEBHOOK_GIVE_UP_HOURS."""
    give_up = timedelta(hours=2)
    async with receiving([SECRET]) as kept:
        elsewhere = "https://elsewhere.example.com/hook?token=abc"
        writer = emitter(statements, [endpoint(elsewhere), endpoint(kept.url)], clock)
        old = await emit(statements, writer)
        dispatcher = make_dispatcher(statements, [endpoint(kept.url)], give_up_after=give_up)
        assert await settled(dispatcher, 1) == 1  # the one it has
        clock.advance(minutes=11)
        assert await dispatcher.give_up_orphans() == 0  # not yet: another process may have it
        clock.advance(hours=1)
        young = await emit(statements, emitter(statements, [endpoint(elsewhere)], clock))
        clock.advance(minutes=49)
        assert await dispatcher.give_up_orphans() == 0  # 1 h 49 min old: not yet
        clock.advance(minutes=1)
        assert await dispatcher.give_up_orphans() == 1  # 2 h old: given up; the young one stays
    row = await delivery(statements, old, elsewhere)
    assert row["failed_at"] == clock.now() and row["attempts"] == 0
    assert row["last_error"] == (
        "not sent: queued more than WEBHOOK_GIVE_UP_HOURS ago to an endpoint not configured"
        " here (not in WEBHOOK_ENDPOINTS)"
    )
    waiting = await delivery(statements, young, elsewhere)
    assert waiting["failed_at"] is None and waiting["next_attempt_at"] is not None
    assert kept.ids == [webhook_id(old)]


# -- how endpoints are shown -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://hooks.slack.com/services/T0001/B0002/XXXXsecretXXXX", "https://hooks.slack.com/"),
        ("https://discord.com/api/webhooks/123/secretTOKEN", "https://discord.com/"),
        (
            "https://hooks.zapier.com/hooks/catch/1/secret/?token=secret",
            "https://hooks.zapier.com/",
        ),
        ("http://127.0.0.1:8080/secret", "http://127.0.0.1:8080/"),
        ("http://[::1]:8080/secret", "http://[::1]:8080/"),
        ("https://user:secret@hooks.example.com:8443/x", "https://hooks.example.com:8443/"),
    ],
)
def test_an_endpoint_is_shown_by_its_origin_and_a_hash_of_the_rest(url: str, origin: str) -> None:
    """Logs, metrics and the command line: a path or query string may hold a token."""
    label = shown(url)
    assert label.startswith(origin + "…#")
    digest = label.removeprefix(origin + "…#")
    assert len(digest) == 8 and int(digest, 16) >= 0
    assert "secret" not in label.lower()
    assert shown(url) == label  # stable (the same in every process: not Python's hash())
    assert names(url, url) and names(label, url) and names(label.replace("…", "..."), url)


def test_endpoints_that_differ_past_their_origin_are_shown_apart() -> None:
    base = "https://hooks.example.com/hook"
    labels = {shown(u) for u in (base, base + "2", base + "?token=a", base + "?token=b")}
    assert len(labels) == 4
    assert not names(shown(base), base + "2")
    assert not names("https://hooks.example.com/", base)
    # Nothing to hide: as it is.
    assert shown("https://hooks.example.com") == shown("https://hooks.example.com/")
    assert shown("https://hooks.example.com/") == "https://hooks.example.com/"
    assert shown("not a url") == "(not a URL)"


# -- where requests may go ---------------------------------------------------------------


async def test_a_host_name_that_resolves_to_loopback_is_refused_without_allow_private(
    statements: Statements, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET]) as receiver:
        url = f"https://localhost:{receiver.port}/hook"
        dispatcher = make_dispatcher(statements, [endpoint(url)], allow_private=False)
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 1) == 1
        row = await delivery(statements, event_id, url)
        assert row["last_error"] == (
            "localhost: localhost resolves to a private, loopback or link-local address"
            " (WEBHOOK_ALLOW_PRIVATE allows it)"
        )
        assert row["last_status"] is None and row["delivered_at"] is None
        assert receiver.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "[::1]"])
async def test_private_addresses_and_plain_http_are_refused_before_any_connection(
    statements: Statements, make_dispatcher: MakeDispatcher, host: str
) -> None:
    """Where settings were not checked (they are: see test_settings_refuse_...), the client
    still refuses: plain HTTP outright, a private address at connect time."""
    async with receiving([SECRET]) as receiver:
        http_url = f"http://{host}:{receiver.port}/hook"
        https_url = f"https://{host}:{receiver.port}/hook"
        hooks = [endpoint(http_url), endpoint(https_url)]
        dispatcher = make_dispatcher(statements, hooks, allow_private=False)
        event_id = await emit(statements, dispatcher.events)
        assert await settled(dispatcher, 2) == 2
        plain = await delivery(statements, event_id, http_url)
        assert plain["last_error"].endswith("must use https (WEBHOOK_ALLOW_PRIVATE allows http)")
        private = await delivery(statements, event_id, https_url)
        assert (
            "private, loopback or link-local address (WEBHOOK_ALLOW_PRIVATE"
            in (private["last_error"])
        )
        assert receiver.connections == 0


@pytest.mark.parametrize(
    ("url", "allow_private", "problem"),
    [
        ("http://hooks.example.com/x", False, "must use https (WEBHOOK_ALLOW_PRIVATE allows http)"),
        ("ftp://hooks.example.com/x", True, "is not an absolute http(s) URL"),
        ("https://user:pw@hooks.example.com/x", True, "must not hold a user name or password"),
        ("https://10.1.2.3/x", False, "is a private, loopback or link-local address"),
        ("https://[fd00::1]/x", False, "is a private, loopback or link-local address"),
        ("https://169.254.169.254/x", False, "is a private, loopback or link-local address"),
        ("https://hooks.example.com/" + "x" * 2048, True, "is longer than 2048 characters"),
        # Plain HTTP only to addresses that are not public, even with WEBHOOK_ALLOW_PRIVATE.
        ("http://8.8.8.8/x", True, "is plain http to a public address"),
        ("http://[2001:4860:4860::8888]:8080/x", True, "is plain http to a public address"),
        ("http://[::ffff:8.8.8.8]/x", True, "is plain http to a public address"),
    ],
)
def test_settings_refuse_an_endpoint_that_cannot_be_delivered_to(
    make_settings: Callable[..., Settings], url: str, allow_private: bool, problem: str
) -> None:
    from db.settings import ConfigError

    settings = make_settings(
        webhook_allow_private=allow_private,
        webhook_endpoints=[
            {"url": "https://ok.example.com/x", "secrets": [SECRET]},
            {"url": url, "secrets": [SECRET]},
        ],
    )
    with pytest.raises(ConfigError, match=r"^WEBHOOK_ENDPOINTS\[1\]: ") as refused:
        settings.prepare()
    assert problem in str(refused.value)
    assert "pw" not in str(refused.value)


def test_settings_refuse_an_endpoint_listed_twice(make_settings: Callable[..., Settings]) -> None:
    from db.settings import ConfigError

    twice = {"url": "https://hooks.example.com/x", "secrets": [SECRET]}
    settings = make_settings(webhook_endpoints=[twice, twice])
    with pytest.raises(ConfigError, match=r"WEBHOOK_ENDPOINTS\[1\]: .* is listed twice"):
        settings.prepare()


def test_settings_take_private_endpoints_and_plain_http_with_allow_private(
    make_settings: Callable[..., Settings],
) -> None:
    make_settings(
        webhook_allow_private=True,
        webhook_endpoints=[
            {"url": "http://127.0.0.1:9/x", "secrets": [SECRET]},
            {"url": "http://10.1.2.3/x", "secrets": [SECRET]},
            {"url": "http://[fd00::1]/x", "secrets": [SECRET]},
            {"url": "https://10.1.2.3/x", "secrets": [SECRET]},
            # A name is checked where each connection is made (what it resolves to then).
            {"url": "http://hooks.internal.example/x", "secrets": [SECRET]},
        ],
    ).prepare()


def test_plain_http_to_a_public_address_is_refused_even_with_allow_private() -> None:
    assert endpoint_problem("http://127.0.0.1:9/x", allow_private=True) is None
    assert endpoint_problem("https://8.8.8.8/x", allow_private=True) is None
    problem = endpoint_problem("http://8.8.8.8/x", allow_private=True)
    assert problem == (
        "is plain http to a public address: WEBHOOK_ALLOW_PRIVATE allows http only to"
        " private, loopback or link-local addresses; use https"
    )


async def test_with_allow_private_plain_http_reaches_loopback_and_never_a_public_address() -> None:
    """Where each connection is made: the client the dispatcher and the claims hook use."""
    http = outbound_http(timeout=2.0, allow_private=True, keep_body=False)
    tripwire = tripwired(http)
    try:
        async with receiving([SECRET]) as receiver:
            for host in ("127.0.0.1", "localhost"):
                url = f"http://{host}:{receiver.port}/hook"
                response = await http.request("POST", url, content=b"{}")
                assert response.status_code == 401  # reached: unsigned, the receiver refuses
            for host in ("8.8.8.8", "[2001:4860:4860::8888]"):
                with pytest.raises(ProviderUnreachable) as refused:
                    await http.request("POST", f"http://{host}:{receiver.port}/hook")
                assert str(refused.value).endswith(
                    "resolves to a public address: plain http goes only to private, loopback"
                    " or link-local addresses (WEBHOOK_ALLOW_PRIVATE); use https"
                )
    finally:
        await http.aclose()
    assert len(receiver.rejected) == 2
    assert {address for address, _port in tripwire.attempts} <= {"127.0.0.1", "::1"}


@pytest.mark.parametrize(("environment", "warned"), [("production", True), ("development", False)])
async def test_allow_private_in_production_is_warned_about_at_start(
    statements: Statements,
    clock: MutableClock,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    environment: str,
    warned: bool,
) -> None:
    settings = make_settings(environment=environment, webhook_allow_private=True)
    with caplog.at_level(logging.WARNING, logger="strawgate.webhooks"):
        dispatcher = WebhookDispatcher.from_settings(
            settings, statements=statements, events=None, clock=clock
        )
    await dispatcher.stop()
    found = [
        r.getMessage() for r in caplog.records if "WEBHOOK_ALLOW_PRIVATE is on" in r.getMessage()
    ]
    assert found == (
        [
            "WEBHOOK_ALLOW_PRIVATE is on in production: webhook endpoints and the claims hook"
            " may be on private, loopback and link-local addresses, and reached there over"
            " plain HTTP; turn it off unless they are on your own network"
        ]
        if warned
        else []
    )


# -- SQLite, the embedded default --------------------------------------------------------


@pytest.fixture
async def sqlite_statements(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[Statements]:
    url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
    await asyncio.to_thread(upgrade_head, url)  # runs a loop of its own
    statements = Statements(create_engine(make_settings(database_url=url)))
    await statements.start()
    try:
        yield statements
    finally:
        await statements.close()
        await statements.engine.dispose()


async def test_delivery_in_order_with_a_retry_on_sqlite(
    sqlite_statements: Statements, clock: MutableClock, make_dispatcher: MakeDispatcher
) -> None:
    async with receiving([SECRET], answers=[500]) as receiver:
        dispatcher = make_dispatcher(sqlite_statements, [endpoint(receiver.url)])
        first = await emit(sqlite_statements, dispatcher.events)
        second = await emit(sqlite_statements, dispatcher.events)
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0  # the head waits; the next waits behind it
        clock.advance(seconds=1)
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0
    assert receiver.ids == [webhook_id(e) for e in (first, first, second)]
    row = await delivery(sqlite_statements, second, receiver.url)
    assert row["delivered_at"] == clock.now() and row["attempts"] == 1
