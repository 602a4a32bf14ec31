"""The bounds on slow requests (issue 12) at their own level: graph.protocols' header
deadline and header size bound in both of uvicorn's HTTP/1.1 protocols (a uvicorn server
in this process, on a real socket, with a small ASGI app), and RequestGuard's body
deadline (an ASGI receive that stalls)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import uvicorn
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from db.settings import Settings
from graph.app import RequestGuard
from graph.metrics import Metrics
from graph.protocols import H11HeaderTimeout, HeaderTimeoutProtocol, HttpToolsHeaderTimeout
from tests.test_slow_clients import read_response, trickling, until_closed

TIMEOUT = 0.3  # seconds: the header deadline of the servers here, the body deadline below
CLOSE_BOUND = 3.0
CAP = 32 * 1024  # the servers' bound on a request's line and headers (the default)


class QuickHttpTools(HttpToolsHeaderTimeout):
    header_timeout = TIMEOUT
    max_header_bytes = CAP


class QuickH11(H11HeaderTimeout):
    header_timeout = TIMEOUT
    max_header_bytes = CAP


PROTOCOLS = pytest.mark.parametrize(
    "protocol", [QuickHttpTools, QuickH11], ids=["httptools", "h11"]
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echoes the path and body. /slow answers after three deadlines; /stream sends its
    body over three deadlines; /early answers without reading the body."""
    if scope["type"] != "http":
        return
    body = b""
    more = scope["path"] != "/early"
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(TIMEOUT * 3)
    payload = scope["path"].encode() + b" " + body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(payload)).encode())],
        }
    )
    if scope["path"] == "/stream":
        for byte in payload:
            await send({"type": "http.response.body", "body": bytes([byte]), "more_body": True})
            await asyncio.sleep(TIMEOUT * 3 / len(payload))
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def serving(protocol: type[asyncio.Protocol]) -> AsyncIterator[int]:
    """A uvicorn server with `protocol` in this event loop; its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app, http=protocol, lifespan="off", ws="none", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert not task.done(), task
            assert time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def exchange(port: int, sent: bytes) -> tuple[bytes, float]:
    """Send `sent` on a new connection: what comes back until the server closes it, and
    how long after the send that was."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if sent:
            writer.write(sent)
            await writer.drain()
        return await until_closed(reader, CLOSE_BOUND)
    finally:
        writer.close()


def request(size: int, path: bytes = b"/", *, body: bytes | None = None) -> bytes:
    """A request whose line and headers are `size` bytes long (an X-Fill header pads
    them): a GET, or a POST of `body`."""
    if body is None:
        start = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
    else:
        start = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (path, len(body))
    fill = size - len(start) - len(b"X-Fill: \r\n\r\n")
    assert fill >= 0
    return start + b"X-Fill: " + b"a" * fill + b"\r\n\r\n" + (body or b"")


def chunked(path: bytes, body: bytes) -> bytes:
    """A POST of `body` in chunks of 1000 bytes (Transfer-Encoding: chunked)."""
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + framed
        + b"0\r\n\r\n"
    )


def assert_refused(received: bytes) -> None:
    """A 431 with `connection: close` (and nothing after it: the connection closed)."""
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), received[:300]
    assert b"\r\nconnection: close" in head, head
    assert body == b"The request's line and headers are too large.", received[:300]


def test_strawgate_serve_uses_the_httptools_protocol_with_the_deadline() -> None:
    assert HeaderTimeoutProtocol is HttpToolsHeaderTimeout


def test_the_timeouts_are_durations_above_zero_30_seconds_unless_set() -> None:
    for name in ("http_header_timeout", "http_body_timeout"):
        assert Settings.model_fields[name].default == timedelta(seconds=30)
    given = Settings.model_validate({"http_header_timeout": "2m", "http_body_timeout": "0.5"})
    assert given.http_header_timeout == timedelta(minutes=2)
    assert given.http_body_timeout == timedelta(seconds=0.5)
    for wrong in ("0", "-1", "2h", "soon"):
        with pytest.raises(ValidationError):
            Settings.model_validate({"http_body_timeout": wrong})


@PROTOCOLS
async def test_half_a_request_line_gets_408_then_close(protocol: type[asyncio.Protocol]) -> None:
    async with serving(protocol) as port:
        received, elapsed = await exchange(port, b"GET /health")
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
    assert b"\r\nconnection: close\r\n" in received, received
    assert TIMEOUT * 0.8 <= elapsed < CLOSE_BOUND, elapsed


@PROTOCOLS
async def test_half_the_headers_get_408_then_close(protocol: type[asyncio.Protocol]) -> None:
    async with serving(protocol) as port:
        received, elapsed = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nAcc")
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert TIMEOUT * 0.8 <= elapsed < CLOSE_BOUND, elapsed


@PROTOCOLS
async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    protocol: type[asyncio.Protocol],
) -> None:
    async with serving(protocol) as port:
        received, elapsed = await exchange(port, b"")
    assert received == b""
    assert TIMEOUT * 0.8 <= elapsed < CLOSE_BOUND, elapsed


