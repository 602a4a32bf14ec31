"""Passkeys: registration (startPasskeyRegistration, finishPasskeyRegistration) and
management (me.passkeys, renamePasskey, deletePasskey), against a software authenticator
(tests/webauthn_authenticator.py), real PostgreSQL and a real SMTP server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from db.models import Passkey, User
from db.settings import ConfigError, Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import gql, mutate, signed_in, signed_up_and_proven
from tests.graph.test_lifecycle import DELETE_ACCOUNT, EXPORT
from tests.smtp import SmtpSink
from tests.webauthn_authenticator import NO_AAGUID, SoftAuthenticator, b64url, from_b64url

RP_ID = "example.com"
ORIGIN = "https://example.com"
APK_ORIGIN = "android:apk-key-hash:" + "x" * 43
YUBIKEY = uuid.UUID("fa2b99dc-9e39-4257-8f92-4a30d23c4118")
BITWARDEN = uuid.UUID("d548826e-79b4-db40-a3d8-11116f7e8349")
WINDOW = 10 * 60  # REAUTH_WINDOW's default, in seconds

ERROR = "... on AuthError { code message field retryAfter }"
START = f"""mutation($i: StartPasskeyRegistrationInput!) {{
  startPasskeyRegistration(input: $i) {{ __typename
    ... on PasskeyCeremony {{ challengeToken optionsJson expiresIn }} {ERROR} }} }}"""
FINISH = f"""mutation($i: FinishPasskeyRegistrationInput!) {{
  finishPasskeyRegistration(input: $i) {{ __typename
    ... on Passkey {{ id name createdAt lastUsedAt backedUp }} {ERROR} }} }}"""
RENAME = f"""mutation($i: RenamePasskeyInput!) {{ renamePasskey(input: $i) {{ __typename
    ... on Passkey {{ id name }} {ERROR} }} }}"""
DELETE = f"""mutation($i: DeletePasskeyInput!) {{ deletePasskey(input: $i) {{ __typename
    ... on User {{ id passkeys {{ id }} }} {ERROR} }} }}"""
MY_PASSKEYS = "{ me { passkeys { id name createdAt lastUsedAt backedUp } } }"
EVENT_KINDS = "{ securityEvents(first: 100) { edges { node { kind } } } }"


@pytest.fixture
async def passkey_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    """The app with passkeys on (example.com, its web origin and an Android app's) and
    mail going to `smtp`."""
    settings = make_settings(
        webauthn_rp_id=RP_ID, webauthn_origins=f"{ORIGIN},{APK_ORIGIN}", **smtp.settings()
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(passkey_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(passkey_app) as http:
        yield http


async def new_user(client: httpx.AsyncClient) -> tuple[str, str]:
    """A fresh account, just signed in: (email, access token)."""
    email = unique_email()
    session = await signed_up_and_proven(client, email)
    return email, str(session["accessToken"])


async def start(client: httpx.AsyncClient, token: str, **fields: Any) -> dict[str, Any]:
    return await mutate(client, START, {"i": fields}, token=token)


async def finish(
    client: httpx.AsyncClient, token: str, challenge_token: str, credential: str, **fields: Any
) -> dict[str, Any]:
    variables = {"i": {"challengeToken": challenge_token, "credentialJson": credential, **fields}}
    return await mutate(client, FINISH, variables, token=token)


async def register(
    client: httpx.AsyncClient,
    token: str,
    authenticator: SoftAuthenticator | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A whole registration that must succeed: the new Passkey."""
    authenticator = authenticator or SoftAuthenticator()
    ceremony = await start(client, token)
    assert ceremony["__typename"] == "PasskeyCeremony", ceremony
    answer = authenticator.register(ceremony["optionsJson"])
    passkey = await finish(client, token, ceremony["challengeToken"], answer, **fields)
    assert passkey["__typename"] == "Passkey", passkey
    return passkey


async def my_passkeys(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    body = await gql(client, MY_PASSKEYS, token=token)
    assert "errors" not in body, body
    found: list[dict[str, Any]] = body["data"]["me"]["passkeys"]
    return found


async def kinds(client: httpx.AsyncClient, token: str) -> list[str]:
    body = await gql(client, EVENT_KINDS, token=token)
    return [edge["node"]["kind"] for edge in body["data"]["securityEvents"]["edges"]]


async def rows(database_url: str, statement: Any) -> list[Any]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(statement)).all())
    finally:
        await engine.dispose()


