"""Webhook events as changes write them: one per change, in the change's transaction (a
change that rolls back leaves none), with the facts a receiver needs and never a secret.
What the endpoints then receive is tests/webhooks' delivery tests' business."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from db.models import User, WebhookDelivery, WebhookEvent
from db.services.operator import Operator
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import (
    CHANGE_PASSWORD,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    gql,
    login,
    logout,
    mutate,
    refresh,
    signed_in,
    signed_up,
    signed_up_and_proven,
    signup,
    verify_otp,
)
from tests.graph.test_lifecycle import CHANGE_EMAIL, DELETE_ACCOUNT
from tests.graph.test_mfa import CONFIRM, DISABLE, SETUP, code_at
from tests.smtp import SmtpSink

# Nothing listens there: the deliveries wait (their delivery is not what this file tests).
ALL = "http://127.0.0.1:9/all"
CREATED_ONLY = "http://127.0.0.1:9/created"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_PASSWORD = "a different horse, battery and staple"


@pytest.fixture
async def hooked_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> AsyncIterator[Starlette]:
    settings = make_settings(
        webhook_allow_private=True,
        webhook_endpoints=[
            {"url": ALL, "secrets": [SECRET]},
            {"url": CREATED_ONLY, "secrets": [SECRET], "events": ["user.created"]},
        ],
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(hooked_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(hooked_app) as client:
        yield client


async def events_of(app: Starlette, user_id: str | uuid.UUID) -> list[dict[str, Any]]:
    """The user's webhook events in order: their payloads."""
    statements = app.state.services.auth.statements
    async with statements.connection() as conn:
        rows = await conn.all(
            select(WebhookEvent.payload)
            .where(WebhookEvent.user_id == uuid.UUID(str(user_id)))
            .order_by(WebhookEvent.seq),
            {},
        )
    return [orjson.loads(row["payload"]) for row in rows]


async def types_of(app: Starlette, user_id: str | uuid.UUID) -> list[str]:
    return [event["type"] for event in await events_of(app, user_id)]


async def test_signup_and_sign_ins(http: httpx.AsyncClient, hooked_app: Starlette) -> None:
    email = unique_email()
    session = await signed_up_and_proven(http, email)
    user_id = session["user"]["id"]
    events = await events_of(hooked_app, user_id)
    assert [e["type"] for e in events] == ["user.created", "session.created"]
    created, opened = events
    assert created["data"] == {"user_id": user_id, "email": email, "email_verified": False}
    assert opened["data"]["amr"] == ["pwd"]
    assert uuid.UUID(opened["data"]["session_id"])
    assert created["timestamp"].endswith("Z")

    # A second sign-in is a session, not a user; a failed one is nothing.
    await signed_in(http, email)
    assert (await login(http, email, "wrong password"))["__typename"] == "AuthError"
    assert await types_of(hooked_app, user_id) == [
        "user.created",
        "session.created",
        "session.created",
    ]
    # A signup of a taken address changes nothing and writes nothing.
    assert (await signup(http, email, PASSWORD))["__typename"] == "AuthError"
    assert len(await types_of(hooked_app, user_id)) == 3


async def test_the_filter_decides_which_endpoints_get_an_event(
    http: httpx.AsyncClient, hooked_app: Starlette
) -> None:
    session = await signed_up_and_proven(http, unique_email())
    statements = hooked_app.state.services.auth.statements
    async with statements.connection() as conn:
        rows = await conn.all(
            select(WebhookEvent.type, WebhookDelivery.endpoint)
            .join(WebhookDelivery, WebhookDelivery.event_seq == WebhookEvent.seq)
            .where(WebhookEvent.user_id == uuid.UUID(session["user"]["id"]))
            .order_by(WebhookEvent.seq, WebhookDelivery.endpoint),
            {},
        )
    assert [(row["type"], row["endpoint"]) for row in rows] == [
        ("user.created", ALL),
        ("user.created", CREATED_ONLY),
        ("session.created", ALL),
    ]