@PROTOCOLS
async def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_bound(
    protocol: type[asyncio.Protocol],
) -> None:
    async with serving(protocol) as port:
        received, elapsed = await trickling(port, b"GET / HTTP/1.1\r\nHost: x\r\n", TIMEOUT / 10)
    # The 408 may be lost to the reset a byte sent after the close draws.
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT * 2, "not cut at the bound"


@PROTOCOLS
async def test_long_responses_keep_alive_and_pipelining_are_not_cut(
    protocol: type[asyncio.Protocol],
) -> None:
    """The deadline is off while a request runs: a response that takes three deadlines
    to start, and one that takes three to stream, arrive whole; the connection is kept
    alive between requests, pipelined requests are answered in order, and the last one
    (left half-sent) gets its 408."""
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"/slow ab", head + body
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"/stream ", head + body
            for piece in (b"GET /one HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                writer.write(piece)
                await asyncio.sleep(TIMEOUT / 5)
            head, body = await read_response(reader)
            assert body == b"/one ", head + body
            writer.write(
                b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nc"
                b"GET /four HTTP/1.1\r\nHo"
            )
            started = time.monotonic()
            assert (await read_response(reader))[1] == b"/two "
            assert (await read_response(reader))[1] == b"/slow c"
            received, _ = await until_closed(reader, CLOSE_BOUND)
            # The half-sent request's deadline counts from the end of the slow answer.
            assert time.monotonic() - started >= TIMEOUT * 3.8
        finally:
            writer.close()
    assert received.startswith(b"HTTP/1.1 408 "), received


@PROTOCOLS
async def test_an_idle_kept_alive_connection_is_closed_at_the_bound(
    protocol: type[asyncio.Protocol],
) -> None:
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_response(reader)
            received, elapsed = await until_closed(reader, CLOSE_BOUND)
        finally:
            writer.close()
    assert received == b""
    assert TIMEOUT * 0.8 <= elapsed < CLOSE_BOUND, elapsed  # uvicorn's keep-alive: 5 s


@PROTOCOLS
async def test_the_rest_of_a_body_the_app_did_not_wait_for_is_bounded(
    protocol: type[asyncio.Protocol],
) -> None:
    """The app answers before the body is in; the client never sends the rest: the
    connection is closed at the bound, not held for the rest."""
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            head, body = await read_response(reader)
            assert body == b"/early ", head + body
            received, elapsed = await until_closed(reader, CLOSE_BOUND)
        finally:
            writer.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert TIMEOUT * 0.8 <= elapsed < CLOSE_BOUND, elapsed


# -- The bound on the size of a request's line and headers ----------------------------------


def test_the_header_size_bound_is_32_kib_unless_set_from_1_kib_to_1_mib() -> None:
    assert Settings.model_fields["http_max_header_bytes"].default == CAP
    assert Settings.model_validate({"http_max_header_bytes": "8192"}).http_max_header_bytes == 8192
    for wrong in ("1023", str(1024 * 1024 + 1), "lots"):
        with pytest.raises(ValidationError):
            Settings.model_validate({"http_max_header_bytes": wrong})


@PROTOCOLS
async def test_a_megabyte_of_headers_gets_431_then_close_before_it_is_all_sent(
    protocol: type[asyncio.Protocol],
) -> None:
    """The client sends 1 MiB of headers 16 KiB at a time: the 431 comes once the bound
    is passed, not once the server has it all (which it never holds), and the server
    ends the connection right after it."""
    huge = request(1024 * 1024)
    sent = 0
    answered = asyncio.Event()
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            nonlocal sent
            for start in range(0, len(huge), 16 * 1024):
                if answered.is_set():
                    return
                writer.write(huge[start : start + 16 * 1024])
                await writer.drain()
                sent += 16 * 1024
                await asyncio.sleep(0.005)

        sender = asyncio.create_task(send())
        try:
            first = await asyncio.wait_for(reader.read(65536), CLOSE_BOUND)
            answered.set()
            sent_by_then = sent
            rest, elapsed = await until_closed(reader, CLOSE_BOUND)
        finally:
            answered.set()
            with contextlib.suppress(OSError):
                await sender
            writer.close()
    assert_refused(first + rest)
    assert sent_by_then <= 8 * CAP, sent_by_then  # not 1 MiB: refused as it came
    assert elapsed < 1.0, elapsed  # closed with the answer, not at a deadline


@PROTOCOLS
async def test_headers_of_the_bound_are_served_one_byte_more_gets_431(
    protocol: type[asyncio.Protocol],
) -> None:
    """Exactly CAP bytes of line and headers, sent in two parts (more than h11's own
    16 KiB in the first), are served; CAP + 1, all at once, are refused."""
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            whole = request(CAP, b"/fits")
            writer.write(whole[:20_000])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(whole[20_000:])
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"/fits ", head + body
        finally:
            writer.close()
        received, elapsed = await exchange(port, request(CAP + 1))
    assert_refused(received)
    assert elapsed < 1.0, elapsed


@PROTOCOLS
async def test_a_large_body_does_not_count(protocol: type[asyncio.Protocol]) -> None:
    """Bodies of MAX_BODY_BYTES (the default 64 KiB), after headers of nearly CAP bytes,
    with a Content-Length and chunked, each sent in one write, are served on one
    connection."""
    body = bytes(range(256)) * 256
    assert len(body) == Settings.model_fields["max_body_bytes"].default
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request(CAP - 10, b"/long", body=body))
            head, answer = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and answer == b"/long " + body, head
            writer.write(chunked(b"/chunked", body))
            head, answer = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and answer == b"/chunked " + body, head
        finally:
            writer.close()


