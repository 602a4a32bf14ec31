"""The outbox: a mail is a row written in the transaction that causes it, and a sender
delivers it later. The sender leases the rows it takes (claimed_until, claim_id) instead
of holding a transaction open across the SMTP exchange, so several processes share one
outbox and a sender that dies only delays its mails until the lease runs out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import orjson
from sqlalchemy import (
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)

from db.background import KeptListen, finish_or_cancel
from db.clock import Clock
from db.mail.languages import MAIL_LANGUAGES, mail_language
from db.mail.message import (
    DeliveryFailure,
    MailDeliveryError,
    MailTransport,
    RenderedMail,
)
from db.mail.message import mask_address as mask_address
from db.models import OutboxMail, User
from db.security.box import SecretBox, UndecryptableSecret
from db.services.batches import AnyOf, Batching, chosen, until_done, walk
from db.session import Runner, Statements
from db.settings import Settings

log = logging.getLogger("strawgate.mail")

CHANNEL = "strawgate_outbox"  # NOTIFY'd by every enqueue on PostgreSQL
FIRST_RETRY = timedelta(seconds=1)
# How long a woken sender waits before its round (see MailSender._run).
WAKE_DELAY = 0.05
ERROR_MAX = 255  # outbox.last_error
DEGRADED_AFTER = 3

# Why an attempt failed, as MailSender.on_failure reports it (a metric's label).
MailFailure = Literal["undecryptable", "unrenderable", DeliveryFailure]


class Renderer(Protocol):
    def render(
        self,
        template: str,
        context: Mapping[str, Any],
        secrets: Mapping[str, str] | None,
        language: str | None = None,
    ) -> RenderedMail: ...


def _mail_language(tag: Any) -> Any:
    """The mail language of a stored locale ("de-AT" is "de"), NULL for none: in SQL, so
    that the choice is made in the INSERT that queues the mail."""
    return case(
        *(
            (or_(tag == language, tag.like(f"{language}-%")), language)
            for language in MAIL_LANGUAGES
        ),
        else_=null(),
    )


# The language of a user's mails: the locale they chose (updateProfile), else the one
# their signup asked for (Accept-Language); NULL (DEFAULT_LOCALE) for neither.
_USER_LANGUAGE = select(
    func.coalesce(_mail_language(User.locale), _mail_language(User.signup_locale)).label("language")
).where(User.id == bindparam("owner_id"))

_ENQUEUE = insert(OutboxMail).values(
    id=bindparam("mail_id"),
    user_id=bindparam("owner_id"),
    # The caller's, where it names one (a mail to an account that is gone); else the
    # owner's as the row stands in this transaction.
    language=func.coalesce(bindparam("language", type_=String), _USER_LANGUAGE.scalar_subquery()),
    recipient=bindparam("recipient"),
    template=bindparam("template"),
    context=bindparam("context"),
    secrets_sealed=bindparam("sealed"),
    secrets_expire_at=bindparam("expire_at"),
    created_at=bindparam("stamp"),
    next_attempt_at=bindparam("now"),
    attempts=literal(0),
    claimed_until=null(),
    claim_id=null(),
    sent_at=null(),
    failed_at=null(),
    last_error=null(),
)
# Delivered at commit, to every process listening (this one included); not at all when
# the transaction rolls back, like the row itself.
_NOTIFY = select(func.pg_notify(literal(CHANNEL), literal("")))
# What enqueue costs the database, without writing anything: see Outbox.decoy.
_DECOY = select(OutboxMail.id).where(OutboxMail.id == bindparam("mail_id"))

# Due and not leased by anyone. SKIP LOCKED: concurrent claimers on PostgreSQL take
# different rows instead of queueing behind each other (SQLite ignores FOR UPDATE; its
# BEGIN IMMEDIATE serialises the claimers instead).
_DUE = (
    select(OutboxMail.id)
    .where(
        OutboxMail.next_attempt_at <= bindparam("now"),
        or_(OutboxMail.claimed_until.is_(None), OutboxMail.claimed_until <= bindparam("now")),
    )
    .order_by(OutboxMail.next_attempt_at, OutboxMail.created_at)
    .limit(bindparam("n"))
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    update(OutboxMail)
    .where(OutboxMail.id.in_(_DUE.scalar_subquery()))
    .values(
        claimed_until=bindparam("until"),
        claim_id=bindparam("mine"),
        attempts=OutboxMail.attempts + 1,
    )
    .returning(
        OutboxMail.id,
        OutboxMail.recipient,
        OutboxMail.template,
        OutboxMail.context,
        OutboxMail.secrets_sealed,
        OutboxMail.secrets_expire_at,
        OutboxMail.created_at,
        OutboxMail.attempts,
        OutboxMail.language,
    )
)

# Every result is recorded only while the claim is still ours: a sender whose lease ran
# out never overwrites what the sender that took the row over recorded.
# Recorded whoever holds the row now: a mail that was delivered must not go out again,
# even if its lease ran out during the send and another sender took it over.
_MARK_SENT = (
    update(OutboxMail)
    .where(OutboxMail.id == bindparam("mail_id"), OutboxMail.sent_at.is_(None))
    .values(
        sent_at=bindparam("now"),
        next_attempt_at=null(),
        claimed_until=null(),
        claim_id=null(),
        secrets_sealed=null(),
        last_error=null(),
    )
)
_MARK_RETRY = (
    update(OutboxMail)
    .where(OutboxMail.id == bindparam("mail_id"), OutboxMail.claim_id == bindparam("mine"))
    .values(
        next_attempt_at=bindparam("retry_at"),
        claimed_until=null(),
        claim_id=null(),
        last_error=bindparam("error"),
    )
)
_MARK_GIVEN_UP = (
    update(OutboxMail)
    .where(OutboxMail.id == bindparam("mail_id"), OutboxMail.claim_id == bindparam("mine"))
    .values(
        failed_at=bindparam("now"),
        next_attempt_at=null(),
        claimed_until=null(),
        claim_id=null(),
        secrets_sealed=null(),
        last_error=bindparam("error"),
    )
)
_RELEASE_ONE = (
    update(OutboxMail)
    .where(OutboxMail.id == bindparam("mail_id"), OutboxMail.claim_id == bindparam("mine"))
    .values(claimed_until=null(), claim_id=null())
)
_RELEASE_CLAIM = (
    update(OutboxMail)
    .where(OutboxMail.claim_id == bindparam("mine"), OutboxMail.next_attempt_at.is_not(None))
    .values(claimed_until=null(), claim_id=null())
)


# Housekeeping, in batches (db/services/batches.py): each statement writes at most :batch
# rows, which it picks (and locks, skipping rows a sender holds) itself.
def _dead_code_waiting(mail: Any) -> Any:
    return and_(
        mail.next_attempt_at.is_not(None),
        mail.secrets_expire_at <= bindparam("now"),
        # A row under a live lease is its sender's to settle (it checks the expiry too).
        or_(mail.claimed_until.is_(None), mail.claimed_until <= bindparam("now")),
    )


_GIVE_UP_EXPIRED = (
    update(OutboxMail)
    .where(
        AnyOf(
            OutboxMail.id,
            chosen(OutboxMail, _dead_code_waiting, order_by=lambda mail: mail.next_attempt_at),
        )
    )
    .values(
        failed_at=bindparam("now"),
        next_attempt_at=null(),
        claimed_until=null(),
        claim_id=null(),
        secrets_sealed=null(),
        last_error=literal("the code expired before the mail could be sent"),
    )
)


def _expired_secrets(mail: Any) -> Any:
    return and_(mail.secrets_sealed.is_not(None), mail.secrets_expire_at <= bindparam("now"))


# No index serves this one: PostgreSQL walks the table's pages (in_pages).
_ERASE_EXPIRED = (
    update(OutboxMail)
    .where(AnyOf(OutboxMail.id, chosen(OutboxMail, _expired_secrets, in_pages=True)))
    .values(secrets_sealed=null())
)
_ERASE_EXPIRED_ANYWHERE = (
    update(OutboxMail)
    .where(AnyOf(OutboxMail.id, chosen(OutboxMail, _expired_secrets)))
    .values(secrets_sealed=null())
)


# Sent or given up before the cutoff; such a mail was also written before it, which is
# what the index (ix_outbox_created_at) finds them by.
def _done_before(mail: Any) -> Any:
    return and_(
        mail.created_at < bindparam("cutoff"),
        mail.next_attempt_at.is_(None),
        or_(mail.sent_at < bindparam("cutoff"), mail.failed_at < bindparam("cutoff")),
    )


_PRUNE = delete(OutboxMail).where(
    AnyOf(OutboxMail.id, chosen(OutboxMail, _done_before, order_by=lambda mail: mail.created_at))
)

_SEALED_IDS = (
    select(OutboxMail.id).where(OutboxMail.secrets_sealed.is_not(None)).order_by(OutboxMail.id)
)
_SEALED_FOR_UPDATE = (
    select(OutboxMail.secrets_sealed).where(OutboxMail.id == bindparam("mail_id")).with_for_update()
)
_RESEAL = (
    update(OutboxMail)
    .where(OutboxMail.id == bindparam("mail_id"))
    .values(secrets_sealed=bindparam("sealed"))
)


class Outbox:
    """The writing side: services queue mails in their own transactions."""

    def __init__(self, *, box: SecretBox, clock: Clock, postgres: bool) -> None:
        self.box = box
        self._clock = clock
        self._postgres = postgres
        self._wakers: set[Callable[[], None]] = set()
        self._last_stamp: datetime | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock) -> Outbox:
        return cls(
            box=SecretBox(settings.fernet_keys()), clock=clock, postgres=not settings.is_sqlite
        )

    async def enqueue(
        self,
        tx: Runner,
        *,
        user_id: uuid.UUID | None,
        recipient: str,
        template: str,
        context: Mapping[str, Any],
        secrets: Mapping[str, str] | None = None,
        secrets_expire_at: datetime | None = None,
        language: str | None = None,
    ) -> uuid.UUID:
        """Queues a mail in `tx`: it goes out only if the transaction commits. It belongs
        to `user_id`, the account that caused it (an export lists it, a deletion takes
        it), whoever holds its address later. `secrets` (codes, links) are stored
        encrypted and erased once sent or expired. It is written in `language` where
        given (a mail language or a locale of one), else in the user's (see
        language_of), else in DEFAULT_LOCALE."""
        now = self._clock.now()
        # created_at orders one recipient's mails (see MailSender.deliver): strictly
        # increasing within this process, even when the clock reads the same twice.
        stamp = now
        if self._last_stamp is not None and stamp <= self._last_stamp:
            stamp = self._last_stamp + timedelta(microseconds=1)
        self._last_stamp = stamp
        mail_id = uuid.uuid4()
        sealed = self.box.seal(orjson.dumps(dict(secrets)).decode("utf-8")) if secrets else None
        await tx.execute(
            _ENQUEUE,
            {
                "mail_id": mail_id,
                "owner_id": user_id,
                "recipient": recipient,
                "template": template,
                "context": orjson.dumps(dict(context)).decode("utf-8"),
                "sealed": sealed,
                "expire_at": secrets_expire_at if sealed is not None else None,
                "now": now,
                "stamp": stamp,
                "language": mail_language(language),
            },
        )
        if self._postgres:
            await tx.execute(_NOTIFY, {})
        return mail_id

    async def language_of(self, tx: Runner, user_id: uuid.UUID) -> str | None:
        """The language of the user's mails (their locale, else their signup's), None for
        DEFAULT_LOCALE: what a mail queued after the user's row is gone is given."""
        row = await tx.first(_USER_LANGUAGE, {"owner_id": user_id})
        return row["language"] if row is not None else None

    async def decoy(self, tx: Runner, *, secrets: Mapping[str, str]) -> None:
        """The work of an enqueue (encrypting the secrets, a round trip, the NOTIFY)
        without a mail: for answers that must not reveal, by their timing, whether a mail
        was queued (a code asked for an unregistered address)."""
        self.box.seal(orjson.dumps(dict(secrets)).decode("utf-8"))
        await tx.first(_DECOY, {"mail_id": uuid.uuid4()})
        if self._postgres:
            await tx.execute(_NOTIFY, {})

    def wake(self) -> None:
        """Tells this process's senders to look now; call it after the commit."""
        for wake in list(self._wakers):
            wake()

    def add_waker(self, wake: Callable[[], None]) -> None:
        self._wakers.add(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        self._wakers.discard(wake)


@dataclass(frozen=True, slots=True)
class ClaimedMail:
    """An outbox row this sender holds a lease on."""

    id: uuid.UUID
    claim_id: uuid.UUID
    claimed_until: datetime
    recipient: str
    template: str
    context: str
    secrets_sealed: str | None
    secrets_expire_at: datetime | None
    created_at: datetime
    attempts: int
    language: str | None = None  # None: DEFAULT_LOCALE


class MailSender:
    """The delivery loop: woken in-process after a commit, across processes by
    LISTEN/NOTIFY (PostgreSQL), and polling every `poll_seconds` regardless."""

    def __init__(
        self,
        *,
        statements: Statements,
        outbox: Outbox,
        renderer: Renderer,
        transport: MailTransport,
        clock: Clock,
        box: SecretBox,
        poll_seconds: float,
        batch_size: int,
        lease: timedelta,
        retry_max: timedelta,
        give_up_after: timedelta,
        send_timeout: float = 15.0,
        concurrency: int = 4,
    ) -> None:
        self._statements = statements
        self._outbox = outbox
        self._renderer = renderer
        self._transport = transport
        self._clock = clock
        self._box = box
        self._poll_seconds = poll_seconds
        self._batch_size = batch_size
        self._lease = lease
        self._retry_max = retry_max
        self._give_up_after = give_up_after
        # The whole of one send (connect, greeting, every command, QUIT), not each step.
        self._send_timeout = send_timeout
        self._concurrency = concurrency
        self._postgres = statements.engine.dialect.name == "postgresql"
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Claims whose rows may still be ours, with their lease's end: stop() releases them.
        self._claims: dict[uuid.UUID, datetime] = {}
        self._listen = KeptListen(
            statements,
            CHANNEL,
            self.wake,
            log=log,
            who="mail sender",
            what="new mails",
            poll_seconds=self._poll_seconds,
        )
        self._round_failed = False
        self.on_failure: Callable[[MailFailure], None] | None = None
        self._failed_in_a_row = 0
        self._last_failure: DeliveryFailure | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        statements: Statements,
        outbox: Outbox,
        renderer: Renderer,
        transport: MailTransport,
        clock: Clock,
    ) -> MailSender:
        return cls(
            statements=statements,
            outbox=outbox,
            renderer=renderer,
            transport=transport,
            clock=clock,
            box=outbox.box,
            poll_seconds=settings.mail_poll_seconds,
            batch_size=settings.mail_batch_size,
            lease=timedelta(seconds=settings.mail_lease_seconds),
            retry_max=timedelta(seconds=settings.mail_retry_max_seconds),
            give_up_after=timedelta(hours=settings.mail_give_up_hours),
            send_timeout=settings.mail_timeout,
        )

    @property
    def listening(self) -> bool:
        """Whether NOTIFY from other processes reaches this sender right now."""
        return self._listen.alive

    @property
    def degraded(self) -> DeliveryFailure | None:
        """The latest send's failure once DEGRADED_AFTER sends failed in a row, else None."""
        return self._last_failure if self._failed_in_a_row >= DEGRADED_AFTER else None

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        """Starts the loop (and, on PostgreSQL, its LISTEN) in a task of its own."""
        if self._task is not None:
            return
        self._stopping = False
        self._outbox.add_waker(self.wake)
        self._task = asyncio.create_task(self._run(), name="strawgate-mail-sender")

    async def stop(self, grace: float = 5.0) -> None:
        """Stops claiming; sends in flight get `grace` seconds, then are cancelled; every
        claim still held is released so another sender (or the next start) takes it."""
        self._stopping = True
        self._outbox.remove_waker(self.wake)
        task, self._task = self._task, None
        if task is not None:
            self._wakeup.set()
            await finish_or_cancel(
                task,
                grace=grace,
                log=log,
                overdue="mail sender: sends still running after %ss were cancelled; their"
                " mails stay queued",
                failed="mail sender: the loop failed",
            )
        await self._listen.stop()
        await self._release_all()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()  # a wake-up from here on means another round
                if self._postgres:
                    await self._listen.keep()
                try:
                    # A full batch suggests more are due; a short one took all there were.
                    while not self._stopping and await self.run_once() >= self._batch_size:
                        pass
                except Exception as exc:  # the database is down, say: the next round retries
                    if not self._round_failed:
                        log.warning(
                            "mail sender: cannot read the outbox (%s); retrying every %ss",
                            type(exc).__name__,
                            self._poll_seconds,
                        )
                    self._round_failed = True
                else:
                    if self._round_failed:
                        log.info("mail sender: the outbox can be read again")
                    self._round_failed = False
                if self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._poll_seconds)
                    # Woken by a commit: let the request that caused the mail finish its
                    # answer before the round (claim, rendering, SMTP) competes with it
                    # for this process. Its timing then says nothing about whether it
                    # queued a mail; the mails of a burst also share one round.
                    await asyncio.sleep(WAKE_DELAY)
        finally:
            await self._listen.stop()

    async def run_once(self) -> int:
        """Claims the due mails (up to a batch) and delivers them; how many it claimed."""
        mails = await self.claim()
        if mails:
            await self.deliver(mails)
        return len(mails)

    async def claim(self) -> list[ClaimedMail]:
        """One short transaction leases up to a batch of due mails to this sender (none
        once it is stopping)."""
        if self._stopping:
            return []
        now = self._clock.now()
        for old, until in list(self._claims.items()):
            if until <= now:
                del self._claims[old]  # the lease ran out: nothing left to release
        claim_id = uuid.uuid4()
        until = now + self._lease
        # Noted before the claim commits: a cancellation right after it still releases.
        self._claims[claim_id] = until
        params = {"now": now, "n": self._batch_size, "until": until, "mine": claim_id}
        # On failure the claim id stays noted: a commit that went through unseen (a
        # cancellation during it) is released by stop() all the same.
        async with self._statements.transaction() as tx:
            rows = await tx.all(_CLAIM, params)
        if not rows:
            self._claims.pop(claim_id, None)
        return [
            ClaimedMail(
                id=row["id"],
                claim_id=claim_id,
                claimed_until=until,
                recipient=row["recipient"],
                template=row["template"],
                context=row["context"],
                secrets_sealed=row["secrets_sealed"],
                secrets_expire_at=row["secrets_expire_at"],
                created_at=row["created_at"],
                attempts=row["attempts"],
                language=row["language"],
            )
            for row in rows
        ]

    async def deliver(self, mails: Sequence[ClaimedMail]) -> None:
        """Sends claimed mails, `concurrency` at a time, with no transaction open, and
        records each result."""
        slots = asyncio.Semaphore(self._concurrency)
        settled: list[bool] = []
        # One recipient's mails go out one after another, oldest first (two codes asked
        # for in a row arrive in that order); different recipients' side by side.
        by_recipient: dict[str, list[ClaimedMail]] = {}
        for mail in sorted(mails, key=lambda mail: (mail.created_at, mail.id)):
            by_recipient.setdefault(mail.recipient, []).append(mail)

        async def in_turn(queue: list[ClaimedMail]) -> None:
            async with slots:
                for mail in queue:
                    if self._stopping:
                        settled.append(False)  # not started: stop() releases it
                        continue
                    settled.append(await self._deliver_one(mail))

        async with asyncio.TaskGroup() as group:
            for queue in by_recipient.values():
                group.create_task(in_turn(queue))
        if all(settled):
            for claim_id in {mail.claim_id for mail in mails}:
                self._claims.pop(claim_id, None)

    async def _deliver_one(self, mail: ClaimedMail) -> bool:
        """Sends one mail and records the result; False when the result could not be
        recorded (the row stays claimed until stop() or the lease's end)."""
        try:
            return await self._send_and_record(mail)
        except Exception as exc:  # recording failed (the database is down, say)
            log.warning(
                "mail %s: the result could not be recorded (%s)", mail.id, type(exc).__name__
            )
            return False

    async def _send_and_record(self, mail: ClaimedMail) -> bool:
        now = self._clock.now()
        if (mail.claimed_until - now).total_seconds() < self._send_timeout:
            # Too little of the lease is left to finish a send (it ran out while the mail
            # waited its turn): another sender could take it over mid-send and send it
            # again. Released for the next round.
            await self._record(_RELEASE_ONE, mail, {})
            return True
        if mail.secrets_expire_at is not None and mail.secrets_expire_at <= now:
            # A code nobody can use any more: sending it would only confuse.
            await self.mark_given_up(mail, "the code expired before the mail could be sent")
            return True
        try:
            secrets = self._open(mail.secrets_sealed)
        except UndecryptableSecret:
            # Sealed under a key this process lacks (a rolling key rotation): another
            # process may hold it, so the mail is retried, not given up.
            log.error(
                "mail %s: its secrets cannot be decrypted with ENCRYPTION_KEYS: deploy the new"
                " key list to every process. The mail is left for a process that holds the"
                " key (given up once MAIL_GIVE_UP_HOURS old, or when its code expires)",
                mail.id,
            )
            self._count("undecryptable")
            await self.mark_failed(mail, "secrets cannot be decrypted with ENCRYPTION_KEYS")
            return True
        except ValueError as exc:
            log.error("mail %s: its secrets are malformed (%s)", mail.id, type(exc).__name__)
            self._count("unrenderable")
            await self.mark_given_up(mail, f"malformed secrets: {type(exc).__name__}")
            return True
        try:
            rendered = self._renderer.render(
                mail.template, orjson.loads(mail.context), secrets, language=mail.language
            )
        except Exception as exc:
            log.error(
                "mail %s: template %r cannot be rendered (%s)",
                mail.id,
                mail.template,
                type(exc).__name__,
            )
            self._count("unrenderable")
            await self.mark_given_up(mail, f"cannot be rendered: {type(exc).__name__}")
            return True
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._transport.send(
                    recipient=mail.recipient, mail=rendered, message_id=f"<{mail.id}@strawgate>"
                )
        except MailDeliveryError as exc:
            await self._undelivered(mail, exc.reason, str(exc) or type(exc).__name__)
            return True
        except TimeoutError:
            server = getattr(self._transport, "server", "the mail server")
            await self._undelivered(
                mail,
                "timeout",
                f"SMTP timeout ({server}): the send took longer than {self._send_timeout:g} s"
                " (MAIL_TIMEOUT)",
            )
            return True
        except Exception as exc:  # a transport that broke its contract: retry all the same
            log.error(
                "mail %s: the transport failed unexpectedly (%s)", mail.id, type(exc).__name__
            )
            await self._undelivered(mail, "other", f"unexpected {type(exc).__name__}", logged=True)
            return True
        self._failed_in_a_row = 0
        if await self.mark_sent(mail):
            log.info("mail %s (%s) sent", mail.id, mail.template)
        return True

    async def _undelivered(
        self, mail: ClaimedMail, reason: DeliveryFailure, error: str, *, logged: bool = False
    ) -> None:
        if not logged:
            log.warning("mail %s not delivered (attempt %d): %s", mail.id, mail.attempts, error)
        self._failed_in_a_row += 1
        self._last_failure = reason
        self._count(reason)
        await self.mark_failed(mail, error)

    def _count(self, reason: MailFailure) -> None:
        if self.on_failure is not None:
            self.on_failure(reason)

    def _open(self, sealed: str | None) -> dict[str, str] | None:
        if sealed is None:
            return None
        opened = orjson.loads(self._box.open(sealed))
        if not isinstance(opened, dict):
            raise ValueError("secrets are not a mapping")
        return {str(key): str(value) for key, value in opened.items()}

    async def mark_sent(self, mail: ClaimedMail) -> bool:
        """Records a delivery (and erases the secrets); False if the claim was lost."""
        return await self._record(_MARK_SENT, mail, {"now": self._clock.now()})

    async def mark_failed(self, mail: ClaimedMail, error: str) -> bool:
        """Records a failed delivery: retried after a backoff, or given up when the mail
        is too old or its code has expired. False if the claim was lost."""
        now = self._clock.now()
        expired = mail.secrets_expire_at is not None and mail.secrets_expire_at <= now
        if expired or now - mail.created_at >= self._give_up_after:
            return await self.mark_given_up(mail, error)
        delay = backoff(mail.attempts, self._retry_max)
        held = await self._record(
            _MARK_RETRY, mail, {"retry_at": now + delay, "error": _short(error)}
        )
        if held:
            log.info(
                "mail %s: attempt %d failed; next try in %.0fs",
                mail.id,
                mail.attempts,
                delay.total_seconds(),
            )
        return held

    async def mark_given_up(self, mail: ClaimedMail, error: str) -> bool:
        """Drops the mail (and its secrets) for good; False if the claim was lost."""
        held = await self._record(
            _MARK_GIVEN_UP, mail, {"now": self._clock.now(), "error": _short(error)}
        )
        if held:
            log.warning(
                "mail %s (%s) to %s given up after %d attempt(s): %s",
                mail.id,
                mail.template,
                mask_address(mail.recipient),
                mail.attempts,
                _short(error),
            )
        return held

    async def _record(self, statement: Any, mail: ClaimedMail, params: Mapping[str, Any]) -> bool:
        async with self._statements.transaction() as tx:
            held = await tx.execute(
                statement, {**params, "mail_id": mail.id, "mine": mail.claim_id}
            )
        if not held:
            log.info("mail %s: the lease ran out and another sender took it over", mail.id)
        return held > 0

    async def _release_all(self) -> None:
        claims, self._claims = self._claims, {}
        for claim_id in claims:
            try:
                async with self._statements.transaction() as tx:
                    await tx.execute(_RELEASE_CLAIM, {"mine": claim_id})
            except Exception as exc:  # their leases run out by themselves
                log.warning("mail sender: a claim could not be released (%s)", type(exc).__name__)