async def test_account_changes_each_write_one_event(
    http: httpx.AsyncClient, hooked_app: Starlette, clock: MutableClock
) -> None:
    email = unique_email()
    first = await signed_up_and_proven(http, email)
    user_id = first["user"]["id"]
    other = await signed_in(http, email)
    token = other["accessToken"]
    seen = len(await types_of(hooked_app, user_id))

    async def new_events() -> list[dict[str, Any]]:
        nonlocal seen
        events = await events_of(hooked_app, user_id)
        fresh, seen = events[seen:], len(events)
        return fresh

    # A wrong current password: rolled back, nothing written.
    refused = await gql(
        http,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": "not it", "newPassword": NEW_PASSWORD}},
        token=token,
    )
    assert refused["data"]["changePassword"]["__typename"] == "AuthError"
    assert await new_events() == []

    changed = await mutate(
        http,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}},
        token=token,
    )
    token = changed["accessToken"]
    fresh = await new_events()
    # The other session ends (its own event), then the change itself.
    assert [(e["type"], e["data"].get("reason")) for e in fresh] == [
        ("session.revoked", "password_changed"),
        ("user.password_changed", "changed"),
    ]
    assert fresh[0]["data"]["session_id"] != fresh[1]["data"].get("session_id")

    secret = (await gql(http, SETUP, token=token))["data"]["setupTotp"]["secret"]
    await gql(http, CONFIRM, {"i": {"code": code_at(secret, clock)}}, token=token)
    clock.advance(seconds=90)
    await gql(
        http,
        DISABLE,
        {"i": {"password": NEW_PASSWORD, "code": code_at(secret, clock)}},
        token=token,
    )
    assert [(e["type"], e["data"]) for e in await new_events()] == [
        ("user.two_factor_enabled", {"user_id": user_id, "method": "totp"}),
        ("user.two_factor_disabled", {"user_id": user_id, "method": "totp"}),
    ]

    services = hooked_app.state.services
    operator = Operator(
        statements=services.auth.statements, clock=services.auth.clock, events=services.events
    )
    await operator.change_role(email, "admin", grant=True)
    await operator.change_role(email, "admin", grant=True)  # held already: no change
    await operator.change_role(email, "admin", grant=False)
    await operator.disable(email)
    await operator.enable(email)
    fresh = await new_events()
    assert [(e["type"], e["data"].get("role"), e["data"].get("change")) for e in fresh] == [
        ("user.roles_changed", "admin", "added"),
        ("user.roles_changed", "admin", "removed"),
        ("session.revoked", None, None),  # disabling ends the live session
        ("user.disabled", None, None),
        ("user.enabled", None, None),
    ]
    assert fresh[2]["data"]["reason"] == "operator_disable"

    again = await signed_in(http, email, NEW_PASSWORD)
    assert await logout(http, again["refreshToken"]) == 1
    fresh = await new_events()
    assert [(e["type"], e["data"].get("reason")) for e in fresh] == [
        ("session.created", None),
        ("session.revoked", "logout"),
    ]
    assert fresh[0]["data"]["session_id"] == fresh[1]["data"]["session_id"]

    last = await signed_in(http, email, NEW_PASSWORD)
    deleted = await gql(
        http, DELETE_ACCOUNT, {"i": {"password": NEW_PASSWORD}}, token=last["accessToken"]
    )
    assert deleted["data"]["deleteAccount"]["__typename"] == "DeleteAccountResult"
    fresh = await new_events()
    assert [(e["type"], e["data"].get("reason")) for e in fresh] == [
        ("session.created", None),
        ("session.revoked", "account_deleted"),
        ("user.deleted", "deleted_by_user"),
    ]


async def test_logout_everywhere_revokes_each_session(
    http: httpx.AsyncClient, hooked_app: Starlette
) -> None:
    email = unique_email()
    first = await signed_up_and_proven(http, email)
    second = await signed_in(http, email)
    assert await logout(http, second["refreshToken"], everywhere=True) == 2
    events = await events_of(hooked_app, first["user"]["id"])
    opened = {e["data"]["session_id"] for e in events if e["type"] == "session.created"}
    revoked = [e["data"] for e in events if e["type"] == "session.revoked"]
    assert {r["session_id"] for r in revoked} == opened
    assert {r["reason"] for r in revoked} == {"logout_everywhere"}


async def test_payloads_never_carry_a_secret(
    http: httpx.AsyncClient, hooked_app: Starlette
) -> None:
    email = unique_email()
    session = await signed_up_and_proven(http, email)
    statements = hooked_app.state.services.auth.statements
    async with statements.connection() as conn:
        payloads = await conn.scalars(select(WebhookEvent.payload), {})
    text = "".join(payloads)
    assert email in text
    for secret in (PASSWORD, session["accessToken"], session["refreshToken"]):
        assert secret not in text
    assert "hash" not in text


