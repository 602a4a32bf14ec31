"""The outbox and its sender, against real PostgreSQL and a real SMTP server (aiosmtpd).

Backoff, leases and expiry move with the test clock; real time is waited for only where a
test shows how soon a mail goes out."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from db.mail.message import MailTransport, RenderedMail
from db.mail.outbox import (
    MailSender,
    Outbox,
    backoff,
    erase_expired_secrets,
    mask_address,
    prune_outbox,
    reseal_outbox,
)
from db.mail.transport import SmtpTransport
from db.migrate import upgrade_head
from db.models import OutboxMail
from db.security.box import SecretBox
from db.session import Statements, create_engine
from db.settings import Settings
from tests.conftest import TEST_FERNET_KEY, MutableClock, OpenStatements, unique_email
from tests.smtp import SmtpSink, free_port

BOX = SecretBox([TEST_FERNET_KEY])
LEASE = timedelta(seconds=60)
CODE_TTL = timedelta(minutes=10)

MakeSender = Callable[..., MailSender]


class StubRenderer:
    """Stands in for the template renderer: the code on a line of its own."""

    def render(
        self,
        template: str,
        context: Mapping[str, Any],
        secrets: Mapping[str, str] | None,
        language: str | None = None,
    ) -> RenderedMail:
        if template == "broken":
            raise KeyError("no such template")
        code = (secrets or {}).get("code", "-")
        return RenderedMail(
            subject=f"{template} for {context.get('name', '')}",
            text=f"Your code:\n{code}\n",
            html=f"<p>{code}</p>",
        )


def new_code() -> str:
    return f"{secrets.randbelow(900000) + 100000}"


def smtp_transport(make_settings: Callable[..., Settings], port: int) -> SmtpTransport:
    sink = SmtpSink(port=port)
    return SmtpTransport.from_settings(make_settings(**sink.settings()))


@pytest.fixture
def transport(make_settings: Callable[..., Settings], smtp: SmtpSink) -> SmtpTransport:
    return smtp_transport(make_settings, smtp.port)


@pytest.fixture
def outbox(clock: MutableClock) -> Outbox:
    return Outbox(box=BOX, clock=clock, postgres=True)


@pytest.fixture
async def make_sender(
    open_statements: OpenStatements, clock: MutableClock, outbox: Outbox
) -> AsyncIterator[MakeSender]:
    """Senders, stopped at the end (before their pools close)."""
    made: list[MailSender] = []

    def make(statements: Statements, transport: MailTransport, **overrides: Any) -> MailSender:
        values: dict[str, Any] = {
            "outbox": outbox,
            "renderer": StubRenderer(),
            "clock": clock,
            "box": BOX,
            "poll_seconds": 5.0,
            "batch_size": 20,
            "lease": LEASE,
            "retry_max": timedelta(seconds=300),
            "give_up_after": timedelta(hours=24),
        }
        values.update(overrides)
        sender = MailSender(statements=statements, transport=transport, **values)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.stop(grace=1.0)


async def enqueue(
    statements: Statements,
    outbox: Outbox,
    *,
    to: str | None = None,
    code: str | None = None,
    template: str = "code",
    expire_in: timedelta | None = CODE_TTL,
    clock: MutableClock | None = None,
) -> uuid.UUID:
    secrets_ = {"code": code} if code is not None else None
    expire_at = clock.now() + expire_in if clock and secrets_ and expire_in else None
    async with statements.transaction() as tx:
        return await outbox.enqueue(
            tx,
            user_id=None,
            recipient=to or unique_email(),
            template=template,
            context={"name": "Ada", "minutes": 10},
            secrets=secrets_,
            secrets_expire_at=expire_at,
        )


async def row(statements: Statements, mail_id: uuid.UUID) -> dict[str, Any]:
    async with statements.engine.connect() as conn:
        found = await conn.execute(select(OutboxMail.__table__).where(OutboxMail.id == mail_id))
        return dict(found.mappings().one())


async def count_rows(statements: Statements) -> int:
    async with statements.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one())


def message_ids(sink: SmtpSink) -> list[str]:
    return [str(mail.message["Message-ID"]) for mail in sink.mails()]


async def wait_until(check: Callable[[], Awaitable[bool]], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.02)


async def idle(sender: MailSender) -> None:
    """Until the sender listens and has finished its first round (it then waits for a
    wake-up, or for its poll)."""

    async def listening() -> bool:
        return sender.listening

    await wait_until(listening)
    await asyncio.sleep(0.3)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose "mail server" accepts connections and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield int(server.getsockname()[1])


async def test_enqueue_then_wake_delivers_within_two_seconds(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    """The in-process wake-up: no NOTIFY (an outbox that does not send one) and a poll 5 s
    away, so only wake() explains a delivery within 2 s."""
    quiet = Outbox(box=BOX, clock=clock, postgres=False)
    sender = make_sender(statements, transport, outbox=quiet)
    await sender.start()
    await idle(sender)
    code, to = new_code(), unique_email()

    mail_id = await enqueue(statements, quiet, to=to, code=code, clock=clock)
    committed = time.monotonic()
    quiet.wake()
    stored = await row(statements, mail_id)
    delivered = await smtp.wait_for(to, timeout=2.0)

    assert delivered.received_at - committed < 2.0
    assert delivered.code() == code
    assert delivered.message["Message-ID"] == f"<{mail_id}@strawgate>"
    assert code not in repr(stored), "the code is in the database in clear"

    async def sent() -> bool:
        return (await row(statements, mail_id))["sent_at"] is not None

    await wait_until(sent)
    done = await row(statements, mail_id)
    assert done["sent_at"] == clock.now()
    assert done["next_attempt_at"] is None
    assert done["secrets_sealed"] is None
    assert done["claimed_until"] is None and done["claim_id"] is None
    assert code not in repr(done)


async def test_notify_from_another_process_wakes_the_sender(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    """A mail queued by another process (its own pool and Outbox, no wake() here) goes out
    within 2 s though the sender polls only every 5 s: NOTIFY woke it. Three times, each
    right after the sender went idle, so a lucky poll cannot explain it."""
    sender = make_sender(await open_statements(), transport)
    elsewhere, other_outbox = await open_statements(), Outbox(box=BOX, clock=clock, postgres=True)
    await sender.start()
    await idle(sender)
    for _ in range(3):
        to = unique_email()
        await enqueue(elsewhere, other_outbox, to=to, code=new_code(), clock=clock)
        committed = time.monotonic()
        delivered = await smtp.wait_for(to, timeout=2.0)
        assert delivered.received_at - committed < 2.0
        await asyncio.sleep(0.3)  # idle again


async def test_the_listen_comes_back_after_its_connection_drops(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    statements = await open_statements()
    sender = make_sender(statements, transport)
    elsewhere, other_outbox = await open_statements(), Outbox(box=BOX, clock=clock, postgres=True)
    await sender.start()
    await idle(sender)

    listeners = text(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
    )
    async with statements.engine.connect() as conn:
        (old_pid,) = (await conn.execute(listeners)).scalars().all()
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": old_pid})

    async def listening_anew() -> bool:
        async with statements.engine.connect() as conn:
            pids = (await conn.execute(listeners)).scalars().all()
        return bool(pids) and old_pid not in pids

    await wait_until(listening_anew)
    await idle(sender)  # listening again
    to = unique_email()
    await enqueue(elsewhere, other_outbox, to=to, code=new_code(), clock=clock)
    committed = time.monotonic()
    delivered = await smtp.wait_for(to, timeout=2.0)
    assert delivered.received_at - committed < 2.0


async def test_a_mail_server_that_is_down_delays_mails_but_loses_none(
    statements: Statements,
    make_sender: MakeSender,
    make_settings: Callable[..., Settings],
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sink = SmtpSink(port=free_port())  # nothing listens there yet
    sender = make_sender(statements, smtp_transport(make_settings, sink.port))
    to, code = unique_email(), new_code()
    mail_id = await enqueue(statements, outbox, to=to, code=code, clock=clock)

    assert await sender.run_once() == 1
    pending = await row(statements, mail_id)
    assert pending["attempts"] == 1
    assert pending["next_attempt_at"] > clock.now()  # backoff
    assert pending["last_error"] and "connection failed" in pending["last_error"]
    assert pending["claimed_until"] is None and pending["claim_id"] is None
    assert pending["sent_at"] is None and pending["failed_at"] is None
    assert pending["secrets_sealed"] is not None
    assert await sender.run_once() == 0  # not due before the backoff has passed

    clock.advance(seconds=2)
    sink.start()
    try:
        assert await sender.run_once() == 1
        assert await sender.run_once() == 0
        assert message_ids(sink) == [f"<{mail_id}@strawgate>"]
        assert sink.mails(to)[0].code() == code
    finally:
        sink.stop()
    sent = await row(statements, mail_id)
    assert sent["sent_at"] == clock.now() and sent["attempts"] == 2
    assert sent["last_error"] is None and sent["secrets_sealed"] is None


async def test_a_temporary_refusal_is_retried_and_delivered_once(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, transport)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)
    smtp.refuse = True
    assert await sender.run_once() == 1
    refused = await row(statements, mail_id)
    assert refused["last_error"] and "451" in refused["last_error"]
    assert refused["next_attempt_at"] > clock.now()

    smtp.refuse = False
    clock.advance(seconds=2)
    assert await sender.run_once() == 1
    assert message_ids(smtp) == [f"<{mail_id}@strawgate>"]
    assert (await row(statements, mail_id))["sent_at"] is not None


async def test_backoff_doubles_up_to_its_cap() -> None:
    cap = timedelta(seconds=300)
    for attempts, nominal in ((1, 1), (2, 2), (3, 4), (6, 32), (9, 256), (10, 300), (500, 300)):
        wait = backoff(attempts, cap)
        assert nominal * 0.8 <= wait.total_seconds() <= nominal


async def test_a_mail_queued_before_a_restart_is_sent_after_it(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    """Queued by a process that stopped before sending it; the next process sends it."""
    before = await open_statements()
    first = make_sender(before, transport)
    to, code = unique_email(), new_code()
    mail_id = await enqueue(before, outbox, to=to, code=code, clock=clock)
    await first.stop()
    await before.close()

    stored = await row(before, mail_id)
    assert stored["secrets_sealed"] is not None
    assert code not in repr(stored), "the code is in the database in clear"
    assert code in BOX.open(stored["secrets_sealed"])

    after = make_sender(await open_statements(), transport)
    await after.start()
    assert (await smtp.wait_for(to, timeout=2.0)).code() == code


async def test_two_senders_share_one_outbox_without_sending_a_mail_twice(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    statements = await open_statements()
    queued = [await enqueue(statements, outbox, code=new_code(), clock=clock) for _ in range(40)]
    senders = [
        make_sender(await open_statements(), transport, batch_size=5, concurrency=3)
        for _ in range(2)
    ]
    claimed = [0, 0]

    async def drain(index: int) -> None:
        while taken := await senders[index].run_once():
            claimed[index] += taken

    await asyncio.gather(drain(0), drain(1))

    ids = message_ids(smtp)
    assert sorted(ids) == sorted(f"<{mail_id}@strawgate>" for mail_id in queued)
    assert len(ids) == len(set(ids)) == 40
    assert sum(claimed) == 40
    for mail_id in queued:
        assert (await row(statements, mail_id))["sent_at"] is not None


async def test_a_lease_keeps_a_mail_from_others_until_it_runs_out(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    """A claims a mail and dies before sending; B takes it over once the lease has run
    out; A's late result does not overwrite B's."""
    statements = await open_statements()
    a = make_sender(statements, transport)
    b = make_sender(await open_statements(), transport)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)

    (held,) = await a.claim()
    claimed = await row(statements, mail_id)
    assert claimed["claimed_until"] == clock.now() + LEASE and claimed["attempts"] == 1
    assert await b.run_once() == 0
    clock.advance(seconds=LEASE.total_seconds() - 1)
    assert await b.run_once() == 0

    clock.advance(seconds=1)
    assert await b.run_once() == 1
    assert message_ids(smtp) == [f"<{mail_id}@strawgate>"]
    sent = await row(statements, mail_id)
    assert sent["sent_at"] is not None and sent["attempts"] == 2

    assert await a.mark_failed(held, "late failure") is False
    assert await a.mark_given_up(held, "late give-up") is False
    assert await a.mark_sent(held) is False
    await a.deliver([held])  # its lease is over: it does not send
    assert await row(statements, mail_id) == sent
    assert len(smtp.mails()) == 1


async def test_stop_releases_the_claims_it_holds(
    statements: Statements,
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, transport)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)
    assert len(await sender.claim()) == 1
    assert (await row(statements, mail_id))["claimed_until"] is not None

    await sender.stop()
    released = await row(statements, mail_id)
    assert released["claimed_until"] is None and released["claim_id"] is None
    assert released["next_attempt_at"] is not None

    # Another sender takes it at once, without waiting for the lease.
    assert await make_sender(await open_statements(), transport).run_once() == 1
    assert message_ids(smtp) == [f"<{mail_id}@strawgate>"]


async def test_queueing_waits_for_no_mail_server_and_stop_cancels_a_hung_send(
    statements: Statements,
    make_sender: MakeSender,
    make_settings: Callable[..., Settings],
    blackhole: int,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    """The mail server accepts connections and never answers: the sender hangs in its
    send, yet queueing a mail (and committing it) takes no time; stop() gives up on the
    hung send after its grace and releases the claim."""
    sender = make_sender(statements, smtp_transport(make_settings, blackhole))
    await sender.start()
    first = await enqueue(statements, outbox, code=new_code(), clock=clock)
    outbox.wake()

    async def claimed() -> bool:
        return (await row(statements, first))["claimed_until"] is not None

    await wait_until(claimed)
    started = time.monotonic()
    second = await enqueue(statements, outbox, code=new_code(), clock=clock)
    outbox.wake()
    assert time.monotonic() - started < 0.5

    started = time.monotonic()
    await sender.stop(grace=0.3)
    assert time.monotonic() - started < 2.0
    for mail_id in (first, second):
        pending = await row(statements, mail_id)
        assert pending["claimed_until"] is None and pending["claim_id"] is None
        assert pending["next_attempt_at"] is not None and pending["sent_at"] is None


async def test_a_mail_whose_code_expired_is_not_sent(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, transport)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)
    clock.advance(seconds=CODE_TTL.total_seconds())

    assert await sender.run_once() == 1
    assert smtp.mails() == []
    dropped = await row(statements, mail_id)
    assert dropped["failed_at"] == clock.now() and dropped["sent_at"] is None
    assert dropped["next_attempt_at"] is None and dropped["secrets_sealed"] is None
    assert dropped["claimed_until"] is None


async def test_a_failing_code_mail_is_given_up_once_its_code_expires(
    statements: Statements,
    make_sender: MakeSender,
    make_settings: Callable[..., Settings],
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, smtp_transport(make_settings, free_port()))
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock, expire_in=CODE_TTL)
    assert await sender.run_once() == 1  # down: retried later
    assert (await row(statements, mail_id))["next_attempt_at"] is not None

    # Retried while the code lasts; then given up rather than retried for a day.
    for _ in range(20):
        clock.advance(seconds=60)
        await sender.run_once()
    dropped = await row(statements, mail_id)
    assert dropped["failed_at"] is not None and dropped["next_attempt_at"] is None
    assert dropped["secrets_sealed"] is None
    assert dropped["failed_at"] <= clock.now()


async def test_an_undeliverable_mail_is_given_up_after_give_up_after(
    statements: Statements,
    make_sender: MakeSender,
    make_settings: Callable[..., Settings],
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(
        statements, smtp_transport(make_settings, free_port()), give_up_after=timedelta(hours=1)
    )
    mail_id = await enqueue(statements, outbox, template="notice")  # no code, no expiry
    assert await sender.run_once() == 1
    clock.advance(minutes=59)
    assert await sender.run_once() == 1
    retried = await row(statements, mail_id)
    assert retried["attempts"] == 2 and retried["next_attempt_at"] is not None

    clock.advance(minutes=2)
    assert await sender.run_once() == 1
    dropped = await row(statements, mail_id)
    assert dropped["failed_at"] == clock.now() and dropped["next_attempt_at"] is None
    assert dropped["last_error"] and "connection failed" in dropped["last_error"]
    assert await sender.run_once() == 0


async def test_a_mail_that_cannot_be_rendered_is_given_up_at_once(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    broken = await enqueue(statements, outbox, template="broken", code=new_code(), clock=clock)
    sender = make_sender(statements, transport)
    failures: list[str] = []
    sender.on_failure = failures.append

    assert await sender.run_once() == 1
    assert smtp.mails() == []
    dropped = await row(statements, broken)
    assert dropped["failed_at"] == clock.now() and dropped["next_attempt_at"] is None
    assert dropped["attempts"] == 1 and "rendered" in dropped["last_error"]
    assert dropped["secrets_sealed"] is None
    assert failures == ["unrenderable"]


async def test_a_mail_this_process_cannot_decrypt_waits_for_one_that_can(
    statements: Statements,
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rolling key rotation: the mail is sealed under the new key by a process that has
    it; a process still on the old key list leaves the mail for one that has it."""
    from cryptography.fernet import Fernet

    old, new = (Fernet.generate_key().decode() for _ in range(2))
    rotated = Outbox(box=SecretBox([new, old]), clock=clock, postgres=True)
    to, code = unique_email(), new_code()
    mail_id = await enqueue(statements, rotated, to=to, code=code, clock=clock)
    sealed = (await row(statements, mail_id))["secrets_sealed"]
    lagging = make_sender(statements, transport, box=SecretBox([old]))
    failures: list[str] = []
    lagging.on_failure = failures.append

    with caplog.at_level(logging.INFO, logger="strawgate.mail"):
        assert await lagging.run_once() == 1
    assert smtp.mails() == []
    waiting = await row(statements, mail_id)
    assert waiting["failed_at"] is None and waiting["sent_at"] is None
    assert waiting["next_attempt_at"] > clock.now()  # backoff
    assert waiting["claimed_until"] is None and waiting["claim_id"] is None
    assert waiting["secrets_sealed"] == sealed
    assert waiting["attempts"] == 1 and "ENCRYPTION_KEYS" in waiting["last_error"]
    assert failures == ["undecryptable"]
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert str(mail_id) in message and "ENCRYPTION_KEYS" in message
    assert "deploy the new key list to every process" in message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert code not in logged and sealed not in logged and new not in logged
    assert old not in logged and "given up after" not in logged

    holder = make_sender(await open_statements(), transport, box=SecretBox([new, old]))
    assert await holder.run_once() == 0  # not before the backoff has passed
    clock.advance(seconds=2)
    assert await holder.run_once() == 1
    assert message_ids(smtp) == [f"<{mail_id}@strawgate>"]
    assert smtp.mails(to)[0].code() == code
    sent = await row(statements, mail_id)
    assert sent["sent_at"] == clock.now() and sent["attempts"] == 2
    assert sent["secrets_sealed"] is None and sent["last_error"] is None


