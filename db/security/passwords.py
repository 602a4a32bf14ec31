"""Password hashing: argon2id through libpass, off the event loop, with bounded parallelism."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from passlib.context import CryptContext

from db.errors import AuthFailure, ErrorCode

T = TypeVar("T")

BCRYPT_MAX_BYTES = 72
# How many callers may wait for a hashing thread, per thread, before new ones are refused.
QUEUE_FACTOR = 4


class PasswordHasher:
    """Hashes and verifies passwords in worker threads, never on the event loop.

    Every argon2 hash holds its memory cost (19 MiB by default) while it runs, so hashes
    run on a dedicated pool of `workers` threads (by default one per CPU this process may
    use); when more than QUEUE_FACTOR times that many are already waiting, the caller is
    refused with RATE_LIMITED rather than queued (a queue without bound is a memory and
    latency DoS). A pool of its own, rather than the shared thread pool, also bounds the
    memory the C allocator keeps for reuse: one hash's worth per hashing thread.
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
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash")
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
        scheme = self.context.identify(stored_hash)
        if scheme is None:
            # No password can match (unusable_password_hash): the same work, no match.
            self.context.verify(password, self._dummy_hash)
            return False, None
        if scheme == "bcrypt":
            # bcrypt < 5 silently used the first 72 bytes; bcrypt 5 raises on longer
            # input. Verify what the legacy hash was made from, then store an argon2id
            # hash of the whole password.
            legacy_secret = password.encode("utf-8")[:BCRYPT_MAX_BYTES]
            if not self.context.verify(legacy_secret, stored_hash):
                return False, None
            return True, self.context.hash(password)
        ok, new_hash = self.context.verify_and_update(password, stored_hash)
        return bool(ok), new_hash

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def check_capacity(self) -> None:
        """Refuse now, before any other work, when the hashing queue is full."""
        if self._in_flight >= self._max_in_flight:
            raise AuthFailure(
                ErrorCode.RATE_LIMITED, "The server is busy; try again shortly.", retry_after=1
            )

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        self.check_capacity()
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        finally:
            self._in_flight -= 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def unusable_password_hash() -> str:
    """A stored value no password matches (not a hash of any scheme): for an account
    whose password must not be trusted until its owner sets one."""
    return "!" + secrets.token_urlsafe(16)