async def test_without_endpoints_nothing_is_written(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    session = await signed_up_and_proven(client, unique_email())
    assert await events_of(app, session["user"]["id"]) == []


async def test_a_provider_sign_in_is_a_new_user_once(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    from tests.graph.test_identity_tokens import mint, sign_in, signed_in
    from tests.identities import provider_settings
    from tests.identity_provider import LocalProvider

    with LocalProvider() as provider:
        settings = make_settings(
            **provider_settings(provider),
            webhook_allow_private=True,
            webhook_endpoints=[{"url": ALL, "secrets": [SECRET]}],
        )
        application = create_app(settings, clock=clock)
        async with (
            application.router.lifespan_context(application),
            client_for(application) as client,
        ):
            email = unique_email()
            first = await sign_in(client, mint(provider, clock, email=email))
            signed_in(first)
            clock.advance(minutes=5)
            signed_in(await sign_in(client, mint(provider, clock, email=email)))
            events = await events_of(application, first["user"]["id"])
            # A provider sign-in to an existing (proven) account links, and creates nobody.
            owner = unique_email()
            account = await signed_up_and_proven(client, owner)
            signed_in(await sign_in(client, mint(provider, clock, email=owner)))
            linked = await events_of(application, account["user"]["id"])
    assert [e["type"] for e in events] == [
        "user.created",
        "user.email_verified",
        "session.created",
        "session.created",
    ]
    assert events[0]["data"] == {
        "user_id": first["user"]["id"],
        "email": email,
        "email_verified": True,
        "provider": "acme",
    }
    assert events[2]["data"]["amr"] == ["fed"]
    assert [(e["type"], e["data"].get("provider")) for e in linked] == [
        ("user.created", None),
        ("session.created", None),
        ("user.identity_linked", "acme"),
        ("session.created", None),
    ]


async def test_refresh_token_reuse_revokes_in_the_same_transaction(
    http: httpx.AsyncClient, hooked_app: Starlette, clock: MutableClock
) -> None:
    first = await signup(http, unique_email(), PASSWORD)
    await refresh(http, first["refreshToken"])
    clock.advance(seconds=11)
    assert (await refresh(http, first["refreshToken"]))["code"] == "TOKEN_REUSED"
    events = await events_of(hooked_app, first["user"]["id"])
    assert [(e["type"], e["data"].get("reason")) for e in events] == [
        ("user.created", None),
        ("session.created", None),
        ("session.revoked", "refresh_token_reused"),
    ]


@pytest.fixture
async def mail_hooked(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    settings = make_settings(
        require_email_verification=True,
        webhook_allow_private=True,
        webhook_endpoints=[{"url": ALL, "secrets": [SECRET]}],
        **smtp.settings(),
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


async def test_address_changes_and_resets(
    mail_hooked: Starlette, smtp: SmtpSink, clock: MutableClock
) -> None:
    async with client_for(mail_hooked) as client:
        old, session = await signed_up(client, smtp)
        user_id = session["user"]["id"]
        assert await types_of(mail_hooked, user_id) == [
            "user.created",
            "user.email_verified",
            "session.created",
        ]
        new = unique_email()
        asked = await gql(
            client,
            CHANGE_EMAIL,
            {"i": {"newEmail": new, "password": PASSWORD}},
            token=session["accessToken"],
        )
        challenge = asked["data"]["changeEmail"]
        mail = await smtp.wait_for(new)
        assert (await verify_otp(client, challenge["challengeToken"], mail.code()))[
            "__typename"
        ] == "AuthSession"
        changed = (await events_of(mail_hooked, user_id))[-1]
        assert changed["type"] == "user.email_changed"
        assert changed["data"] == {"user_id": user_id, "email": new, "previous_email": old}

        reset = await gql(client, REQUEST_PASSWORD_RESET, {"i": {"email": new}})
        code = (await smtp.wait_for(new, count=2)).code()
        done = await gql(
            client,
            RESET_PASSWORD,
            {
                "i": {
                    "challengeToken": reset["data"]["requestPasswordReset"]["challengeToken"],
                    "code": code,
                    "newPassword": NEW_PASSWORD,
                }
            },
        )
        assert done["data"]["resetPassword"]["__typename"] == "AuthSession", done
        fresh = (await events_of(mail_hooked, user_id))[4:]
        assert [(e["type"], e["data"].get("reason")) for e in fresh] == [
            ("session.revoked", "password_reset"),
            ("user.password_changed", "reset"),
            ("session.created", None),
        ]


async def test_an_abandoned_signup_replaced_is_deleted(
    mail_hooked: Starlette, smtp: SmtpSink, clock: MutableClock
) -> None:
    async with client_for(mail_hooked) as client:
        email = unique_email()
        first = await signup(client, email, PASSWORD)
        assert first["__typename"] == "OtpChallenge"
        statements = mail_hooked.state.services.auth.statements
        async with statements.connection() as conn:
            (abandoned,) = await conn.scalars(
                select(User.id).where(User.email_normalized == email), {}
            )
        clock.advance(minutes=11)  # its code expired: a new signup replaces it
        assert (await signup(client, email, PASSWORD))["__typename"] == "OtpChallenge"
        assert await types_of(mail_hooked, abandoned) == ["user.created", "user.deleted"]
        gone = (await events_of(mail_hooked, abandoned))[-1]
        assert gone["data"]["reason"] == "abandoned_signup"


async def test_housekeeping_tells_of_the_signups_it_deletes(
    mail_hooked: Starlette, smtp: SmtpSink, clock: MutableClock
) -> None:
    async with client_for(mail_hooked) as client:
        email = unique_email()
        assert (await signup(client, email, PASSWORD))["__typename"] == "OtpChallenge"
    statements = mail_hooked.state.services.auth.statements
    async with statements.connection() as conn:
        (user_id,) = await conn.scalars(select(User.id).where(User.email_normalized == email), {})
    housekeeper = mail_hooked.state.housekeeper
    await housekeeper.stop()
    clock.advance(days=8)
    pruned = await housekeeper.run_once()
    assert pruned is not None and pruned.unverified_users == 1
    events = await events_of(mail_hooked, user_id)
    # Eight days on, user.created may already have been given up (nothing listens at the
    # endpoint) and pruned by the same pass: the deletion is what this test is about.
    assert [
        (e["type"], e["data"].get("reason")) for e in events if e["type"] != "user.created"
    ] == [("user.deleted", "unverified")]


async def test_passkeys_added_and_removed(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> None:
    from tests.graph.test_passkeys import APK_ORIGIN, DELETE, ORIGIN, RP_ID, new_user, register

    settings = make_settings(
        webauthn_rp_id=RP_ID,
        webauthn_origins=f"{ORIGIN},{APK_ORIGIN}",
        webhook_allow_private=True,
        webhook_endpoints=[{"url": ALL, "secrets": [SECRET]}],
        **smtp.settings(),
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as c:
        _, token = await new_user(c)
        passkey = await register(c, token)
        await mutate(c, DELETE, {"i": {"id": passkey["id"]}}, token=token)
        statements = application.state.services.auth.statements
        async with statements.connection() as conn:
            payloads = await conn.scalars(
                select(WebhookEvent.payload)
                .where(WebhookEvent.type.like("user.passkey%"))
                .order_by(WebhookEvent.seq),
                {},
            )
    events = [orjson.loads(payload) for payload in payloads]
    assert [(e["type"], e["data"]["passkey_id"]) for e in events] == [
        ("user.passkey_added", passkey["id"]),
        ("user.passkey_removed", passkey["id"]),
    ]


async def test_parallel_signups_of_one_address_write_one_user_created(
    http: httpx.AsyncClient, hooked_app: Starlette
) -> None:
    email = unique_email()
    answers = await asyncio.gather(*(signup(http, email, PASSWORD) for _ in range(6)))
    assert sorted(a["__typename"] for a in answers).count("AuthSession") == 1
    statements = hooked_app.state.services.auth.statements
    async with statements.connection() as conn:
        payloads = await conn.scalars(
            select(WebhookEvent.payload).where(WebhookEvent.type == "user.created"), {}
        )
    assert [orjson.loads(p)["data"]["email"] for p in payloads].count(email) == 1


async def test_parallel_sign_ins_past_the_cap_revoke_each_session_once(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    settings = make_settings(
        max_sessions_per_user=1,
        webhook_allow_private=True,
        webhook_endpoints=[{"url": ALL, "secrets": [SECRET]}],
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as c:
        email = unique_email()
        first = await signup(c, email, PASSWORD)
        for _ in range(3):
            await asyncio.gather(*(signed_in(c, email) for _ in range(4)))
        events = await events_of(application, first["user"]["id"])
    revoked = [e["data"]["session_id"] for e in events if e["type"] == "session.revoked"]
    assert revoked and len(revoked) == len(set(revoked))
    assert {e["data"]["reason"] for e in events if e["type"] == "session.revoked"} == {
        "session_limit"
    }
