"""Mail belongs to the account that caused it, not to an address (issue 12): an address
changes hands, and what one account caused there is never another's to export or to
erase, down to a mail still waiting out an SMTP outage. With real mail through aiosmtpd
and the outbox table read as it is."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from sqlalchemy import text
from starlette.applications import Starlette

from db.session import Statements
from tests.conftest import MutableClock
from tests.gql import (
    PASSWORD,
    REQUEST_LOGIN_CODE,
    gql,
    login,
    mutate,
    signed_up,
    signup,
    verify_otp,
)
from tests.graph.test_lifecycle import (
    EXPORT,
    change_email,
    delete_account,
    moved_account,
    new_address,
)
from tests.smtp import Delivered, SmtpSink

# What each kind of mail says first: how a person tells them apart in a mailbox.
VERIFY_SUBJECT = "Confirm your email address"
CODE_SUBJECT = "Your sign-in code"
CHANGED_SUBJECT = "Your Strawgate email address was changed"


def subject(start: str) -> Any:
    def matches(mail: Delivered) -> bool:
        return mail.subject.startswith(start)

    return matches


async def outbox(statements: Statements) -> list[dict[str, Any]]:
    """Every row of the outbox, as stored, oldest first."""
    async with statements.connection() as conn:
        rows = await conn.all(text("SELECT * FROM outbox ORDER BY created_at"), {})
    return [dict(row) for row in rows]


def owned_by(rows: list[dict[str, Any]], user_id: uuid.UUID | None) -> list[dict[str, Any]]:
    wanted = None if user_id is None else str(user_id)
    return [
        row
        for row in rows
        if (None if row.get("user_id") is None else str(row["user_id"])) == wanted
    ]


def to(rows: list[dict[str, Any]], address: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["recipient"] == address]


def kinds(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(recipient, template) of each row, sorted."""
    return sorted((row["recipient"], row["template"]) for row in rows)