def backoff(attempts: int, cap: timedelta) -> timedelta:
    """The wait after the `attempts`-th failure: 1 s doubling, capped, less a little
    jitter so that mails failed together do not retry together."""
    base = FIRST_RETRY * (1 << min(max(attempts - 1, 0), 40))
    jitter = random.uniform(0.8, 1.0)  # noqa: S311 - spreading retries, not a secret
    return min(base, cap) * jitter


def _short(error: str) -> str:
    return " ".join(error.split())[:ERROR_MAX]


async def erase_expired_secrets(
    statements: Statements, now: datetime, batching: Batching | None = None
) -> int:
    """Erases secrets past their expiry, sent or not (a mail still waiting with a dead
    code is given up), in batches; how many rows lost their secrets."""
    batching = batching or Batching()
    given_up = await until_done(
        statements, "mail_secrets", _GIVE_UP_EXPIRED, {"now": now}, batching
    )
    erased = await walk(
        statements,
        "mail_secrets",
        "outbox",
        _ERASE_EXPIRED,
        _ERASE_EXPIRED_ANYWHERE,
        {"now": now},
        batching,
    )
    if given_up.rows:
        log.warning(
            "gave up %d mail(s) whose codes expired before they could be sent", given_up.rows
        )
    return given_up.rows + erased.rows