@PROTOCOLS
async def test_a_pipelined_request_with_huge_headers_gets_431_after_the_answers_before_it(
    protocol: type[asyncio.Protocol],
) -> None:
    """In one write: a request whose answer takes a while, one with a body, a chunked
    one, then 1 MiB of headers. The three are answered in order, then comes the 431 and
    the connection is closed."""
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                + request(200, b"/body", body=b"x" * 30_000)
                + chunked(b"/chunked", b"y" * 5000)
                + request(1024 * 1024, b"/huge")
            )
            assert (await read_response(reader))[1] == b"/slow "
            assert (await read_response(reader))[1] == b"/body " + b"x" * 30_000
            assert (await read_response(reader))[1] == b"/chunked " + b"y" * 5000
            received, _ = await until_closed(reader, CLOSE_BOUND)
        finally:
            writer.close()
    assert_refused(received)


@PROTOCOLS
async def test_pipelined_requests_are_counted_each_from_its_own_start(
    protocol: type[asyncio.Protocol],
) -> None:
    """In one write: a small request, one of CAP bytes, a POST whose head and body are
    each nearly CAP bytes, then one of CAP + 1 bytes: each request's line and headers
    count for it alone, so the first three are served and the last is refused."""
    body = b"z" * (CAP - 100)
    async with serving(protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                request(100, b"/small")
                + request(CAP, b"/full")
                + request(CAP - 100, b"/post", body=body)
                + request(CAP + 1, b"/over")
            )
            assert (await read_response(reader))[1] == b"/small "
            assert (await read_response(reader))[1] == b"/full "
            assert (await read_response(reader))[1] == b"/post " + body
            received, _ = await until_closed(reader, CLOSE_BOUND)
        finally:
            writer.close()
    assert_refused(received)


# -- RequestGuard: the body deadline ------------------------------------------------------


def guarded(calls: list[bytes]) -> RequestGuard:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        calls.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return RequestGuard(inner, max_body_bytes=1024, body_timeout=TIMEOUT, metrics=Metrics())


def post_scope() -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": "/graphql",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }


def chunks_every(pause: float, chunks: list[bytes], *, finish: bool = True) -> Receive:
    """A receive that hands out `chunks` one per `pause` seconds (the last one ending the
    body if `finish`), then nothing ever again."""
    left = list(chunks)

    async def receive() -> Message:
        if not left:
            await asyncio.Event().wait()
        await asyncio.sleep(pause)
        chunk = left.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(left) or not finish}

    return receive


async def run_guard(guard: RequestGuard, receive: Receive) -> tuple[list[Message], float]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    started = time.monotonic()
    await asyncio.wait_for(guard(post_scope(), receive, send), CLOSE_BOUND)
    return sent, time.monotonic() - started


async def test_a_body_that_stops_half_way_gets_408_and_connection_close() -> None:
    calls: list[bytes] = []
    sent, elapsed = await run_guard(guarded(calls), chunks_every(0, [b"{"], finish=False))
    start = sent[0]
    assert start["status"] == 408, sent
    headers = dict(start["headers"])
    assert headers[b"connection"] == b"close"
    assert b"x-request-id" in headers
    assert b"did not arrive in time" in sent[1]["body"]
    assert calls == []  # the app never ran
    assert TIMEOUT * 0.9 <= elapsed < CLOSE_BOUND, elapsed


async def test_a_trickled_body_is_cut_at_the_bound_on_the_whole() -> None:
    calls: list[bytes] = []
    trickle = chunks_every(TIMEOUT / 10, [b"x"] * 50)  # steady, but 5 deadlines long
    sent, elapsed = await run_guard(guarded(calls), trickle)
    assert sent[0]["status"] == 408, sent
    assert calls == []
    assert elapsed < TIMEOUT * 2, elapsed


async def test_a_steady_body_within_the_bound_reaches_the_app_whole() -> None:
    calls: list[bytes] = []
    steady = chunks_every(TIMEOUT / 10, [b'{"query": ', b'"{ __typename }"', b"}"])
    sent, _ = await run_guard(guarded(calls), steady)
    assert sent[0]["status"] == 200, sent
    assert calls == [b'{"query": "{ __typename }"}']
