"""Rate limits on both stores (memory, and the shared Redis at 127.0.0.1:6379 when one
answers), and the fall back to memory while a Redis is away."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from db.errors import AuthFailure, ErrorCode
from db.security.limiter import RateLimiter, client_key
from db.settings import RateLimits

SHARED_REDIS = "redis://127.0.0.1:6379/0"

MakeLimiter = Callable[..., Awaitable[RateLimiter]]


async def redis_answers(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def keys_in(url: str, namespace: str) -> list[str]:
    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return [key.decode() async for key in client.scan_iter(match=f"{namespace}:*")]
    finally:
        await client.aclose()


async def shared_redis() -> str:
    if not await redis_answers(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379")
    return SHARED_REDIS


@pytest.fixture
def namespace() -> str:
    return f"strawgate-test-{secrets.token_hex(6)}"


@pytest.fixture(params=["memory", "redis"])
async def redis_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "memory" else await shared_redis()


@pytest.fixture
async def make_limiter(redis_url: str | None, namespace: str) -> AsyncIterator[MakeLimiter]:
    """Started limiters on the test's store, all in the test's namespace (so two of them
    on Redis share counters); closed, and their Redis keys deleted, at teardown."""
    made: list[RateLimiter] = []

    async def make(**limits: str) -> RateLimiter:
        limiter = RateLimiter(
            limits=RateLimits.model_validate(limits), redis_url=redis_url, namespace=namespace
        )
        await limiter.start()
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()
    if redis_url is not None:
        client = Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def refused(limiter: RateLimiter, name: str, key: str) -> int:
    with pytest.raises(AuthFailure) as caught:
        await limiter.hit(name, key)
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after is not None
    return caught.value.retry_after


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.8", "203.0.113.8"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not-an-address", "unknown"),
        ("203.0.113.7:443", "unknown"),
    ],
)
def test_client_key(ip: str | None, key: str) -> None:
    assert client_key(ip) == key


async def test_hits_pass_under_the_limit_and_are_refused_over_it(
    make_limiter: MakeLimiter,
) -> None:
    limiter = await make_limiter(login_account="3/minute")
    for _ in range(3):
        await limiter.hit("login_account", "alice@example.com")
    retry_after = await refused(limiter, "login_account", "alice@example.com")
    assert 58 <= retry_after <= 60  # the oldest hit leaves the minute's window then


async def test_a_refused_hit_is_not_counted(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(login_ip="2/second")
    await limiter.hit("login_ip", "198.51.100.1")
    await limiter.hit("login_ip", "198.51.100.1")
    await asyncio.sleep(0.5)
    # Were these counted, they would still fill the window once the first two left it.
    for _ in range(3):
        assert await refused(limiter, "login_ip", "198.51.100.1") == 1
    await asyncio.sleep(0.6)
    await limiter.hit("login_ip", "198.51.100.1")
    await limiter.hit("login_ip", "198.51.100.1")
    await refused(limiter, "login_ip", "198.51.100.1")


async def test_keys_are_counted_apart(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(login_ip="1/minute", login_account="1/minute")
    await limiter.hit("login_account", "alice@example.com")
    await limiter.hit("login_account", "bob@example.com")
    await refused(limiter, "login_account", "alice@example.com")
    # The same key under another limit is another counter.
    await limiter.hit("login_ip", "alice@example.com")

    await limiter.hit("login_ip", client_key("192.0.2.1"))
    await limiter.hit("login_ip", client_key("192.0.2.2"))  # IPv4: the whole address
    await refused(limiter, "login_ip", client_key("::ffff:192.0.2.1"))  # IPv4-mapped

    await limiter.hit("login_ip", client_key("2001:db8:a:b::1"))
    await refused(limiter, "login_ip", client_key("2001:db8:a:b:1234::99"))  # same /64
    await limiter.hit("login_ip", client_key("2001:db8:a:c::1"))  # another /64


async def test_processes_share_counters_on_redis_only(
    make_limiter: MakeLimiter, redis_url: str | None
) -> None:
    first = await make_limiter(login_account="3/minute")
    second = await make_limiter(login_account="3/minute")
    await first.hit("login_account", "carol@example.com")
    await second.hit("login_account", "carol@example.com")
    await first.hit("login_account", "carol@example.com")
    if redis_url is not None:
        assert first.status == second.status == "redis"
        await refused(second, "login_account", "carol@example.com")
        await refused(first, "login_account", "carol@example.com")
    else:
        assert first.status == second.status == "memory"
        await second.hit("login_account", "carol@example.com")
        await second.hit("login_account", "carol@example.com")
        await refused(second, "login_account", "carol@example.com")
    assert not first.degraded


async def test_test_hit_quietly_and_clear(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(code_mail_account="2/minute")
    for _ in range(5):  # testing counts nothing
        assert await limiter.test("code_mail_account", "dave@example.com") is None
    assert await limiter.hit_quietly("code_mail_account", "dave@example.com")
    assert await limiter.hit_quietly("code_mail_account", "dave@example.com")
    assert not await limiter.hit_quietly("code_mail_account", "dave@example.com")
    retry_after = await limiter.test("code_mail_account", "dave@example.com")
    assert retry_after is not None
    assert 58 <= retry_after <= 60
    assert await limiter.hit_quietly("code_mail_account", "erin@example.com")

    await limiter.clear("code_mail_account", "dave@example.com")
    assert await limiter.test("code_mail_account", "dave@example.com") is None
    await limiter.hit("code_mail_account", "dave@example.com")
    await limiter.hit("code_mail_account", "dave@example.com")
    await refused(limiter, "code_mail_account", "dave@example.com")
    # Clearing one key leaves the others.
    assert await limiter.hit_quietly("code_mail_account", "erin@example.com")
    assert not await limiter.hit_quietly("code_mail_account", "erin@example.com")


async def test_an_unknown_limit_is_a_programming_error(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    with pytest.raises(KeyError, match="no_such_limit"):
        await limiter.hit("no_such_limit", "x")


async def test_redis_holds_no_raw_key(namespace: str) -> None:
    url = await shared_redis()
    email = "frank.secret-name@example.com"
    challenge = secrets.token_urlsafe(32)
    limiter = RateLimiter(limits=RateLimits(), redis_url=url, namespace=namespace)
    await limiter.start()
    client = Redis.from_url(url)
    try:
        await limiter.hit("login_account", email)
        await limiter.hit("verify_otp_challenge", f"{challenge}:{client_key('192.0.2.9')}")
        keys = await keys_in(url, namespace)
        assert len(keys) == 2
        for key in keys:
            assert email not in key
            assert "frank" not in key
            assert challenge not in key
            assert "192.0.2.9" not in key
            values = str(await client.lrange(key, 0, -1))  # the hits' timestamps
            assert challenge not in values
            assert "frank" not in values
    finally:
        await limiter.close()
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_redis_server(port: int) -> asyncio.subprocess.Process:
    server = await asyncio.create_subprocess_exec(
        "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not await redis_answers(f"redis://127.0.0.1:{port}/0"):
        if server.returncode is not None or time.monotonic() > deadline:
            await stop(server)
            raise RuntimeError(f"redis-server did not start on port {port}")
        await asyncio.sleep(0.02)
    return server


async def stop(server: asyncio.subprocess.Process | None) -> None:
    if server is not None and server.returncode is None:
        server.kill()
        await server.wait()


async def wait_for_status(limiter: RateLimiter, status: str) -> None:
    deadline = time.monotonic() + 5
    while limiter.status != status:
        assert time.monotonic() < deadline, f"still {limiter.status!r}, not {status!r}"
        await asyncio.sleep(0.02)


async def timed_hit(limiter: RateLimiter, name: str, key: str) -> None:
    """A hit that answers within a second, whatever the state of Redis."""
    started = time.perf_counter()
    try:
        await limiter.hit(name, key)
    finally:
        assert time.perf_counter() - started < 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
async def test_an_unreachable_redis_degrades_to_memory_and_comes_back(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="strawgate.limits")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    limiter = RateLimiter(
        limits=RateLimits(login_account="3/minute"),
        redis_url=url,
        namespace=namespace,
        retry_seconds=0.1,
    )

    def errors() -> int:
        return sum(
            1
            for record in caplog.records
            if record.name == "strawgate.limits" and record.levelno == logging.ERROR
        )

    server = None
    try:
        # Redis down at start: the limiter starts on memory and says so.
        await limiter.start()
        assert limiter.status == "memory (redis unreachable)"
        assert limiter.degraded
        assert errors() == 1
        await timed_hit(limiter, "login_account", "grace@example.com")

        server = await start_redis_server(port)
        await wait_for_status(limiter, "redis")
        assert not limiter.degraded
        await timed_hit(limiter, "login_account", "grace@example.com")
        assert len(await keys_in(url, namespace)) == 1  # counted in Redis

        await stop(server)
        # Every hit still answers, promptly, on per-process counters that start empty.
        for _ in range(3):
            await timed_hit(limiter, "login_account", "heidi@example.com")
        assert limiter.status == "memory (redis unreachable)"
        assert limiter.degraded
        with pytest.raises(AuthFailure) as caught:
            await timed_hit(limiter, "login_account", "heidi@example.com")
        assert caught.value.code is ErrorCode.RATE_LIMITED
        assert await limiter.test("login_account", "heidi@example.com") is not None
        await limiter.clear("login_account", "heidi@example.com")
        assert errors() == 2  # once per outage, not once per hit

        server = await start_redis_server(port)
        await wait_for_status(limiter, "redis")
        assert any(
            record.name == "strawgate.limits" and record.levelno == logging.WARNING
            for record in caplog.records
        )
        # A fresh server (nothing persisted): the counting happens there again.
        await timed_hit(limiter, "login_account", "heidi@example.com")
        assert len(await keys_in(url, namespace)) == 1
        assert errors() == 2
    finally:
        await limiter.close()
        await stop(server)


@pytest.mark.parametrize("redis_url", ["memory"], indirect=True)
async def test_memory_counters_sweep_at_most_once_a_second(
    make_limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """limits' own memory storage starts a sweep of every key (a thread hop each) after
    nearly every hit; ours sweeps at most once a second, and still counts right."""
    from limits.aio.storage import MemoryStorage

    # The hooks limits calls: an upgrade that renames them must fail here.
    assert callable(getattr(MemoryStorage, "_MemoryStorage__schedule_expiry", None))
    real = MemoryStorage._MemoryStorage__expire_events  # type: ignore[attr-defined]
    sweeps: list[float] = []

    async def counted(storage: MemoryStorage) -> None:
        sweeps.append(time.monotonic())
        await real(storage)

    monkeypatch.setattr(MemoryStorage, "_MemoryStorage__expire_events", counted)
    limiter = await make_limiter(login_ip="1000/minute")
    for n in range(300):
        await limiter.hit("login_ip", f"198.51.100.{n % 50}")
        await asyncio.sleep(0)  # a sweep, once started, gets to run between hits
    assert len(sweeps) == 1
    # The window still counts every hit: 6 per key so far, 994 more fit, not 995.
    for _ in range(994):
        await limiter.hit("login_ip", "198.51.100.0")
    await refused(limiter, "login_ip", "198.51.100.0")
