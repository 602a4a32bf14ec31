"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives, and helpers to
read a delivered mail the way a person does."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

# A code as the mails show it: six digits on a line of their own.
CODE_LINE = re.compile(r"^(\d{6})$", re.MULTILINE)
SIX_DIGITS = re.compile(r"(?<!\d)\d{6}(?!\d)")


@dataclass
class Delivered:
    envelope_to: list[str]
    message: EmailMessage
    received_at: float  # time.monotonic()

    @property
    def to(self) -> str:
        return str(self.message["To"])

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None, "the mail has no plain-text part"
        return str(part.get_content())

    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        assert part is not None, "the mail has no HTML part"
        return str(part.get_content())

    def code(self) -> str:
        """The code, read out of the plain-text part: the one line of six digits."""
        found = CODE_LINE.findall(self.text())
        assert len(found) == 1, f"expected one code line, found {found!r}"
        return str(found[0])


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.refuse:
            return "451 4.3.0 try again later"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.sink.lock:
            self.sink.received.append(Delivered(list(envelope.rcpt_tos), message, time.monotonic()))
        return "250 OK"


@dataclass
class SmtpSink:
    """aiosmtpd on 127.0.0.1 in a thread of its own; `received` holds every mail."""

    port: int = 0
    received: list[Delivered] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refuse: bool = False  # answer DATA with a temporary failure
    _controller: Controller | None = None

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def mails(self, to: str | None = None) -> list[Delivered]:
        with self.lock:
            return [m for m in self.received if to is None or to in m.envelope_to]

    async def wait_for(
        self,
        to: str,
        *,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for polling a thread's list
        where: Callable[[Delivered], bool] | None = None,
    ) -> Delivered:
        """The `count`-th mail to `to` (matching `where`), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.mails(to) if where is None or where(m)]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                subjects = [m.subject for m in self.mails(to)]
                raise AssertionError(f"no mail #{count} to {to} within {timeout}s: {subjects}")
            await asyncio.sleep(0.02)

    def settings(self) -> dict[str, Any]:
        """MAIL_* settings that point fastapi-mail at this server."""
        return {
            "mail_server": "127.0.0.1",
            "mail_port": self.port,
            "mail_from": "strawgate@example.com",
            "mail_from_name": "Strawgate",
            "mail_starttls": False,
            "mail_ssl_tls": False,
            "use_credentials": False,
            "validate_certs": False,
            "mail_timeout": 5.0,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
