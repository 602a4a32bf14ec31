"""The outbound HTTP of identity providers (db/providers/http.py): HTTPS to public addresses
only, each connection checked where it is made; bounded in time and size; no redirects.

A raw TCP server on loopback counts the connections it gets, so a refusal is seen to
happen before any connection, and the same URL with IDENTITY_PROVIDERS_ALLOW_INSECURE is
seen to reach it. Every test's client also has a tripwire under the guard: a connection
attempt to an address outside loopback is recorded and never made, so even a broken guard
sends nothing to 10.0.0.1 or 169.254.169.254."""

from __future__ import annotations

import contextlib
import gzip
import re
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpcore
import pytest

from db.clock import SystemClock
from db.providers.http import (
    MAX_RESPONSE_BYTES,
    ProviderHttp,
    ProviderUnreachable,
    address_problem,
    check_url,
    is_public_address,
)
from db.providers.registry import IdentityProviders
from db.settings import Settings

Answer = Callable[[socket.socket, bytes, threading.Event], None]
STOP_WAIT = 5.0


def json_answer(body: bytes = b'{"ok": true}', *, headers: str = "") -> Answer:
    def answer(conn: socket.socket, request: bytes, stopping: threading.Event) -> None:
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{headers}connection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + body)

    return answer


class CountingServer:
    """A TCP server on a loopback address that counts connections, records each request's
    head, and answers with `answer` (plain HTTP/1.1, one request a connection)."""

    def __init__(self, host: str = "127.0.0.1", answer: Answer | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.answer = answer or json_answer()
        self.connections = 0
        self.requests: list[bytes] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(STOP_WAIT)
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                with self._lock:
                    self.requests.append(head)
                self.answer(conn, head, self._stopping)

    def stop(self) -> None:
        self._stopping.set()
        self._accepting.join(STOP_WAIT)
        for thread in self._threads:
            thread.join(STOP_WAIT)
        self.sock.close()


@contextlib.contextmanager
def serving(host: str = "127.0.0.1", answer: Answer | None = None) -> Iterator[CountingServer]:
    server = CountingServer(host, answer)
    try:
        yield server
    finally:
        server.stop()


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Tripwire(httpcore.AsyncNetworkBackend):
    """Under the guard, in place of the real backend: records every connection the guard
    lets through, and makes only those to loopback (nothing in a test may leave this
    machine, even where the guard is broken)."""

    def __init__(self) -> None:
        self.real = httpcore.AnyIOBackend()
        self.attempts: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.attempts.append((host, port))
        # 0.0.0.0 is this machine too, on Linux.
        if host not in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0"):  # noqa: S104
            raise httpcore.ConnectError(f"the tripwire stopped a connection to {host}")
        return await self.real.connect_tcp(host, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets here")

    async def sleep(self, seconds: float) -> None:
        await self.real.sleep(seconds)


def tripwired(http: ProviderHttp) -> Tripwire:
    """Puts a Tripwire under `http`'s address checks (which stay as they are): that of its
    connections, and that of its plain-HTTP ones where they have their own."""
    tripwire = Tripwire()
    for transport in (http.transport._inner, http.transport._plain):
        if transport is not None:
            checked = transport._pool._network_backend
            checked._inner = tripwire  # type: ignore[attr-defined]
    return tripwire


@contextlib.asynccontextmanager
async def provider_http(
    *, allow_insecure: bool, seconds: float = 2.0
) -> AsyncIterator[tuple[ProviderHttp, Tripwire]]:
    http = ProviderHttp(timeout=seconds, allow_insecure=allow_insecure)
    try:
        yield http, tripwired(http)
    finally:
        await http.aclose()


# -- addresses -------------------------------------------------------------------------------

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "127.1", "0.0.0.0", "[::ffff:127.0.0.1]"]  # noqa: S104


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
async def test_a_loopback_address_is_refused_before_any_connection(host: str) -> None:
    with serving() as server:
        async with provider_http(allow_insecure=False) as (http, tripwire):
            with pytest.raises(ProviderUnreachable, match="private, loopback or link-local"):
                await http.get_json(f"https://{host}:{server.port}/.well-known/jwks")
        assert server.connections == 0
        assert tripwire.attempts == []


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
async def test_the_same_loopback_address_is_reached_where_insecure_is_allowed(host: str) -> None:
    """The control of the test above: these URLs do reach the server."""
    with serving() as server:
        async with provider_http(allow_insecure=True) as (http, _tripwire):
            assert await http.get_json(f"http://{host}:{server.port}/x") == {"ok": True}
        assert server.connections == 1


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_the_ipv6_loopback_is_refused_and_reached_only_where_allowed() -> None:
    with serving("::1") as server:
        async with provider_http(allow_insecure=False) as (http, tripwire):
            with pytest.raises(ProviderUnreachable, match="private, loopback or link-local"):
                await http.get_json(f"https://[::1]:{server.port}/x")
        assert (server.connections, tripwire.attempts) == (0, [])
        async with provider_http(allow_insecure=True) as (http, _tripwire):
            assert await http.get_json(f"http://[::1]:{server.port}/x") == {"ok": True}
        assert server.connections == 1


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[64:ff9b:1::a9fe:a9fe]",
    ],
)
async def test_private_and_link_local_addresses_are_refused_without_a_connection(
    host: str,
) -> None:
    async with provider_http(allow_insecure=False) as (http, tripwire):
        started = time.monotonic()
        with pytest.raises(ProviderUnreachable, match="private, loopback or link-local"):
            await http.get_json(f"https://{host}/latest/meta-data/")
        assert time.monotonic() - started < 1.0  # refused, not timed out
    assert tripwire.attempts == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:{port}/x", "must use https"),
        ("http://example.com/x", "must use https"),
        ("ftp://example.com/x", "is not an absolute http(s) URL"),
        ("file:///etc/passwd", "is not an absolute http(s) URL"),
        ("https://user:pass@example.com/x", "must not hold a user name or password"),
        ("/relative", "is not an absolute http(s) URL"),
    ],
)
async def test_a_url_that_is_not_https_is_refused_before_anything(url: str, problem: str) -> None:
    with serving() as server:
        async with provider_http(allow_insecure=False) as (http, tripwire):
            with pytest.raises(ProviderUnreachable, match=re.escape(problem)):
                await http.get_json(url.format(port=server.port))
        assert (server.connections, tripwire.attempts) == (0, [])


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (
            "http://hooks.example.com/T0001/secret-path?token=secret-query",
            "http://hooks.example.com",
        ),
        ("https://user:secret-password@id.example.com:8443/x", "https://id.example.com:8443"),
        ("file:///secret/file", "the URL"),
    ],
)
async def test_a_refused_url_is_named_by_its_origin_only(url: str, named: str) -> None:
    """The refusal is logged and stored (a webhook's last error): a path, query string or
    user name may hold a secret."""
    async with provider_http(allow_insecure=False) as (http, tripwire):
        with pytest.raises(ProviderUnreachable) as refused:
            await http.get_json(url)
    assert str(refused.value).startswith(named + " ")
    assert "secret" not in str(refused.value)
    assert tripwire.attempts == []


