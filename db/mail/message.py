"""What the mail pieces hand each other: a rendered mail, and a transport that sends one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RenderedMail:
    subject: str
    text: str  # the plain-text part
    html: str  # the HTML part


class MailDeliveryError(Exception):
    """A send failed (server down, refused, timed out); the outbox retries it later. The
    message says what happened, without the mail's content."""


class MailTransport(Protocol):
    async def send(self, *, recipient: str, mail: RenderedMail, message_id: str) -> None:
        """Delivers one mail, or raises MailDeliveryError. `message_id` is the Message-ID
        header (stable per outbox row, so a receiver can tell a repeat)."""
        ...

    async def close(self) -> None: ...