async def prune_outbox(
    statements: Statements, now: datetime, retention: timedelta, batching: Batching | None = None
) -> int:
    """Deletes sent and given-up mails older than `retention`, in batches; how many."""
    done = await until_done(
        statements, "outbox_rows", _PRUNE, {"cutoff": now - retention}, batching or Batching()
    )
    return done.rows


async def reseal_outbox(statements: Statements, box: SecretBox) -> tuple[int, int]:
    """Re-encrypts every outbox row's secrets under the first of ENCRYPTION_KEYS (key
    rotation): (re-encrypted, not decryptable with any configured key). One short
    transaction per row, so the sender is not held up behind a long rotation."""
    async with statements.connection() as conn:
        mail_ids = await conn.scalars(_SEALED_IDS, {})
    done = failed = 0
    for mail_id in mail_ids:
        async with statements.transaction() as tx:
            sealed = await tx.first(_SEALED_FOR_UPDATE, {"mail_id": mail_id})
            if sealed is None or sealed["secrets_sealed"] is None:
                continue  # sent, expired or pruned meanwhile
            try:
                resealed = box.reseal(sealed["secrets_sealed"])
            except ValueError:
                failed += 1
                continue
            await tx.execute(_RESEAL, {"mail_id": mail_id, "sealed": resealed})
            done += 1
    return done, failed