# -- plain HTTP only to addresses that are not public (the webhooks' rule) -----------------

WEBHOOKS_SETTING = "WEBHOOK_ALLOW_PRIVATE"
PLAIN_TO_PUBLIC = (
    "resolves to a public address: plain http goes only to private, loopback or link-local"
    " addresses (WEBHOOK_ALLOW_PRIVATE); use https"
)


@pytest.mark.parametrize(
    ("addresses", "refused"),
    [
        (["127.0.0.1"], False),
        (["::1", "127.0.0.1"], False),
        (["10.0.0.7", "fd00::7"], False),
        (["8.8.8.8"], True),
        (["2001:4860:4860::8888"], True),
        (["10.0.0.7", "8.8.8.8"], True),  # every address, not just the first
        (["::ffff:8.8.8.8"], True),
    ],
)
def test_plain_http_goes_only_to_addresses_that_are_not_public(
    addresses: list[str], refused: bool
) -> None:
    problem = address_problem(
        "hooks.example.com", addresses, reach="private", setting=WEBHOOKS_SETTING
    )
    assert problem == (f"hooks.example.com {PLAIN_TO_PUBLIC}" if refused else None)
    # The other rules, for comparison: any address; public ones only.
    assert address_problem("h", addresses, reach="any", setting=WEBHOOKS_SETTING) is None
    public_only = address_problem("h", addresses, reach="public", setting=WEBHOOKS_SETTING)
    assert (public_only is None) == all(is_public_address(a) for a in addresses)


@contextlib.asynccontextmanager
async def webhooks_http() -> AsyncIterator[tuple[ProviderHttp, Tripwire]]:
    """The client as the webhooks (and the claims hook) build it with WEBHOOK_ALLOW_PRIVATE."""
    http = ProviderHttp(
        timeout=2.0, allow_insecure=True, setting=WEBHOOKS_SETTING, http_private_only=True
    )
    try:
        yield http, tripwired(http)
    finally:
        await http.aclose()