async def test_an_undecryptable_mail_is_given_up_after_mail_give_up_hours(
    statements: Statements,
    make_sender: MakeSender,
    make_settings: Callable[..., Settings],
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    from cryptography.fernet import Fernet

    lost_key = Outbox(box=SecretBox([Fernet.generate_key().decode()]), clock=clock, postgres=True)
    # A link valid longer than the mail is kept: MAIL_GIVE_UP_HOURS decides, not the expiry.
    mail_id = await enqueue(
        statements, lost_key, code=new_code(), clock=clock, expire_in=timedelta(hours=48)
    )
    give_up = timedelta(hours=make_settings().mail_give_up_hours)
    sender = make_sender(statements, transport, give_up_after=give_up)
    failures: list[str] = []
    sender.on_failure = failures.append

    assert await sender.run_once() == 1
    clock.advance(seconds=give_up.total_seconds() - 60)
    assert await sender.run_once() == 1
    retried = await row(statements, mail_id)
    assert retried["failed_at"] is None and retried["next_attempt_at"] > clock.now()
    assert retried["secrets_sealed"] is not None

    clock.advance(minutes=2)
    assert await sender.run_once() == 1
    dropped = await row(statements, mail_id)
    assert dropped["failed_at"] == clock.now() and dropped["next_attempt_at"] is None
    assert dropped["attempts"] == 3 and "decrypted" in dropped["last_error"]
    assert dropped["secrets_sealed"] is None
    assert failures == ["undecryptable"] * 3
    assert await sender.run_once() == 0
    assert smtp.mails() == []


async def test_an_undecryptable_code_is_given_up_when_it_expires(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    clock: MutableClock,
) -> None:
    from cryptography.fernet import Fernet

    lost_key = Outbox(box=SecretBox([Fernet.generate_key().decode()]), clock=clock, postgres=True)
    mail_id = await enqueue(statements, lost_key, code=new_code(), clock=clock)
    sender = make_sender(statements, transport)
    assert await sender.run_once() == 1
    assert (await row(statements, mail_id))["failed_at"] is None
    clock.advance(seconds=CODE_TTL.total_seconds())
    assert await sender.run_once() == 1
    dropped = await row(statements, mail_id)
    assert dropped["failed_at"] == clock.now() and "expired" in dropped["last_error"]
    assert dropped["secrets_sealed"] is None


async def test_erase_expired_secrets_and_prune(
    statements: Statements,
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, transport)
    await enqueue(statements, outbox, code=new_code(), clock=clock)
    await enqueue(statements, outbox, template="notice")
    assert await sender.run_once() == 2  # both sent
    held = await enqueue(statements, outbox, code=new_code(), clock=clock)  # expires at +10 min
    later = await enqueue(statements, outbox, code=new_code(), clock=clock, expire_in=CODE_TTL * 6)
    clock.advance(minutes=9, seconds=30)
    holder = make_sender(await open_statements(), transport, batch_size=1)
    (claimed,) = await holder.claim()  # the oldest: `held`, leased until +10.5 min
    assert claimed.id == held
    waiting = await enqueue(
        statements, outbox, code=new_code(), clock=clock, expire_in=timedelta(seconds=30)
    )

    assert await erase_expired_secrets(statements, clock.now()) == 0
    clock.advance(seconds=30)  # +10 min: `held` and `waiting` expire
    assert await erase_expired_secrets(statements, clock.now()) == 2
    dropped = await row(statements, waiting)
    assert dropped["secrets_sealed"] is None and dropped["failed_at"] == clock.now()
    assert dropped["next_attempt_at"] is None
    # Under a live lease: erased, and left to its sender, which gives it up.
    leased = await row(statements, held)
    assert leased["secrets_sealed"] is None and leased["failed_at"] is None
    await holder.deliver([claimed])
    assert (await row(statements, held))["failed_at"] == clock.now()
    kept = await row(statements, later)
    assert kept["secrets_sealed"] is not None and kept["next_attempt_at"] is not None
    assert len(smtp.mails()) == 2

    retention = timedelta(days=7)
    assert await prune_outbox(statements, clock.now(), retention) == 0
    clock.advance(days=7, minutes=-9)
    # The two sent ones are older than the retention; the given-up ones, 10 minutes
    # younger, not yet.
    assert await prune_outbox(statements, clock.now(), retention) == 2
    assert await prune_outbox(statements, clock.now(), retention) == 0
    clock.advance(minutes=11)
    assert await prune_outbox(statements, clock.now(), retention) == 2
    assert await count_rows(statements) == 1  # the pending one stays, however old
    assert (await row(statements, later))["next_attempt_at"] is not None


async def test_reseal_outbox_reencrypts_under_the_first_key(
    statements: Statements, clock: MutableClock
) -> None:
    from cryptography.fernet import Fernet

    old, new, lost = (Fernet.generate_key().decode() for _ in range(3))
    readable = await enqueue(
        statements,
        Outbox(box=SecretBox([old]), clock=clock, postgres=True),
        code="123456",
        clock=clock,
    )
    unreadable = await enqueue(
        statements,
        Outbox(box=SecretBox([lost]), clock=clock, postgres=True),
        code="654321",
        clock=clock,
    )
    before = (await row(statements, unreadable))["secrets_sealed"]

    assert await reseal_outbox(statements, SecretBox([new, old])) == (1, 1)
    resealed = (await row(statements, readable))["secrets_sealed"]
    assert SecretBox([new]).open(resealed) == '{"code":"123456"}'
    assert (await row(statements, unreadable))["secrets_sealed"] == before


def test_addresses_are_masked_in_logs() -> None:
    assert mask_address("alice@example.com") == "a***@example.com"
    assert mask_address("nobody") == "***"


async def test_the_sender_works_on_sqlite(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    transport: SmtpTransport,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    """The embedded default: the same statements through SQLAlchemy, no LISTEN."""
    url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
    await asyncio.to_thread(upgrade_head, url)
    statements = Statements(create_engine(make_settings(database_url=url)))
    await statements.start()
    outbox = Outbox(box=BOX, clock=clock, postgres=False)
    sender = MailSender(
        statements=statements,
        outbox=outbox,
        renderer=StubRenderer(),
        transport=transport,
        clock=clock,
        box=BOX,
        poll_seconds=5.0,
        batch_size=2,
        lease=LEASE,
        retry_max=timedelta(seconds=300),
        give_up_after=timedelta(hours=24),
    )
    try:
        # Three mails, batches of two: the first round goes on after a full batch (the
        # next poll is 5 s away).
        queued = [await enqueue(statements, outbox, code=new_code(), clock=clock) for _ in range(3)]
        await sender.start()

        async def all_sent() -> bool:
            return all([(await row(statements, mail_id))["sent_at"] for mail_id in queued])

        await wait_until(all_sent)
    finally:
        await sender.stop()
        await statements.close()
        await statements.engine.dispose()
    assert sorted(message_ids(smtp)) == sorted(f"<{mail_id}@strawgate>" for mail_id in queued)


class SlowSmtp:
    """A mail server that answers every command correctly, each after `delay` seconds:
    slow enough that a whole send takes several times one step's delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.delivered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(line: str) -> None:
            await asyncio.sleep(self.delay)
            writer.write((line + "\r\n").encode())
            await writer.drain()

        await say("220 slow ESMTP")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    self.delivered += 1
                    await say("250 queued")
                continue
            command = line.decode().strip().upper()
            if command.startswith("DATA"):
                in_data = True
                await say("354 go ahead")
            elif command.startswith("QUIT"):
                await say("221 bye")
                break
            else:
                await say("250 ok")
        writer.close()


async def test_the_timeout_bounds_a_whole_send(
    make_settings: Callable[..., Settings],
    statements: Statements,
    make_sender: MakeSender,
    outbox: Outbox,
) -> None:
    """Each step answered within the per-step timeout, the whole exchange much slower:
    the send is cut at MAIL_TIMEOUT and retried later, so it cannot outlast its lease
    (and be sent again by whoever takes the lease over)."""
    slow = SlowSmtp(delay=0.3)
    server = await asyncio.start_server(slow.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sender = make_sender(statements, smtp_transport(make_settings, port), send_timeout=1.0)
        mail_id = await enqueue(statements, outbox, code=new_code())
        started = time.monotonic()
        assert await sender.run_once() == 1
        assert time.monotonic() - started < 1.8
    finally:
        server.close()
    failed = await row(statements, mail_id)
    assert failed["sent_at"] is None and failed["next_attempt_at"] is not None
    assert "longer than 1 s" in failed["last_error"]
    assert failed["claimed_until"] is None


async def test_a_send_starts_only_with_time_left_on_the_lease(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    sender = make_sender(statements, transport, send_timeout=15.0)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)
    (held,) = await sender.claim()
    clock.advance(seconds=LEASE.total_seconds() - 10)  # 10 s left: less than one send
    await sender.deliver([held])
    assert smtp.mails() == []
    released = await row(statements, mail_id)
    assert released["claimed_until"] is None and released["sent_at"] is None
    assert await sender.run_once() == 1  # taken again, with a fresh lease, and sent
    assert message_ids(smtp) == [f"<{mail_id}@strawgate>"]


async def test_a_delivered_mail_is_recorded_even_after_its_lease_ran_out(
    open_statements: OpenStatements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    """A's send succeeded but its lease ran out meanwhile and B took the row over: the row
    is still recorded as sent (a mail out is out), and B's claim can no longer change it."""
    statements = await open_statements()
    a = make_sender(statements, transport)
    b = make_sender(await open_statements(), transport)
    mail_id = await enqueue(statements, outbox, code=new_code(), clock=clock)
    (held_by_a,) = await a.claim()
    clock.advance(seconds=LEASE.total_seconds())
    (held_by_b,) = await b.claim()
    assert await a.mark_sent(held_by_a) is True
    sent = await row(statements, mail_id)
    assert sent["sent_at"] is not None and sent["next_attempt_at"] is None
    assert await b.mark_failed(held_by_b, "too late") is False
    assert await row(statements, mail_id) == sent


async def test_one_recipients_mails_arrive_in_the_order_they_were_queued(
    statements: Statements,
    make_sender: MakeSender,
    transport: SmtpTransport,
    smtp: SmtpSink,
    outbox: Outbox,
    clock: MutableClock,
) -> None:
    """Codes asked for in a row arrive in that order, even when they go out in one round
    and the clock read the same for all of them; other recipients' mails go alongside."""
    email = unique_email()
    codes = [new_code() for _ in range(10)]
    for code in codes:
        await enqueue(statements, outbox, to=email, code=code, clock=clock)
        await enqueue(statements, outbox, code=new_code(), clock=clock)  # someone else
    sender = make_sender(statements, Jittery(transport), concurrency=4)
    assert await sender.run_once() == 20
    assert [mail.code() for mail in smtp.mails(email)] == codes


class Jittery:
    """The real transport behind a network whose latency varies (0 to 60 ms a send)."""

    def __init__(self, transport: SmtpTransport) -> None:
        self.transport = transport

    async def send(self, *, recipient: str, mail: RenderedMail, message_id: str) -> None:
        await asyncio.sleep(secrets.randbelow(60) / 1000)
        await self.transport.send(recipient=recipient, mail=mail, message_id=message_id)

    async def close(self) -> None:
        await self.transport.close()