def assert_refused(answer: dict[str, Any], code: str, field: str | None) -> None:
    assert answer["__typename"] == "AuthError", answer
    assert (answer["code"], answer["field"]) == (code, field), answer


# -- registration ---------------------------------------------------------------------------


async def test_registration_adds_a_passkey_named_by_its_make_with_event_and_notice(
    client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, token = await new_user(client)
    ceremony = await start(client, token, attachment="CROSS_PLATFORM")
    assert ceremony["__typename"] == "PasskeyCeremony"
    assert ceremony["expiresIn"] == 300
    options = json.loads(ceremony["optionsJson"])
    assert options["rp"] == {"id": RP_ID, "name": "Strawgate"}
    assert options["user"]["name"] == email and options["user"]["displayName"] == email
    assert options["authenticatorSelection"] == {
        "authenticatorAttachment": "cross-platform",
        "residentKey": "required",
        "requireResidentKey": True,
        "userVerification": "required",
    }
    assert options["attestation"] == "none"
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -8, -257]
    assert options["excludeCredentials"] == []
    assert options["timeout"] == 300_000

    key = SoftAuthenticator(aaguid=YUBIKEY, backed_up=False, backup_eligible=False)
    answer = key.register(options)
    passkey = await finish(client, token, ceremony["challengeToken"], answer)

    assert passkey["__typename"] == "Passkey", passkey
    assert passkey["name"] == "YubiKey 5 Series with NFC"
    assert passkey["backedUp"] is False and passkey["lastUsedAt"] is None
    assert passkey["createdAt"].startswith(clock.now().strftime("%Y-%m-%dT%H:%M:%S"))
    listed = {key: value for key, value in passkey.items() if key != "__typename"}
    assert await my_passkeys(client, token) == [listed]
    assert (await kinds(client, token))[0] == "PASSKEY_ADDED"
    mail = await smtp.wait_for(email)
    assert "A passkey was added" in mail.subject
    assert '"YubiKey 5 Series with NFC"' in mail.text()


async def test_a_passkey_is_named_by_the_user_else_its_make_else_passkey(
    client: httpx.AsyncClient,
) -> None:
    _, token = await new_user(client)
    named = await register(client, token, name="  Work laptop  ")
    blank = await register(client, token, SoftAuthenticator(aaguid=BITWARDEN), name="   ")
    unknown = await register(client, token, SoftAuthenticator(aaguid=uuid.uuid4()))
    unsaid = await register(client, token, SoftAuthenticator(aaguid=NO_AAGUID))

    assert named["name"] == "Work laptop"
    assert blank["name"] == "Bitwarden"
    assert unknown["name"] == unsaid["name"] == "Passkey"
    assert named["backedUp"] is True


@pytest.mark.parametrize(
    "name", ["x" * 65, "bad\x00name", "tab\tname", "evil\u202etxt.exe", "zero\u200bwidth"]
)
async def test_a_bad_name_is_refused_and_adds_nothing(client: httpx.AsyncClient, name: str) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    answer = SoftAuthenticator().register(ceremony["optionsJson"])

    refused = await finish(client, token, ceremony["challengeToken"], answer, name=name)

    assert_refused(refused, "INVALID_INPUT", "name")
    assert await my_passkeys(client, token) == []


