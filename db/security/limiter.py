"""Rate limits with the `limits` library: per client address, per account, per challenge.

Counters live in Redis when REDIS_URL is set (redis-py's asyncio client, through
`implementation="redispy"`: no second Redis client library), so every server process
behind a load balancer counts against the same budget; otherwise in this process's memory.

Strategy: the moving window. Each allowed hit keeps its timestamp (at most `amount` of
them per key, trimmed), so the window is exact: no double burst at a window's edge as
with a fixed window, and a refused client is told exactly when its oldest hit leaves the
window (`retry_after`). On Redis a hit is one Lua script (check, push, trim, expire), so
concurrent processes cannot overshoot. The sliding window counter is cheaper (two
integers per key) but approximates the count, and its reset time is an estimate; our
budgets are small (tens to hundreds a window), so the exact one costs little.

Keys never reach the store as given: each is stored as a SHA-256 digest (emails, session
ids and challenge digests are not left readable in Redis), under `<namespace>:<limit name>/`.

Degrading, not failing: when Redis errs or times out (short socket timeouts, and a bound
on each operation), the limiter logs at ERROR once per outage and counts in this
process's memory instead. Those counters start empty and serve one process only, so the
budget is per process until Redis answers again; a background probe tries Redis every
few seconds, and once it answers the limiter logs it and counts there again (the
outage's in-memory counts are dropped). `status` and `degraded` say which store counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, TypeVar, cast
from urllib.parse import urlsplit

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from db.errors import AuthFailure, ErrorCode

if TYPE_CHECKING:
    from redis.asyncio import Redis as RedisClient

    from db.settings import RateLimits, Settings

log = logging.getLogger("strawgate.limits")

UNKNOWN = "unknown"
REDIS_TIMEOUT = 0.5  # seconds, for connecting to Redis and for each reply
RETRY_SECONDS = 5.0  # between probes of an unreachable Redis
DIGEST_CHARS = 32  # 128 bits of SHA-256: keys stay short and never collide in practice

Status = Literal["redis", "memory", "memory (redis unreachable)", "off"]

# How often the in-memory counters drop their expired hits (see SweptMemoryStorage).
MEMORY_SWEEP_SECONDS = 1.0


class SweptMemoryStorage(MemoryStorage):
    """limits' in-memory storage, its sweep of expired hits at most once a second.

    limits (5.8) starts a sweep after every hit whose previous sweep has ended, and a sweep
    walks every key with a thread hop each: under steady load the sweeps run back to back
    and take a sizeable share of the event loop's core (refresh ran 15% faster without
    them). The sweep only frees memory: a moving window counts only the hits inside it
    whether or not the older ones were swept, so sweeping once a second changes no answer.
    """

    _sweep_due = 0.0

    async def _sweep_now_and_then(self) -> None:
        now = time.monotonic()
        if now < self._sweep_due:
            return
        self._sweep_due = now + MEMORY_SWEEP_SECONDS
        await _SCHEDULE_SWEEP(self)

    # What MemoryStorage's own methods call (`self.__schedule_expiry()`, name-mangled).
    _MemoryStorage__schedule_expiry = _sweep_now_and_then


_SCHEDULE_SWEEP = MemoryStorage._MemoryStorage__schedule_expiry  # type: ignore[attr-defined]
T = TypeVar("T")

# REDIS_URL in redis-py's notation, to the `limits` library's async storage schemes.
_SCHEMES = {
    "redis://": "async+redis://",
    "rediss://": "async+rediss://",
    "unix://": "async+redis+unix://",
}


def client_key(ip: str | None) -> str:
    """The subject of per-client limits: an IPv4 address whole, an IPv6 address by its /64
    (one subscriber usually holds a whole /64), an IPv4-mapped IPv6 address as its IPv4;
    "unknown" when there is no parseable address."""
    if not ip:
        return UNKNOWN
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        # Built from the integer: a scope id ("fe80::1%eth0") does not split a network.
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def network_key(ip: str | None) -> str:
    """The requesting network: an IPv4 address by its /24, an IPv6 address by its /64 (an
    IPv4-mapped one as IPv4); "unknown" without a parseable address. For budgets a
    stranger must not be able to spend from one network for everyone (code mails)."""
    key = client_key(ip)
    if key == UNKNOWN or "/" in key:
        return key
    return str(ipaddress.IPv4Network((key, 24), strict=False))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def _async_redis_uri(url: str) -> str:
    if url.startswith("async+"):
        return url
    for scheme, async_scheme in _SCHEMES.items():
        if url.startswith(scheme):
            return async_scheme + url.removeprefix(scheme)
    raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")


def redis_url_problem(url: str) -> str | None:
    """What keeps `url` from being a REDIS_URL, or None; never quotes it (it may hold a secret)."""
    scheme, found, _rest = url.partition("://")
    scheme = scheme.lower()
    if not found or (f"{scheme}://" not in _SCHEMES and not scheme.startswith("async+")):
        return "must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "does not parse (e.g. redis://127.0.0.1:6379/0)"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if scheme.endswith("unix"):
        return None if parts.path else "names no socket (e.g. unix:///run/redis/redis.sock)"
    if not parts.hostname:
        return "names no host (e.g. redis://127.0.0.1:6379/0)"
    if port == 0:
        return "does not parse: its port must be a number from 1 to 65535"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return "does not parse: its database (the path, e.g. /0) must be a number"
    try:
        parse_url(url.removeprefix("async+"))
    except ValueError:
        return "does not parse: an option's value is not one redis-py takes (see its from_url)"
    return None


def _refusal(retry_after: int) -> AuthFailure:
    unit = "second" if retry_after == 1 else "seconds"
    return AuthFailure(
        ErrorCode.RATE_LIMITED,
        f"Too many attempts. Try again in {retry_after} {unit}.",
        retry_after=retry_after,
    )


class RateLimiter:
    """Named budgets (the fields of `RateLimits`) counted per key, in Redis or in memory."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        """As the servers count: in REDIS_URL's Redis (under REDIS_KEY_PREFIX), else in
        this process's memory."""
        return cls(
            limits=settings.rate_limits,
            redis_url=settings.redis_url.get_secret_value() if settings.redis_url else None,
            namespace=settings.redis_key_prefix,
            enabled=settings.rate_limiting,
        )

    def __init__(
        self,
        *,
        limits: RateLimits,
        redis_url: str | None,
        namespace: str = "strawgate",
        redis_timeout: float = REDIS_TIMEOUT,
        retry_seconds: float = RETRY_SECONDS,
        enabled: bool = True,
    ) -> None:
        # Off (RATE_LIMITING=false): nothing is counted or refused; for deployments whose
        # gateway limits, and to measure what the limits cost.
        self.enabled = enabled
        # Told the limit's name at every refusal (metrics count them).
        self.on_refusal: Callable[[str], None] | None = None
        self._items: dict[str, RateLimitItem] = {}
        for name, text in limits.model_dump().items():
            parsed = parse(text)
            # The limit's name is the item's namespace: keys read "<name>/<digest>/...".
            self._items[name] = type(parsed)(parsed.amount, parsed.multiples, namespace=name)
        self._retry_seconds = retry_seconds
        # A Redis operation is a script or two, each a round trip: bound the whole of it.
        self._op_timeout = 4 * redis_timeout
        self._memory = SweptMemoryStorage()
        self._memory_limiter = MovingWindowRateLimiter(self._memory)
        self._redis: RedisStorage | None = None
        self._redis_limiter: MovingWindowRateLimiter | None = None
        if redis_url:
            self._redis = RedisStorage(
                _async_redis_uri(redis_url),
                implementation="redispy",
                key_prefix=namespace,
                # Passed on to redis-py's from_url: a dead Redis must not stall a login.
                socket_connect_timeout=redis_timeout,
                socket_timeout=redis_timeout,
            )
            self._redis_limiter = MovingWindowRateLimiter(self._redis)
        self._on_redis = self._redis is not None
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def status(self) -> Status:
        """Which store counts: "redis", "memory" (no REDIS_URL), or
        "memory (redis unreachable)" (degraded: per-process counters)."""
        if not self.enabled:
            return "off"
        if self._redis is None:
            return "memory"
        return "redis" if self._on_redis else "memory (redis unreachable)"

    @property
    def degraded(self) -> bool:
        """Redis is configured but unreachable: limits hold per process only."""
        return self._redis is not None and not self._on_redis

    async def start(self) -> None:
        """Check the configured Redis; if it does not answer, start on memory (logged)."""
        self._closed = False
        if self._redis is None:
            log.info("Rate limits count in this process's memory (no REDIS_URL)")
            return
        error = await self._probe()
        if error is None:
            self._on_redis = True
            log.info("Rate limits count in Redis")
        else:
            self._degrade(error)

    async def close(self) -> None:
        """Stop probing Redis and close its connections and the memory store's timer."""
        self._closed = True
        tasks = [self._recovery, self._memory.timer]
        self._recovery = None
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._redis is not None:
            await self._client().aclose()

    async def hit(self, name: str, key: str, *, cost: int = 1) -> None:
        """Count a hit of `cost` against limit `name` for `key`; over the limit, raise
        AuthFailure(RATE_LIMITED) with `retry_after` (the refused hit is not counted)."""
        if not self.enabled:
            return
        item, ident = self._item(name), _digest(key)
        if not await self._run(lambda limiter: limiter.hit(item, ident, cost=cost)):
            if self.on_refusal is not None:
                self.on_refusal(name)
            raise _refusal(await self._retry_after(item, ident))

    async def test(self, name: str, key: str) -> int | None:
        """None if a hit would be allowed now; else the seconds until one would be
        (nothing is counted)."""
        if not self.enabled:
            return None
        item, ident = self._item(name), _digest(key)
        if await self._run(lambda limiter: limiter.test(item, ident)):
            return None
        return await self._retry_after(item, ident)

    async def hit_quietly(self, name: str, key: str) -> bool:
        """Count a hit if the limit allows it (True); over the limit, False and no error.
        For budgets whose refusal must not show in the answer (mails sent)."""
        try:
            await self.hit(name, key)
        except AuthFailure:
            return False
        return True

    async def clear(self, name: str, key: str) -> None:
        """Forget `key`'s hits against limit `name` (e.g. after a success)."""
        item, ident = self._item(name), _digest(key)
        await self._run(lambda limiter: limiter.clear(item, ident))

    def _item(self, name: str) -> RateLimitItem:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no rate limit named {name!r}") from None

    async def _retry_after(self, item: RateLimitItem, ident: str) -> int:
        stats = await self._run(lambda limiter: limiter.get_window_stats(item, ident))
        # The moving window's reset is its oldest hit's time plus the window: exact.
        seconds = math.ceil(stats.reset_time - time.time())
        return min(max(1, seconds), item.get_expiry())

    async def _run(self, operation: Callable[[MovingWindowRateLimiter], Awaitable[T]]) -> T:
        if self._redis_limiter is not None and self._on_redis:
            try:
                async with asyncio.timeout(self._op_timeout):
                    return await operation(self._redis_limiter)
            except Exception as exc:
                # Any failure of the shared store degrades to memory: a rate limit must
                # never turn every login into an error.
                self._degrade(exc)
        return await operation(self._memory_limiter)

    def _degrade(self, error: Exception) -> None:
        if self._on_redis:  # once per outage
            self._on_redis = False
            self._log_outage(error)
        if self._recovery is None and not self._closed:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _log_outage(self, error: Exception) -> None:
        expected = isinstance(error, RedisError | OSError | TimeoutError)
        log.error(
            "Redis for rate limits is unreachable (%s: %s); counting in this process's"
            " memory until it answers again (those counters start empty and hold per"
            " process only)",
            type(error).__name__,
            error,
            exc_info=None if expected else error,
        )

    async def _recover(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._retry_seconds)
                if await self._probe() is None:
                    break
            # The outage's counts were per process; Redis holds the shared ones.
            await self._memory.reset()
            self._on_redis = True
            log.warning("Redis for rate limits answers again: counting there again")
        finally:
            self._recovery = None

    async def _probe(self) -> Exception | None:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client().ping()
        except Exception as exc:
            return exc
        return None

    def _client(self) -> RedisClient:
        assert self._redis is not None  # noqa: S101 - only called with Redis configured
        return cast("RedisClient", cast(RedispyBridge, self._redis.bridge).storage)
