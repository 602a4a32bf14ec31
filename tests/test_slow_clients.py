"""Clients that never finish their request (issue 12), on a real `strawgate serve`: a
request line or headers that stop half-way, a body that stops half-way, a connection that
sends nothing, and one that trickles a byte at a time are all closed within
HTTP_HEADER_TIMEOUT / HTTP_BODY_TIMEOUT, while /healthz keeps answering and steady
clients and keep-alive connections are served; headers past HTTP_MAX_HEADER_BYTES are
refused."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pg import free_port
from tests.servers import Server, running, strawgate_command, uvicorn_command
from tests.test_servers import production_env

pytestmark = pytest.mark.slow

TIMEOUT = 1.0  # HTTP_HEADER_TIMEOUT and HTTP_BODY_TIMEOUT of the server under test
CLOSE_BOUND = 5.0  # seconds: generous against a loaded machine, far below "never"
HALF_HEADERS = b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
HALF_BODY = (
    b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n" + b'{"query": "'
)
QUERY = b'{"query": "{ __typename }"}'


@contextlib.asynccontextmanager
async def bounded_server(tmp_path: Path, database_url: str) -> AsyncIterator[Server]:
    env = production_env(
        database_url,
        HTTP_HEADER_TIMEOUT=str(TIMEOUT),
        HTTP_BODY_TIMEOUT=str(TIMEOUT),
        LOG_FORMAT="text",
    )
    port = free_port()
    command = strawgate_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port) as srv:
        yield srv


@pytest.fixture(scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> AsyncIterator[Server]:
    """One bounded_server for the tests of this file that need nothing of their own from
    it (each closes the connections it opened): a server start saved per test."""
    folder = tmp_path_factory.mktemp("bounded")
    async with bounded_server(folder, database_url) as bounded:
        yield bounded


async def until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took;
    fails if it is still open after `limit` seconds."""
    started = time.monotonic()
    received = b""
    while True:
        left = limit - (time.monotonic() - started)
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(left, 0.0))
        except TimeoutError:
            raise AssertionError(f"still open after {limit} s; received {received!r}") from None
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length on a connection that stays open: head, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_BOUND)
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert found, head
    body = await asyncio.wait_for(reader.readexactly(int(found.group(1))), CLOSE_BOUND)
    return head, body


async def healthz_while(server: Server, done: asyncio.Event) -> list[float]:
    """GET /healthz every 0.1 s until `done`: how long each answer took (each a 200)."""
    took: list[float] = []
    async with server.client(timeout=CLOSE_BOUND) as http:
        while not done.is_set():
            started = time.monotonic()
            response = await http.get("/healthz")
            assert response.status_code == 200, response.text
            took.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return took


async def stalled(port: int, sent: bytes) -> tuple[bytes, float]:
    """A connection that sends `sent` and then nothing: what it got back, and when it was
    closed (seconds after the send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if sent:
            writer.write(sent)
            await writer.drain()
        return await until_closed(reader, CLOSE_BOUND)
    finally:
        writer.close()


async def trickling(port: int, data: bytes, every: float) -> tuple[bytes, float]:
    """A connection that sends `data` one byte every `every` seconds (never finishing
    within the timeout): it is cut at the bound however active it stays."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle() -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)

    task = asyncio.create_task(trickle())
    try:
        return await until_closed(reader, CLOSE_BOUND)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task
        writer.close()