async def test_passkeys_are_listed_newest_first_and_excluded_from_a_new_registration(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _, token = await new_user(client)
    first, second = SoftAuthenticator(transports=["usb", "nfc"]), SoftAuthenticator()
    one = await register(client, token, first)
    clock.advance(seconds=5)
    two = await register(client, token, second)

    assert [p["id"] for p in await my_passkeys(client, token)] == [two["id"], one["id"]]
    options = json.loads((await start(client, token))["optionsJson"])
    excluded = {e["id"]: e.get("transports") for e in options["excludeCredentials"]}
    assert excluded == {
        b64url(first.credential_id): ["nfc", "usb"],
        b64url(second.credential_id): ["hybrid", "internal"],
    }


async def test_the_user_handle_is_64_random_bytes_stable_across_registrations(
    client: httpx.AsyncClient,
) -> None:
    email, token = await new_user(client)
    _, other_token = await new_user(client)
    handles = []
    for _ in range(2):
        options = json.loads((await start(client, token))["optionsJson"])
        handles.append(from_b64url(options["user"]["id"]))
    other = from_b64url(json.loads((await start(client, other_token))["optionsJson"])["user"]["id"])

    assert len(handles[0]) == 64 and handles[0] == handles[1]
    assert other != handles[0] and len(other) == 64
    me = (await gql(client, "{ me { id } }", token=token))["data"]["me"]["id"]
    for leak in (email.encode(), uuid.UUID(me).bytes, str(me).encode()):
        assert leak not in handles[0]


async def test_registering_needs_a_recent_sign_in(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token = await new_user(client)
    clock.advance(seconds=WINDOW + 1)

    assert_refused(await start(client, token), "REAUTHENTICATION_REQUIRED", None)
    fresh = (await signed_in(client, email))["accessToken"]
    assert (await start(client, fresh))["__typename"] == "PasskeyCeremony"


async def test_passkey_operations_need_a_signed_in_user(client: httpx.AsyncClient) -> None:
    documents: list[tuple[str, dict[str, Any]]] = [
        (START, {"i": {}}),
        (FINISH, {"i": {"challengeToken": "x", "credentialJson": "{}"}}),
        (RENAME, {"i": {"id": str(uuid.uuid4()), "name": "x"}}),
        (DELETE, {"i": {"id": str(uuid.uuid4())}}),
    ]
    for document, variables in documents:
        for headers in ({}, {"authorization": "Bearer not-a-token"}):
            body = await gql(client, document, variables, headers=headers)
            assert body["data"] is None
            assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_pretty_printed_credential_json_is_accepted(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    answer = json.dumps(json.loads(SoftAuthenticator().register(ceremony["optionsJson"])), indent=2)
    passkey = await finish(client, token, ceremony["challengeToken"], answer)
    assert passkey["__typename"] == "Passkey", passkey


async def test_an_android_app_registers_from_its_apk_key_hash_origin(
    client: httpx.AsyncClient,
) -> None:
    _, token = await new_user(client)
    passkey = await register(client, token, SoftAuthenticator(origin=APK_ORIGIN))
    assert passkey["name"] == "Passkey"


# -- refusals --------------------------------------------------------------------------------

BAD_ANSWERS: dict[str, dict[str, Any]] = {
    "another origin": {"origin": "https://evil.example.net"},
    "a subdomain not listed": {"origin": "https://app.example.com"},
    "another RP ID's hash": {"rp_id": "evil.example.net"},
    "user not verified": {"flags": 0x01 | 0x08 | 0x10},
    "user not present": {"flags": 0x04},
    "an assertion's type": {"kind": "webauthn.get"},
    "another challenge": {"challenge": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
}


@pytest.mark.parametrize("bad", list(BAD_ANSWERS))
async def test_a_bad_answer_is_refused_and_spends_the_ceremony(
    client: httpx.AsyncClient, bad: str
) -> None:
    _, token = await new_user(client)
    key = SoftAuthenticator()
    ceremony = await start(client, token)

    refused = await finish(
        client,
        token,
        ceremony["challengeToken"],
        key.register(ceremony["optionsJson"], **BAD_ANSWERS[bad]),
    )

    assert_refused(refused, "INVALID_INPUT", "credentialJson")
    honest = key.register(ceremony["optionsJson"])
    again = await finish(client, token, ceremony["challengeToken"], honest)
    assert_refused(again, "INVALID_TOKEN", "challengeToken")
    assert await my_passkeys(client, token) == []


@pytest.mark.parametrize("garbage", ["", "not json", "[]", '{"id": "x"}', "{" * 5000])
async def test_garbage_is_refused_as_unverifiable(client: httpx.AsyncClient, garbage: str) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    assert_refused(
        await finish(client, token, ceremony["challengeToken"], garbage),
        "INVALID_INPUT",
        "credentialJson",
    )


async def test_an_answer_made_for_another_ceremony_is_refused(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    key = SoftAuthenticator()
    first, second = await start(client, token), await start(client, token)
    answer = key.register(first["optionsJson"])

    refused = await finish(client, token, second["challengeToken"], answer)

    assert_refused(refused, "INVALID_INPUT", "credentialJson")
    assert (await finish(client, token, first["challengeToken"], answer))["__typename"] == "Passkey"


async def test_another_users_ceremony_is_unknown_to_them_and_stays_its_owners(
    client: httpx.AsyncClient,
) -> None:
    _, owner = await new_user(client)
    _, stranger = await new_user(client)
    ceremony = await start(client, owner)
    answer = SoftAuthenticator().register(ceremony["optionsJson"])

    taken = await finish(client, stranger, ceremony["challengeToken"], answer)

    assert_refused(taken, "INVALID_TOKEN", "challengeToken")
    assert await my_passkeys(client, stranger) == []
    assert (await finish(client, owner, ceremony["challengeToken"], answer))[
        "__typename"
    ] == "Passkey"


async def test_a_ceremony_is_finished_only_on_the_session_that_started_it(
    client: httpx.AsyncClient,
) -> None:
    email, token = await new_user(client)
    other_session = (await signed_in(client, email))["accessToken"]
    ceremony = await start(client, token)
    answer = SoftAuthenticator().register(ceremony["optionsJson"])

    elsewhere = await finish(client, other_session, ceremony["challengeToken"], answer)

    assert_refused(elsewhere, "INVALID_TOKEN", "challengeToken")
    assert (await finish(client, token, ceremony["challengeToken"], answer))[
        "__typename"
    ] == "Passkey"


async def test_a_ceremony_expires_after_five_minutes(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _, token = await new_user(client)
    late, in_time = await start(client, token), await start(client, token)
    key = SoftAuthenticator()
    clock.advance(seconds=299)
    assert (
        await finish(client, token, in_time["challengeToken"], key.register(in_time["optionsJson"]))
    )["__typename"] == "Passkey"
    clock.advance(seconds=1)

    answer = SoftAuthenticator().register(late["optionsJson"])
    assert_refused(
        await finish(client, token, late["challengeToken"], answer),
        "INVALID_TOKEN",
        "challengeToken",
    )


async def test_a_ceremony_token_is_single_use(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    await finish(
        client,
        token,
        ceremony["challengeToken"],
        SoftAuthenticator().register(ceremony["optionsJson"]),
    )

    replayed = SoftAuthenticator().register(ceremony["optionsJson"])
    again = await finish(client, token, ceremony["challengeToken"], replayed)

    assert_refused(again, "INVALID_TOKEN", "challengeToken")
    assert len(await my_passkeys(client, token)) == 1


async def test_an_unknown_or_malformed_ceremony_token_is_refused(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    answer = SoftAuthenticator().register(ceremony["optionsJson"])
    real = ceremony["challengeToken"]
    altered = real[:-1] + ("B" if real.endswith("A") else "A")  # one character off
    for bogus in ("", "x" * 129, "not-a-token", altered):
        assert_refused(
            await finish(client, token, bogus, answer), "INVALID_TOKEN", "challengeToken"
        )


async def test_two_racing_finishes_add_exactly_one_passkey(
    passkey_app: Starlette, client: httpx.AsyncClient
) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    answers = [SoftAuthenticator().register(ceremony["optionsJson"]) for _ in range(2)]

    async def attempt(answer: str) -> dict[str, Any]:
        async with client_for(passkey_app) as racer:
            return await finish(racer, token, ceremony["challengeToken"], answer)

    results = await asyncio.gather(*(attempt(answer) for answer in answers))

    assert sorted(r["__typename"] for r in results) == ["AuthError", "Passkey"]
    loser = next(r for r in results if r["__typename"] == "AuthError")
    assert (loser["code"], loser["field"]) == ("INVALID_TOKEN", "challengeToken")
    assert len(await my_passkeys(client, token)) == 1


async def test_a_credential_already_registered_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    _, token = await new_user(client)
    _, other = await new_user(client)
    key = SoftAuthenticator()
    await register(client, token, key)

    for who in (token, other):
        ceremony = await start(client, who)
        refused = await finish(
            client, who, ceremony["challengeToken"], key.register(ceremony["optionsJson"])
        )
        assert_refused(refused, "INVALID_INPUT", "credentialJson")
    assert len(await my_passkeys(client, token)) == 1
    assert await my_passkeys(client, other) == []
    assert (await kinds(client, token)).count("PASSKEY_ADDED") == 1
    total = await rows(database_url, select(func.count()).select_from(Passkey))
    assert total[0][0] == 1


async def test_an_account_holds_at_most_twenty_passkeys(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    for _ in range(19):
        await register(client, token)
    # Two ceremonies opened at 19: the first finished makes 20, the second is refused.
    first, second = await start(client, token), await start(client, token)
    done = await finish(
        client, token, first["challengeToken"], SoftAuthenticator().register(first["optionsJson"])
    )
    assert done["__typename"] == "Passkey"

    late = await finish(
        client, token, second["challengeToken"], SoftAuthenticator().register(second["optionsJson"])
    )
    assert_refused(late, "INVALID_INPUT", None)
    assert_refused(await start(client, token), "INVALID_INPUT", None)
    assert len(await my_passkeys(client, token)) == 20


async def test_unfinished_registrations_are_capped(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    _, token = await new_user(client)
    for _ in range(5):
        assert (await start(client, token))["__typename"] == "PasskeyCeremony"
    busy = await start(client, token)
    assert_refused(busy, "RATE_LIMITED", None)
    assert busy["retryAfter"] == 300
    clock.advance(seconds=300)
    assert (await start(client, token))["__typename"] == "PasskeyCeremony"


async def test_the_database_keeps_digests_and_public_keys_only(
    client: httpx.AsyncClient, database_url: str
) -> None:
    _, token = await new_user(client)
    ceremony = await start(client, token)
    challenge_token = ceremony["challengeToken"]
    await finish(
        client, token, challenge_token, SoftAuthenticator().register(ceremony["optionsJson"])
    )

    dump = await rows(
        database_url,
        text(
            "SELECT encode(token_hash, 'hex'), method, purpose FROM challenges"
            " WHERE method = 'PASSKEY'"
        ),
    )
    assert len(dump) == 1 and dump[0][1:] == ("PASSKEY", "PASSKEY_REGISTER")
    whole = json.dumps(
        [list(map(str, row)) for row in await rows(database_url, text("SELECT * FROM challenges"))]
    )
    assert challenge_token not in whole
    challenge = json.loads(ceremony["optionsJson"])["challenge"]
    assert from_b64url(challenge).hex() not in whole  # the WebAuthn challenge is derived


# -- management ------------------------------------------------------------------------------


async def test_rename_a_passkey(client: httpx.AsyncClient) -> None:
    _, token = await new_user(client)
    passkey = await register(client, token)

    renamed = await mutate(
        client, RENAME, {"i": {"id": passkey["id"], "name": " Phone "}}, token=token
    )

    assert renamed == {"__typename": "Passkey", "id": passkey["id"], "name": "Phone"}
    assert (await my_passkeys(client, token))[0]["name"] == "Phone"
    for bad in ("", "   ", "y" * 65, "a\u202eb"):
        refused = await mutate(
            client, RENAME, {"i": {"id": passkey["id"], "name": bad}}, token=token
        )
        assert_refused(refused, "INVALID_INPUT", "name")


async def test_only_the_owner_renames_or_deletes_and_any_other_id_is_the_same_refusal(
    client: httpx.AsyncClient,
) -> None:
    _, owner = await new_user(client)
    _, stranger = await new_user(client)
    passkey = await register(client, owner)
    gone = await register(client, owner)
    await mutate(client, DELETE, {"i": {"id": gone["id"]}}, token=owner)

    for who, target in (
        (stranger, passkey["id"]),
        (owner, gone["id"]),
        (owner, str(uuid.uuid4())),
        (owner, "not-an-id"),
        (owner, ""),
        (owner, "1' OR '1'='1"),
    ):
        renamed = await mutate(client, RENAME, {"i": {"id": target, "name": "x"}}, token=who)
        assert_refused(renamed, "INVALID_INPUT", "id")
        deleted = await mutate(client, DELETE, {"i": {"id": target}}, token=who)
        assert_refused(deleted, "INVALID_INPUT", "id")
        assert renamed["message"] == deleted["message"] == "No such passkey."
    assert [p["name"] for p in await my_passkeys(client, owner)] == ["Passkey"]


async def test_deleting_a_passkey_needs_a_recent_sign_in_and_is_recorded_and_mailed(
    client: httpx.AsyncClient, clock: MutableClock, smtp: SmtpSink
) -> None:
    email, token = await new_user(client)
    keep = await register(client, token, name="Keep")
    drop = await register(client, token, name="Old phone")
    await smtp.wait_for(email, count=2)  # the two "added" notices
    clock.advance(seconds=WINDOW + 1)

    stale = await mutate(client, DELETE, {"i": {"id": drop["id"]}}, token=token)
    assert_refused(stale, "REAUTHENTICATION_REQUIRED", None)
    fresh = (await signed_in(client, email))["accessToken"]
    deleted = await mutate(client, DELETE, {"i": {"id": drop["id"]}}, token=fresh)

    assert deleted["__typename"] == "User"
    assert deleted["passkeys"] == [{"id": keep["id"]}]
    assert (await kinds(client, fresh))[0] == "PASSKEY_REMOVED"
    removed = await smtp.wait_for(email, where=lambda mail: "removed" in mail.subject)
    assert '"Old phone"' in removed.text()
    assert len([m for m in smtp.mails(email) if "removed" in m.subject]) == 1


async def test_deleting_the_account_deletes_its_passkeys(
    client: httpx.AsyncClient, database_url: str
) -> None:
    _, token = await new_user(client)
    await register(client, token)
    await register(client, token)
    _, other = await new_user(client)
    await register(client, other)

    deleted = await mutate(client, DELETE_ACCOUNT, {"i": {"password": PASSWORD}}, token=token)

    assert deleted["__typename"] == "DeleteAccountResult", deleted
    left = await rows(database_url, select(func.count()).select_from(Passkey))
    assert left[0][0] == 1


async def test_the_export_lists_passkeys_without_their_keys(
    client: httpx.AsyncClient, database_url: str
) -> None:
    _, token = await new_user(client)
    key = SoftAuthenticator(aaguid=YUBIKEY)
    passkey = await register(client, token, key)

    document = json.loads((await gql(client, EXPORT, token=token))["data"]["exportAccount"]["json"])

    (exported,) = document["passkeys"]
    assert exported["id"] == passkey["id"] and exported["name"] == passkey["name"]
    assert from_b64url(exported["credentialId"]) == key.credential_id
    assert exported["aaguid"] == str(YUBIKEY)
    (public_key,) = (await rows(database_url, select(Passkey.public_key)))[0]
    assert public_key.hex() not in json.dumps(document)
    assert "publicKey" not in exported


async def test_passkeys_are_not_configured_without_an_rp_id(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> None:
    application = create_app(make_settings(), clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as http:
        _, token = await new_user(http)
        refusals = [
            await start(http, token),
            await finish(http, token, "x", "{}"),
            await mutate(http, RENAME, {"i": {"id": str(uuid.uuid4()), "name": "x"}}, token=token),
            await mutate(http, DELETE, {"i": {"id": str(uuid.uuid4())}}, token=token),
        ]
        for refused in refusals:
            assert refused["code"] == "INVALID_INPUT", refused
            assert "not configured" in refused["message"]
        assert await my_passkeys(http, token) == []


async def test_users_show_counts_passkeys(
    client: httpx.AsyncClient, passkey_app: Starlette
) -> None:
    from db.services.operator import Operator

    email, token = await new_user(client)
    await register(client, token)
    services = passkey_app.state.services
    operator = Operator(
        statements=services.auth.statements, clock=services.auth.clock, events=services.events
    )
    report = await operator.show(email)
    assert [p.name for p in report.passkeys] == ["Passkey"]
    assert report.to_json()["passkeys"][0]["name"] == "Passkey"


async def test_the_slice_works_on_the_embedded_database(
    make_settings: Callable[..., Settings], clock: MutableClock, tmp_path: Any
) -> None:
    """SQLite runs the same statements through SQLAlchemy (and orders writers by BEGIN
    IMMEDIATE instead of row locks)."""
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/strawgate.db", webauthn_rp_id=RP_ID
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application), client_for(application) as http:
        _, token = await new_user(http)
        first = await register(http, token, SoftAuthenticator(aaguid=YUBIKEY))
        clock.advance(seconds=1)
        ceremony = await start(http, token)
        answers = [SoftAuthenticator().register(ceremony["optionsJson"]) for _ in range(2)]
        raced = await asyncio.gather(
            *(finish(http, token, ceremony["challengeToken"], answer) for answer in answers)
        )
        assert sorted(r["__typename"] for r in raced) == ["AuthError", "Passkey"]
        second = next(r for r in raced if r["__typename"] == "Passkey")
        assert [p["id"] for p in await my_passkeys(http, token)] == [second["id"], first["id"]]
        renamed = await mutate(http, RENAME, {"i": {"id": first["id"], "name": "Key"}}, token=token)
        assert renamed["name"] == "Key"
        deleted = await mutate(http, DELETE, {"i": {"id": second["id"]}}, token=token)
        assert deleted["passkeys"] == [{"id": first["id"]}]


# -- settings --------------------------------------------------------------------------------


def rp(**values: Any) -> Any:
    return Settings(_env_file=None, **{"environment": "production", **values}).relying_party()


def test_the_relying_party_from_the_settings() -> None:
    assert rp() is None
    party = rp(
        webauthn_rp_id="Example.COM",
        webauthn_origins=f"https://a.example.com:8443, https://example.com:443,{APK_ORIGIN}",
    )
    assert party.id == "example.com" and party.name == "Strawgate"
    assert party.origins == ("https://a.example.com:8443", "https://example.com", APK_ORIGIN)
    assert rp(webauthn_rp_id="example.com").origins == ("https://example.com",)
    assert rp(webauthn_rp_id="example.com", product_name="Acme").name == "Acme"
    assert rp(webauthn_rp_id="example.com", webauthn_rp_name="Acme ID").name == "Acme ID"
    local = Settings(
        _env_file=None,
        environment="development",
        webauthn_rp_id="localhost",
        webauthn_origins="http://localhost:5173",
    )
    party = local.relying_party()
    assert party is not None and party.origins == ("http://localhost:5173",)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (
            {"webauthn_rp_id": "example.com", "webauthn_origins": "https://evil.com"},
            "not on WEBAUTHN_RP_ID",
        ),
        (
            {"webauthn_rp_id": "example.com", "webauthn_origins": "https://notexample.com"},
            "not on WEBAUTHN_RP_ID",
        ),
        (
            {"webauthn_rp_id": "example.com", "webauthn_origins": "http://example.com"},
            "must use https",
        ),
        (
            {"webauthn_rp_id": "example.com", "webauthn_origins": "https://example.com/login"},
            "is not an origin",
        ),
        (
            {"webauthn_rp_id": "example.com", "webauthn_origins": "android:apk-key-hash:short"},
            "43 characters",
        ),
        ({"webauthn_rp_id": "https://example.com"}, "WEBAUTHN_RP_ID must be a host name"),
        ({"webauthn_rp_id": "127.0.0.1"}, "WEBAUTHN_RP_ID must be a host name"),
        ({"webauthn_origins": "https://example.com"}, "without WEBAUTHN_RP_ID"),
    ],
)
def test_a_relying_party_that_cannot_work_is_refused_in_one_line(
    values: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        rp(**values)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_user_handles_are_unique_in_the_schema() -> None:
    assert User.__table__.c.webauthn_user_handle.unique
    assert Passkey.__table__.c.credential_id.unique
