"""What a stranger or a race must not achieve against one account: a session that
outlives a password change, a signup squatted for good, a deadlock between the owner's
own requests."""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import (
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    login,
    mutate,
    post,
    signed_up,
    signup,
    verify_otp,
)
from tests.smtp import Delivered, SmtpSink

STRANGER = "the stranger's passphrase"


def is_reset_code(mail: Delivered) -> bool:
    return mail.subject.startswith("Reset your")


async def waiting_for_a_lock(conn: AsyncConnection) -> None:
    """Until some other backend of this database waits for a lock."""
    deadline = time.monotonic() + 5
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while (await conn.execute(query)).scalar_one() < 1:
        assert time.monotonic() < deadline, "the request never waited for the account's lock"
        await asyncio.sleep(0.01)


async def test_a_sign_in_that_checked_the_old_password_opens_no_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, database_url: str
) -> None:
    """The password changes (in a transaction still open) after a login has checked it:
    the login waits for the change and then refuses, instead of opening a session the
    change's "end every other session" has already missed."""
    email, _session = await signed_up(mail_client, smtp)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as changer, engine.connect() as watcher:
            change = await changer.begin()
            await changer.execute(
                text(
                    "UPDATE users SET password_hash = 'changed', password_changed_at = now()"
                    " WHERE email = :e"
                ),
                {"e": email},
            )
            racing = asyncio.create_task(login(mail_client, email, PASSWORD))
            await waiting_for_a_lock(watcher)  # checked the old hash, now waits
            assert not racing.done()
            await change.commit()
            answer = await racing
    finally:
        await engine.dispose()
    assert answer["code"] == "INVALID_CREDENTIALS", answer


async def test_logins_racing_a_password_change_keep_no_session(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    """The owner changes the password while someone who knows the old one keeps logging
    in: whatever they got is dead afterwards."""
    from tests.gql import CHANGE_PASSWORD, REFRESH, gql

    email, owner = await signed_up(mail_client, smtp)
    grabbed: list[str] = []
    done = asyncio.Event()

    async def intruder() -> None:
        while not done.is_set():
            answer = await login(mail_client, email, PASSWORD)
            if answer["__typename"] == "AuthSession":
                grabbed.append(answer["refreshToken"])

    intruders = [asyncio.create_task(intruder()) for _ in range(3)]
    await asyncio.sleep(0.05)
    changed = await gql(
        mail_client,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD, "newPassword": "the owner's new passphrase"}},
        token=owner["accessToken"],
    )
    done.set()
    await asyncio.gather(*intruders)
    assert changed["data"]["changePassword"]["__typename"] == "AuthSession"
    assert grabbed, "no login got in before the change: the race was not run"
    for token in grabbed:
        body = await gql(mail_client, REFRESH, {"i": {"refreshToken": token}})
        assert body["data"]["refresh"]["code"] == "INVALID_TOKEN"


async def test_nobody_keeps_a_signup_squatted(
    mail_client: httpx.AsyncClient, smtp: SmtpSink, clock: MutableClock
) -> None:
    """A stranger's signup with the owner's address is replaced once its code expired,
    however the stranger (or anyone) keeps fresh challenges coming."""
    email = unique_email()
    await signup(mail_client, email, STRANGER)
    await smtp.wait_for(email)
    for _ in range(2):  # at 4 and 8 minutes: a fresh code of every kind
        clock.advance(minutes=4)
        assert (await login(mail_client, email, STRANGER))["__typename"] == "OtpChallenge"
        await mutate(mail_client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
        await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    await smtp.wait_for(email, count=7)  # the signup's code and six more, all unused
    clock.advance(minutes=3)  # 11 minutes after the stranger's signup
    mine = await signup(mail_client, email, PASSWORD)
    mail = await smtp.wait_for(email, count=8)
    session = await verify_otp(mail_client, mine["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    assert (await login(mail_client, email, STRANGER))["code"] == "INVALID_CREDENTIALS"


async def test_parallel_resets_of_one_account_do_not_deadlock(
    mail_client: httpx.AsyncClient, smtp: SmtpSink
) -> None:
    email, _session = await signed_up(mail_client, smtp)
    sent_codes = 0
    for round_ in range(8):
        pairs = []
        for _ in range(2):
            challenge = await mutate(mail_client, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
            sent_codes += 1
            mail = await smtp.wait_for(email, count=sent_codes, where=is_reset_code)
            pairs.append((challenge["challengeToken"], mail.code()))
        responses = await asyncio.gather(
            *(
                post(
                    mail_client,
                    RESET_PASSWORD,
                    {
                        "i": {
                            "challengeToken": token,
                            "code": code,
                            "newPassword": f"new passphrase {round_} {n}",
                        }
                    },
                )
                for n, (token, code) in enumerate(pairs)
            )
        )
        bodies = [response.json() for response in responses]
        assert all("errors" not in body for body in bodies), bodies
        kinds = sorted(body["data"]["resetPassword"]["__typename"] for body in bodies)
        # The first reset voids the other's code: one session, one INVALID_TOKEN.
        assert kinds == ["AuthError", "AuthSession"], bodies