async def exported_mail(http: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    body = await gql(http, EXPORT, token=token)
    assert "errors" not in body, body
    mail: list[dict[str, Any]] = json.loads(body["data"]["exportAccount"]["json"])["mail"]
    return mail


def listed(mail: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(to, kind) of each mail an export lists, sorted."""
    return sorted((entry["to"], entry["kind"]) for entry in mail)


async def signed_up_where_mail_waits(
    http: httpx.AsyncClient, smtp: SmtpSink, email: str, earlier: int
) -> tuple[dict[str, Any], Delivered]:
    """signed_up at an address that already has `earlier` verification mails (someone
    else's): the code is read from the newest. (The first session, the mail.)"""
    challenge = await signup(http, email, PASSWORD)
    assert challenge["__typename"] == "OtpChallenge", challenge
    mail = await smtp.wait_for(email, count=earlier + 1, where=subject(VERIFY_SUBJECT))
    session = await verify_otp(http, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession", session
    return session, mail


def mail_id(mail: Delivered) -> str:
    """The outbox row a delivered mail came from (its Message-ID is <row id@strawgate>)."""
    return str(mail.message["Message-ID"]).strip("<>").split("@")[0]


async def attempted(statements: Statements, row_id: Any) -> dict[str, Any]:
    """The outbox row once the sender has tried to send it and recorded the failure (a
    claim counts the attempt first, the error comes after): a bounded wait."""
    async with asyncio.timeout(5):
        while True:
            (row,) = [row for row in await outbox(statements) if row["id"] == row_id]
            if row["attempts"] >= 1 and row["last_error"] and row["claimed_until"] is None:
                return row
            await asyncio.sleep(0.02)


def user_id_of(session: dict[str, Any]) -> uuid.UUID:
    return uuid.UUID(session["user"]["id"])


async def test_an_address_asked_for_and_then_taken_by_another_keeps_its_owner_s_mail(
    mail_app: Starlette,
    mail_client: httpx.AsyncClient,
    smtp: SmtpSink,
    statements: Statements,
    clock: MutableClock,
) -> None:
    """X asks to move to A and never completes; V signs up at A. X's export lists X's own
    mail (to X's address, and the change code to A) and none of V's; V's lists V's and
    not X's code; X's deletion takes X's own mail and leaves all of V's, including a
    sign-in code still waiting out an SMTP outage, which is delivered once the server is
    back and signs V in."""
    x_email, x_session = await signed_up(mail_client, smtp)
    x_id = user_id_of(x_session)
    address = new_address()
    asked = await change_email(mail_client, x_session["accessToken"], address)
    assert asked["__typename"] == "OtpChallenge", asked
    await smtp.wait_for(address)  # X's change code, never used

    v_session, _mail = await signed_up_where_mail_waits(mail_client, smtp, address, earlier=0)
    v_id = user_id_of(v_session)
    first = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": address}})
    assert first["__typename"] == "OtpChallenge", first
    await smtp.wait_for(address, where=subject(CODE_SUBJECT))

    # The mail server refuses from now on: V's next code waits in the outbox.
    smtp.refuse = True
    waiting = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": address}})
    assert waiting["__typename"] == "OtpChallenge", waiting
    rows = await outbox(statements)
    assert kinds(to(rows, address)) == [
        (address, "change_email_code"),
        (address, "login_code"),
        (address, "login_code"),
        (address, "verify_email"),
    ]
    # The newest (the outbox orders one process's mails by created_at, strictly).
    pending = [row for row in to(rows, address) if row["template"] == "login_code"][-1]
    pending = await attempted(statements, pending["id"])
    assert pending["sent_at"] is None and pending["secrets_sealed"] is not None
    assert "451" in pending["last_error"], pending
    v_rows = [row for row in to(rows, address) if row["template"] != "change_email_code"]
    v_mail_ids = {str(row["id"]) for row in v_rows}
    assert len(v_mail_ids) == 3

    # Each export lists its own account's mail, whoever holds the address now.
    x_export = await exported_mail(mail_client, x_session["accessToken"])
    assert listed(x_export) == [(address, "change_email_code"), (x_email, "verify_email")]
    assert not v_mail_ids & {str(entry["id"]) for entry in x_export}
    v_export = await exported_mail(mail_client, v_session["accessToken"])
    assert listed(v_export) == [
        (address, "login_code"),
        (address, "login_code"),
        (address, "verify_email"),
    ]
    assert {str(entry["id"]) for entry in v_export} == v_mail_ids
    # ... as the outbox records it: each mail's account.
    assert kinds(owned_by(rows, v_id)) == kinds(v_rows)
    assert kinds(owned_by(rows, x_id)) == [
        (address, "change_email_code"),
        (x_email, "verify_email"),
    ]

    # X goes, with its own mail only.
    assert (await delete_account(mail_client, x_session["accessToken"]))["deleted"] is True
    rows = await outbox(statements)
    assert owned_by(rows, x_id) == []
    assert kinds(to(rows, x_email)) == [(x_email, "account_deleted")]
    assert owned_by(to(rows, x_email), None) == to(rows, x_email)  # it belongs to no one
    assert {str(row["id"]) for row in to(rows, address)} == v_mail_ids
    assert kinds(owned_by(rows, v_id)) == kinds(v_rows)
    (still,) = [row for row in rows if row["id"] == pending["id"]]
    assert still["sent_at"] is None and still["failed_at"] is None
    assert still["secrets_sealed"] is not None and still["next_attempt_at"] is not None

    # The server is back: V's waiting code goes out (after X's goodbye or before), and
    # it is V's to sign in with.
    smtp.refuse = False
    clock.advance(minutes=1)  # past the backoff, well within the code's ten minutes
    mail_app.state.mail_sender.wake()
    code_mail = await smtp.wait_for(address, count=2, where=subject(CODE_SUBJECT))
    assert code_mail.message["Message-ID"] == f"<{pending['id']}@strawgate>"
    signed_in = await verify_otp(mail_client, waiting["challengeToken"], code_mail.code())
    assert signed_in["__typename"] == "AuthSession", signed_in
    assert signed_in["user"]["id"] == str(v_id)
    goodbye = await smtp.wait_for(x_email, where=subject("Your Strawgate account was deleted"))
    assert goodbye.to.endswith(x_email)
    # X's change code went out once, before X was deleted, and never again.
    assert len(smtp.mails(address)) == 4


async def test_an_address_moved_away_from_and_then_taken_by_another_keeps_its_trail(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, statements: Statements
) -> None:
    """X moves from B to C; V signs up at B, fails a sign-in there and asks for a code.
    X's export lists X's mail at B (its verification, the notice of the change) and C,
    none of V's; X's deletion leaves V's mail at B and V's failed sign-ins at B as they
    were (not anonymised)."""
    b, c, moved = await moved_account(mail_client, smtp)
    x_id = user_id_of(moved)
    await smtp.wait_for(b, where=subject(CHANGED_SUBJECT))

    v_session, v_verification = await signed_up_where_mail_waits(mail_client, smtp, b, earlier=1)
    v_id = user_id_of(v_session)
    refused = await login(mail_client, b, "not the password of the new holder")
    assert refused["code"] == "INVALID_CREDENTIALS", refused
    asked = await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": b}})
    assert asked["__typename"] == "OtpChallenge", asked
    v_code = await smtp.wait_for(b, where=subject(CODE_SUBJECT))

    rows = await outbox(statements)
    x_mail = sorted([(b, "email_changed"), (b, "verify_email"), (c, "change_email_code")])
    v_mail_ids = {mail_id(v_verification), mail_id(v_code)}
    v_rows = [row for row in rows if str(row["id"]) in v_mail_ids]
    assert kinds(v_rows) == [(b, "login_code"), (b, "verify_email")]
    x_export = await exported_mail(mail_client, moved["accessToken"])
    assert listed(x_export) == x_mail
    assert not v_mail_ids & {str(entry["id"]) for entry in x_export}
    assert kinds(owned_by(rows, x_id)) == x_mail
    assert {str(row["id"]) for row in owned_by(rows, v_id)} == v_mail_ids

    trail = text(
        "SELECT id, kind, user_id, email, ip, user_agent FROM security_events"
        " WHERE kind = 'LOGIN_FAILED' ORDER BY id"
    )
    async with statements.connection() as conn:
        v_failures = [dict(row) for row in await conn.all(trail, {})]
    assert [(row["email"], str(row["user_id"])) for row in v_failures] == [(b, str(v_id))]
    assert v_failures[0]["ip"] and v_failures[0]["user_agent"]

    assert (await delete_account(mail_client, moved["accessToken"]))["deleted"] is True
    rows = await outbox(statements)
    assert owned_by(rows, x_id) == []
    assert {str(row["id"]) for row in to(rows, b)} == v_mail_ids
    assert kinds(to(rows, c)) == [(c, "account_deleted")]
    async with statements.connection() as conn:
        after = [dict(row) for row in await conn.all(trail, {})]
    assert after == v_failures  # V's trail at B, untouched
    # ... and V's account still has its address, its mail and its trail.
    v_export = await exported_mail(mail_client, v_session["accessToken"])
    assert {str(entry["id"]) for entry in v_export} == v_mail_ids