async def test_insecure_providers_get_plain_http_on_private_addresses_only(
    make_settings: Callable[..., Settings],
) -> None:
    """IDENTITY_PROVIDERS_ALLOW_INSECURE (a provider on your own network) allows private
    addresses and plain HTTP to them, never plain HTTP across the internet: ID tokens, codes
    and the client secret would travel readable."""
    settings = make_settings(
        public_url="http://127.0.0.1:8000",
        identity_providers={"corp": {"issuer": "http://10.0.0.5", "client_id": "c"}},
        identity_providers_allow_insecure=True,
    ).prepare()
    http = IdentityProviders.from_settings(settings, SystemClock()).http
    tripwire = tripwired(http)
    try:
        with pytest.raises(ProviderUnreachable) as refused:
            await http.get_json("http://8.8.8.8:9/.well-known/openid-configuration")
        assert "plain http goes only to private, loopback or link-local" in str(refused.value)
        assert "IDENTITY_PROVIDERS_ALLOW_INSECURE" in str(refused.value)
        # Over https, and over plain http to the internal network, it goes ahead (stopped
        # here by the tripwire only).
        for url in ("https://8.8.8.8:9/jwks", "http://10.0.0.5:9/jwks"):
            with pytest.raises(ProviderUnreachable, match="the tripwire stopped a connection"):
                await http.get_json(url)
    finally:
        await http.aclose()
    assert [port for _host, port in tripwire.attempts] == [9, 9]


@pytest.mark.parametrize("host", ["8.8.8.8", "[2001:4860:4860::8888]", "[::ffff:8.8.8.8]"])
async def test_plain_http_to_a_public_address_is_refused_where_it_connects(host: str) -> None:
    async with webhooks_http() as (http, tripwire):
        with pytest.raises(ProviderUnreachable, match=re.escape(PLAIN_TO_PUBLIC)):
            await http.get_json(f"http://{host}:9/hook")
        # Over https the same address is allowed (and stopped here by the tripwire only).
        with pytest.raises(ProviderUnreachable, match="the tripwire stopped a connection"):
            await http.get_json(f"https://{host}:9/hook")
    assert [port for _host, port in tripwire.attempts] == [9]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_plain_http_to_loopback_is_reached_where_private_addresses_are_allowed(
    host: str,
) -> None:
    with serving() as server:
        async with webhooks_http() as (http, tripwire):
            assert await http.get_json(f"http://{host}:{server.port}/x") == {"ok": True}
    assert server.connections == 1
    assert {address for address, _port in tripwire.attempts} <= {"127.0.0.1", "::1"}


# -- what is read ------------------------------------------------------------------------


def sized_json(size: int) -> bytes:
    """A JSON document of exactly `size` bytes."""
    return b'{"p": "' + b"x" * (size - 9) + b'"}'


def close_delimited(body: bytes) -> Answer:
    """An answer with no content-length: its end is the connection's."""

    def answer(conn: socket.socket, request: bytes, stopping: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + body)

    return answer


@pytest.mark.parametrize("framing", [json_answer, close_delimited])
async def test_an_answer_up_to_the_cap_is_read_and_one_byte_more_is_refused(
    framing: Callable[[bytes], Answer],
) -> None:
    with serving(answer=framing(sized_json(MAX_RESPONSE_BYTES))) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            assert len((await http.get_json(f"http://127.0.0.1:{server.port}/"))["p"]) > 0
    with serving(answer=framing(sized_json(MAX_RESPONSE_BYTES + 1))) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            with pytest.raises(ProviderUnreachable, match="more than"):
                await http.get_json(f"http://127.0.0.1:{server.port}/")


async def test_an_uncompressed_answer_is_asked_for_and_a_gzipped_one_still_read() -> None:
    body = gzip.compress(b'{"issuer": "https://id.example.com"}')
    with serving(answer=json_answer(body, headers="content-encoding: gzip\r\n")) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            document = await http.get_json(f"http://127.0.0.1:{server.port}/")
        assert document == {"issuer": "https://id.example.com"}
        head = server.requests[0].lower()
        assert b"\r\naccept-encoding: identity\r\n" in head


async def test_a_deflated_answer_is_read() -> None:
    body = zlib.compress(b'{"keys": []}')
    with serving(answer=json_answer(body, headers="content-encoding: deflate\r\n")) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            assert await http.get_json(f"http://127.0.0.1:{server.port}/") == {"keys": []}