async def test_stalled_and_trickling_connections_are_closed_while_healthz_answers(
    server: Server,
) -> None:
    done = asyncio.Event()
    health = asyncio.create_task(healthz_while(server, done))
    try:
        results = await asyncio.gather(
            *(stalled(server.port, HALF_HEADERS) for _ in range(50)),
            *(stalled(server.port, HALF_BODY) for _ in range(50)),
            *(stalled(server.port, b"") for _ in range(10)),
            *(trickling(server.port, HALF_BODY * 4, 0.1) for _ in range(10)),
        )
    finally:
        done.set()
        took = await health
    half_headers, half_body = results[:50], results[50:100]
    silent, trickled = results[100:110], results[110:]
    for received, elapsed in half_headers:
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert b"connection: close" in received.lower(), received
        assert TIMEOUT * 0.8 <= elapsed, elapsed
    for received, elapsed in half_body:
        head, _, payload = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), received
        assert b"connection: close" in head.lower(), received
        assert b"x-request-id" in head.lower(), received  # the app's answer
        assert b"errors" in payload, received
        assert TIMEOUT * 0.8 <= elapsed, elapsed
    for received, elapsed in silent:
        assert received == b"", received  # nothing was asked: closed without an answer
        assert TIMEOUT * 0.8 <= elapsed, elapsed
    for received, elapsed in trickled:
        # A byte every 0.1 s keeps the connection busy, not alive: cut at the bound.
        assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received
        assert TIMEOUT * 0.8 <= elapsed, elapsed
    assert took, "no /healthz request finished"
    assert max(took) < 2.0, took
    assert "Traceback" not in server.log(), server.log()


async def test_keep_alive_and_steady_clients_are_served_then_idle_is_closed(
    server: Server,
) -> None:
    """On one connection: a request; a pause, then a request whose headers arrive in
    pieces (pause and pieces together within the bound, which counts from the end of the
    previous response); one whose body arrives in pieces within the bound; then silence,
    and the connection is closed (nothing was asked, so no answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
        await asyncio.sleep(TIMEOUT * 0.3)
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\n", b"Host: 127.", b"0.0.1\r\n\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(TIMEOUT * 0.1)
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
        writer.write(
            b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(QUERY)
        )
        for start in range(0, len(QUERY), 9):
            await asyncio.sleep(TIMEOUT * 0.15)
            writer.write(QUERY[start : start + 9])
            await writer.drain()
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head + body
        assert b'"__typename":"Query"' in body.replace(b" ", b""), body
        received, elapsed = await until_closed(reader, CLOSE_BOUND)
        assert received == b"", received
        # uvicorn's own keep-alive limit is 5 s: this is HTTP_HEADER_TIMEOUT.
        assert TIMEOUT * 0.8 <= elapsed < 4.0, elapsed
    finally:
        writer.close()


async def test_headers_past_the_size_bound_get_431_and_the_connection_is_closed(
    server: Server,
) -> None:
    """HTTP_MAX_HEADER_BYTES at its default, 32 KiB: a request with 1 MiB of headers gets
    a 431 and the connection is closed right away; one just within is served."""

    def healthz(size: int) -> bytes:
        start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: "
        return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

    received, elapsed = await stalled(server.port, healthz(1024 * 1024))
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), received
    assert b"\r\nconnection: close\r\n" in received, received
    assert elapsed < 1.0, elapsed
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(healthz(32 * 1024))
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()
    assert "Traceback" not in server.log(), server.log()


async def test_bare_uvicorn_bounds_the_body_but_not_the_headers(
    tmp_path: Path, database_url: str
) -> None:
    """What the docs (operating/scaling.md) say of `uvicorn graph.app:app`: the body's
    bound is the app's own, the header bound is `strawgate serve`'s protocol (a proxy
    must supply it)."""
    env = production_env(
        database_url, HTTP_HEADER_TIMEOUT=str(TIMEOUT), HTTP_BODY_TIMEOUT=str(TIMEOUT)
    )
    port = free_port()
    command = uvicorn_command(port)
    async with running(command, env=env, cwd=tmp_path, logs=tmp_path / "logs", port=port):
        half_headers = await asyncio.open_connection("127.0.0.1", port)
        try:
            half_headers[1].write(HALF_HEADERS)
            received, elapsed = await stalled(port, HALF_BODY)
            assert received.startswith(b"HTTP/1.1 408 "), received
            assert TIMEOUT * 0.8 <= elapsed, elapsed
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(half_headers[0].read(), TIMEOUT * 3)
        finally:
            half_headers[1].close()
