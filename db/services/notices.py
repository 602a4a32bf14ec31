"""Security notices: mails that tell the owner something happened to their account."""

from __future__ import annotations

import uuid
from typing import Any

from db.clock import Clock
from db.devices import UNKNOWN, device_family
from db.mail.outbox import Outbox
from db.services.types import ClientInfo
from db.session import Runner


class Notices:
    def __init__(self, *, outbox: Outbox, clock: Clock) -> None:
        self.outbox = outbox
        self.clock = clock

    async def send(
        self,
        tx: Runner,
        *,
        user_id: uuid.UUID | None,
        email: str,
        template: str,
        client: ClientInfo,
        language: str | None = None,
        **extra: Any,
    ) -> None:
        """Queues the notice in `tx`: it goes out only if the change it reports commits.
        `user_id`: the account it is about (None once the account is gone: then
        `language`, read before, is the language of its mails)."""
        device = device_family(client.user_agent)
        await self.outbox.enqueue(
            tx,
            user_id=user_id,
            recipient=email,
            template=template,
            # `at` as ISO 8601: the renderer shows it in the mail's language.
            context={
                "at": self.clock.now().isoformat(timespec="seconds"),
                "ip": client.ip,
                "device": None if device == UNKNOWN else device,
                **extra,
            },
            language=language,
        )
