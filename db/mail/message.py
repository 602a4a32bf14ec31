"""What the mail pieces hand each other: a rendered mail, and a transport that sends one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

DeliveryFailure = Literal[
    "connection_refused", "timeout", "tls", "auth", "rejected", "unavailable", "other"
]


@dataclass(frozen=True, slots=True)
class RenderedMail:
    subject: str
    text: str  # the plain-text part
    html: str  # the HTML part


class MailDeliveryError(Exception):
    """A failed send (retried later): the cause, the server, its reply and what to fix."""

    def __init__(self, message: str, reason: DeliveryFailure = "other") -> None:
        super().__init__(message)
        self.reason: DeliveryFailure = reason


class MailTransport(Protocol):
    async def send(self, *, recipient: str, mail: RenderedMail, message_id: str) -> None:
        """Delivers one mail, or raises MailDeliveryError. `message_id` is the Message-ID
        header (stable per outbox row, so a receiver can tell a repeat)."""
        ...

    async def close(self) -> None: ...


def mask_address(address: str) -> str:
    """Enough of an address to tell mails apart in a log: a***@example.com."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if local else "***"
