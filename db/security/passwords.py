"""Password hashing: argon2id through libpass, off the event loop, with bounded parallelism."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from passlib.context import CryptContext

from db.errors import AuthFailure, ErrorCode

T = TypeVar("T")

BCRYPT_MAX_BYTES = 72
# How many callers may wait for a hashing thread, per thread, before new ones are refused.
QUEUE_FACTOR = 4


class PasswordHasher:
    """Hashes and verifies passwords in worker threads.

    Every argon2 hash holds its memory cost (19 MiB by default) while it runs, so the
    number of hashes in flight is capped by a limiter sized to the CPU count; when more
    than QUEUE_FACTOR times that many are already waiting, the caller is refused with
    RATE_LIMITED rather than queued (a queue without bound is a memory and latency DoS).
    """

    def __init__(
        self,
        *,
        memory_cost: int = 19 * 1024,
        time_cost: int = 2,
        parallelism: int = 1,
        workers: int = 1,
    ) -> None:
        self.context = CryptContext(
            schemes=["argon2", "bcrypt"],
            deprecated=["bcrypt"],
            argon2__type="ID",
            argon2__memory_cost=memory_cost,
            argon2__time_cost=time_cost,
            argon2__parallelism=parallelism,
        )
        self.workers = workers
        self._limiter = anyio.CapacityLimiter(workers)
        self._max_in_flight = workers * (1 + QUEUE_FACTOR)
        self._in_flight = 0
        # Verified against when the email is unknown, so that a miss costs what a hit costs.
        self._dummy_hash: str = self.context.hash(secrets.token_urlsafe(24))

    async def hash(self, password: str) -> str:
        return await self._run(self.context.hash, password)

    async def verify(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        """(matches, replacement hash or None). A replacement is given when the stored
        hash is a legacy scheme (bcrypt) or has weaker parameters than configured."""
        return await self._run(self._verify_sync, password, stored_hash)

    async def verify_dummy(self, password: str) -> None:
        await self._run(self.context.verify, password, self._dummy_hash)

    def _verify_sync(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        if self.context.identify(stored_hash) == "bcrypt":
            # bcrypt < 5 silently used the first 72 bytes; bcrypt 5 raises on longer
            # input. Verify what the legacy hash was made from, then store an argon2id
            # hash of the whole password.
            legacy_secret = password.encode("utf-8")[:BCRYPT_MAX_BYTES]
            if not self.context.verify(legacy_secret, stored_hash):
                return False, None
            return True, self.context.hash(password)
        ok, new_hash = self.context.verify_and_update(password, stored_hash)
        return bool(ok), new_hash

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        if self._in_flight >= self._max_in_flight:
            raise AuthFailure(
                ErrorCode.RATE_LIMITED, "The server is busy; try again shortly.", retry_after=1
            )
        self._in_flight += 1
        try:
            return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)
        finally:
            self._in_flight -= 1
