"""What the background workers of a server process (the mail sender, the webhook
dispatcher) share: a LISTEN kept in place, and a stop that waits, then cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from db.session import Listening, Statements


class KeptListen:
    """A background worker's LISTEN on `channel` (see Statements.listen), kept in place:
    `keep()` (re-)establishes it where it is not, `stop()` ends it. A failure is logged
    once, as `who`, until it works again; the worker polls every `poll_seconds` meanwhile
    (and always, for what a dropped notification missed)."""

    def __init__(
        self,
        statements: Statements,
        channel: str,
        callback: Callable[[], None],
        *,
        log: logging.Logger,
        who: str,
        what: str,
        poll_seconds: float,
    ) -> None:
        self._statements = statements
        self._channel = channel
        self._callback = callback
        self._log = log
        self._who = who
        self._what = what  # "new mails": "listening for new mails again"
        self._poll_seconds = poll_seconds
        self._stack: contextlib.AsyncExitStack | None = None
        self._listening: Listening | None = None
        self._failed = False

    @property
    def alive(self) -> bool:
        """Whether NOTIFY from other processes reaches the worker right now."""
        return self._listening is not None and self._listening.alive

    async def keep(self) -> None:
        """(Re-)establishes the LISTEN when it is not in place; polling covers the gaps."""
        if self.alive:
            return
        await self.stop()
        stack = contextlib.AsyncExitStack()
        try:
            self._listening = await stack.enter_async_context(
                self._statements.listen(self._channel, self._callback)
            )
        except Exception as exc:
            await stack.aclose()
            if not self._failed:
                self._log.warning(
                    "%s: cannot LISTEN (%s); polling every %ss until it can",
                    self._who,
                    type(exc).__name__,
                    self._poll_seconds,
                )
            self._failed = True
            return
        if self._failed:
            self._log.info("%s: listening for %s again", self._who, self._what)
        self._failed = False
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack, self._listening = self._stack, None, None
        if stack is not None:
            try:
                await stack.aclose()
            except Exception as exc:
                self._log.debug("%s: closing the LISTEN failed (%s)", self._who, type(exc).__name__)


async def finish_or_cancel(
    task: asyncio.Task[None], *, grace: float, log: logging.Logger, overdue: str, failed: str
) -> None:
    """Waits up to `grace` seconds for a worker's task to end, then cancels it, logging
    `overdue` (with the grace in seconds); an exception it ended with is logged as
    `failed`."""
    await asyncio.wait({task}, timeout=grace)
    if not task.done():
        log.warning(overdue, grace)
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # pragma: no cover - the workers' loops catch what a round raises
        log.exception(failed)