async def test_a_compressed_answer_that_inflates_beyond_the_cap_is_refused() -> None:
    bomb = gzip.compress(sized_json(50 * MAX_RESPONSE_BYTES))
    assert len(bomb) < MAX_RESPONSE_BYTES
    with serving(answer=json_answer(bomb, headers="content-encoding: gzip\r\n")) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            with pytest.raises(ProviderUnreachable, match="more than"):
                await http.get_json(f"http://127.0.0.1:{server.port}/")


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("br", b"\x0b\x02\x80{}\x03"), ("gzip", b"not gzip at all")],
)
async def test_an_answer_in_an_encoding_that_cannot_be_read_is_refused(
    encoding: str, body: bytes
) -> None:
    answer = json_answer(body, headers=f"content-encoding: {encoding}\r\n")
    with serving(answer=answer) as server:
        async with provider_http(allow_insecure=True) as (http, _):
            with pytest.raises(ProviderUnreachable, match=encoding):
                await http.get_json(f"http://127.0.0.1:{server.port}/")


# -- time ----------------------------------------------------------------------------------


def slow_head(delay: float) -> Answer:
    def answer(conn: socket.socket, request: bytes, stopping: threading.Event) -> None:
        if not stopping.wait(delay):
            json_answer()(conn, request, stopping)

    return answer


def dripping(step: float, total: int) -> Answer:
    """Headers at once, then the body a byte at a time: each read well within any
    per-read timeout, the whole far beyond the request's."""

    def answer(conn: socket.socket, request: bytes, stopping: threading.Event) -> None:
        body = sized_json(total)
        conn.sendall(
            f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        )
        for byte in body:
            if stopping.wait(step):
                return
            conn.sendall(bytes([byte]))

    return answer


@pytest.mark.parametrize("answer", [slow_head(10), dripping(0.1, 100)], ids=["slow", "drip"])
async def test_a_slow_answer_is_cut_at_the_timeout(answer: Answer) -> None:
    with serving(answer=answer) as server:
        async with provider_http(allow_insecure=True, seconds=0.5) as (http, _):
            started = time.monotonic()
            with pytest.raises(ProviderUnreachable, match=r"did not answer within 0\.5 s"):
                await http.get_json(f"http://127.0.0.1:{server.port}/")
            assert time.monotonic() - started < 2.0


# -- redirects -----------------------------------------------------------------------------


async def test_a_redirect_is_not_followed() -> None:
    with serving() as target:
        location = f"http://127.0.0.1:{target.port}/elsewhere"

        def redirect(conn: socket.socket, request: bytes, stopping: threading.Event) -> None:
            conn.sendall(
                b"HTTP/1.1 302 Found\r\nlocation: "
                + location.encode()
                + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )

        with serving(answer=redirect) as server:
            async with provider_http(allow_insecure=True) as (http, _):
                response = await http.request("GET", f"http://127.0.0.1:{server.port}/")
                assert (response.status_code, response.headers["location"]) == (302, location)
                with pytest.raises(ProviderUnreachable, match="HTTP 302"):
                    await http.get_json(f"http://127.0.0.1:{server.port}/")
        assert target.connections == 0


# -- the address table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::1", True),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("0.0.0.0", False),  # noqa: S104 - an address under test
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fd00:ec2::254", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("2001:db8::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        # IPv6 addresses that carry an IPv4 one: NAT64, 6to4, IPv4-compatible.
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::1", False),
        ("2002:a00:1::", False),
        ("::7f00:1", False),
        ("::a9fe:a9fe", False),
        # NAT64's local-use prefix (RFC 8215), whatever it carries, wherever.
        ("64:ff9b:1::a9fe:a9fe", False),
        ("64:ff9b:1::808:808", False),
        ("64:ff9b:1:a9:fe:a9fe::", False),  # a /56 prefix: 169.254.169.254 around the u octet
        ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "allow_insecure", "problem"),
    [
        ("https://id.example.com", False, None),
        ("http://id.example.com", True, None),
        ("http://id.example.com", False, "must use https"),
        ("https://", False, "is not an absolute http(s) URL"),
        ("id.example.com", False, "is not an absolute http(s) URL"),
        ("https://a:b@id.example.com", True, "must not hold a user name or password"),
    ],
)
def test_check_url(url: str, allow_insecure: bool, problem: str | None) -> None:
    found = check_url(url, allow_insecure=allow_insecure)
    assert found == problem or (problem is not None and found is not None and problem in found)
