"""uvicorn's HTTP/1.1 protocols with bounds on the request line and headers (issue 12).

uvicorn calls the app only once a request's headers are complete, and its own
keep-alive timeout covers only a connection idle after a response: a connection that
sends nothing, or part of a request line or headers, would stay open for ever (and a few
hundred of them exhaust the process's file descriptors). Here a request's line and
headers must arrive whole within HTTP_HEADER_TIMEOUT, counted from the connection's
opening or, on a kept-alive connection, from the end of the previous response; the bound
is on the whole, so a client trickling a byte at a time is cut as well. When it passes,
the connection is closed: with a 408 if part of a request arrived, without a word if
nothing did (a browser's idle pre-opened connection must not read a 408 as the answer to
its next request). The body's bound lives in the app (graph.app.RequestGuard), so that a
bare `uvicorn graph.app:app` has it too.

Their size is bounded as well: a request's line and headers, from its first byte to the
blank line that ends them, may be at most HTTP_MAX_HEADER_BYTES long (nginx's default
allows 4 x 8 KiB). They are counted as they arrive, so a request past the bound is
refused once that many bytes came, not once it is whole; its body does not count, and a
pipelined request's count starts where the previous request ends. Past the bound the
answer is 431 with `connection: close` (after the answers owed to earlier pipelined
requests), nothing more is parsed, and the connection is closed (see _LINGER). Without
this, httptools gathers a header of any length (64 MiB of them were answered with a
200), and h11 has a bound of its own (uvicorn's h11_max_incomplete_event_size, 16 KiB
unless set) that holds only for headers arriving in more than one read, with a 400: both
protocols here count alike instead, and h11's own bound is set to this one.

`strawgate serve` passes `HeaderTimeoutProtocol` to uvicorn."""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from db.settings import Settings

_LATE = b"The request's headers did not arrive in time."
_TOO_LARGE = b"The request's line and headers are too large."
# After a 431 the client may still be sending the rest of its headers: closing with them
# unread would send a reset, which can destroy the answer before the client reads it. So
# the server ends its side of the connection at once and drops what comes for this long
# before closing (what nginx calls a lingering close).
_LINGER = 2.0
_HEAD_END = b"\r\n\r\n"
_NOT_BLANK = re.compile(rb"[^\r\n]")


@functools.cache
def configured_header_timeout() -> float:
    """HTTP_HEADER_TIMEOUT in seconds, read once per process (each worker reads its own
    settings, as the app does)."""
    return Settings().http_header_timeout.total_seconds()


@functools.cache
def configured_max_header_bytes() -> int:
    """HTTP_MAX_HEADER_BYTES, read once per process."""
    return Settings().http_max_header_bytes


def _plain_response(
    status: bytes, message: bytes, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    lines = [b"HTTP/1.1 " + status]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: text/plain; charset=utf-8",
        b"content-length: " + str(len(message)).encode("ascii"),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + message


class _HeadBounds:
    """What both protocols share: the deadline timer, armed while the connection waits
    for a request's line and headers and stopped once they are complete, and the answer
    when they pass the size bound. `header_timeout` in seconds (None: HTTP_HEADER_TIMEOUT
    of the settings); `max_header_bytes` (None: HTTP_MAX_HEADER_BYTES)."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: ServerState
    flow: FlowControl

    header_timeout: float | None = None
    max_header_bytes: int | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _request_begun = False
    _head_refused = False  # a request's head passed the bound: nothing more is parsed
    _lingering: asyncio.TimerHandle | None = None  # the 431 is sent; closing at this

    def _arm_header_deadline(self, *, begun: bool) -> None:
        self._stop_header_deadline()
        self._request_begun = begun
        if self.transport.is_closing():
            return
        seconds = self.header_timeout
        if seconds is None:
            seconds = configured_header_timeout()
        self._header_timer = self.loop.call_later(seconds, self._header_deadline_passed)

    def _stop_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _note_data(self, data: bytes) -> None:
        if data and self._header_timer is not None:
            self._request_begun = True

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(
                _plain_response(b"408 Request Timeout", _LATE, self.server_state.default_headers)
            )
        self.transport.close()

    def _header_cap(self) -> int:
        cap = self.max_header_bytes
        return configured_max_header_bytes() if cap is None else cap

    def _response_owed(self) -> bool:
        """Whether an earlier request's response is still to be sent."""
        raise NotImplementedError

    def _refused_data(self) -> bool:
        """Drops what arrives once a head is refused (the caller stops there): before the
        431, reading is paused; after it, the rest is read and dropped."""
        if not self._head_refused:
            return False
        if self._lingering is None:
            self.flow.pause_reading()
        return True

    def _refuse_head(self) -> None:
        """A request's head passed the bound: 431 now, or once the responses owed to
        earlier pipelined requests are sent (`_answer_too_large` then; reading is paused
        until then)."""
        self._head_refused = True
        self._stop_header_deadline()
        if self._response_owed():
            self.flow.pause_reading()
        else:
            self._answer_too_large()

    def _answer_too_large(self) -> None:
        if self.transport.is_closing() or self._lingering is not None:
            return
        response = b"431 Request Header Fields Too Large"
        self.transport.write(
            _plain_response(response, _TOO_LARGE, self.server_state.default_headers)
        )
        if not self.transport.can_write_eof():  # TLS
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = self.loop.call_later(_LINGER, self.transport.close)
        self.flow.resume_reading()

    def _stop_lingering(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()


class HttpToolsHeaderTimeout(_HeadBounds, HttpToolsProtocol):
    """uvicorn's httptools protocol with the header deadline and size bound.

    llhttp keeps nothing of a request: it hands the protocol the URL as it comes, and each
    header once whole (httptools gathers a header's pieces until then, without bound).
    So the bytes are counted here as they are fed to it. To know which are a head's, they
    are fed in pieces that end where a head or a request may end: at the bound, at the
    blank line after a head (llhttp wants CRLFs, and skips blank lines before a request
    line), at the end of a Content-Length body. Each request's head then starts where a
    piece does and is counted exactly. The end of a chunked body is not looked for (its
    data may hold blank lines at will, and a piece at each would cost a call per four
    bytes): requests that follow one in the same read are counted, for that read, from
    what llhttp handed over of them (method, URL and whole header lines: a few bytes short
    of the whole), then exactly."""

    _in_message = False
    _in_body = False  # from the end of a request's headers to its end
    _body_left: int | None = None  # of its Content-Length body (None: chunked)
    _head_bytes = 0  # of the request line and headers read so far
    _head_tail = b""  # their last three bytes (a blank line may straddle two pieces)
    _head_parts = 0  # what llhttp handed over of them: fewer bytes than they are
    _heads_complete = 0  # count of heads completed on the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(begun=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        self._stop_lingering()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._note_data(data)
        if self._refused_data():
            return
        start = 0
        while start < len(data) and not (self.transport.is_closing() or self._head_refused):
            end = self._piece_end(data, start)
            self._feed(data[start:end])
            start = end

    def _piece_end(self, data: bytes, start: int) -> int:
        if self._in_body:
            left = self._body_left
            return len(data) if left is None or left <= 0 else min(len(data), start + left)
        bound = min(len(data), start + self._header_cap() - self._head_bytes)
        if self._in_message:
            straddling = (self._head_tail + data[start : start + 3]).find(_HEAD_END)
            if straddling >= 0:
                return min(bound, start + straddling + 4 - len(self._head_tail))
            search = start
        else:  # blank lines, then the request line begins here if at all
            line = _NOT_BLANK.search(data, start, bound)
            if line is None:
                return bound
            search = line.start()
        found = data.find(_HEAD_END, search, bound)
        return bound if found < 0 else found + 4

    def _feed(self, piece: bytes) -> None:
        in_head = not self._in_body
        heads_complete = self._heads_complete
        super().data_received(piece)
        if self.transport.is_closing() or self._head_refused or self._in_body:
            return
        if in_head and heads_complete == self._heads_complete:  # all of it was the head's
            self._head_bytes += len(piece)
            self._head_tail = (self._head_tail + piece[-3:])[-3:]
        else:  # a request ended in it: what followed of it (if anything) is the next head
            self._head_bytes = self._head_parts
            self._head_tail = piece[-3:]
        if self._head_bytes >= self._header_cap():  # and the head is not complete
            self._refuse_head()

    def _response_owed(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _declared_length(self) -> int | None:
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            return None
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return 0

    # Once a head is refused, what llhttp goes on to parse of the piece is dropped.

    def on_message_begin(self) -> None:
        if self._head_refused:
            return
        self._in_message = True
        self._head_parts = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._head_refused:
            return
        self._head_parts += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_refused:
            return
        self._head_parts += len(name) + len(value) + 3  # name:value CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_refused:
            return
        self._heads_complete += 1
        # What llhttp handed over, and the method, spaces, version and CRLFs around it.
        least = self._head_parts + len(self.parser.get_method()) + 14
        if least > self._header_cap():  # only a head not counted exactly gets here
            self._refuse_head()
            return
        self._stop_header_deadline()
        self._in_body = True
        self._body_left = self._declared_length()
        self._head_bytes = self._head_parts = 0
        self._head_tail = b""
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_refused:
            return
        if self._body_left is not None:
            self._body_left -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_refused:
            return
        self._in_message = self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """Re-arms the deadline unless a pipelined request is queued behind; a 408 is owed
        if the parser is inside a message (a body the app did not wait for, or half of the
        next request). Answers a refused head once nothing is owed before it."""
        super().on_response_complete()
        if self._head_refused:
            if self._response_owed():
                self.flow.pause_reading()
            else:
                self._answer_too_large()
        elif self.cycle is None or self.cycle.response_complete:
            self._arm_header_deadline(begun=self._in_message)


class H11HeaderTimeout(_HeadBounds, H11Protocol):
    """uvicorn's h11 protocol with the header deadline and size bound.

    h11 keeps a head in its receive buffer until it is whole: while it waits for one, the
    buffer's length is the count. The data is handed to h11 in pieces that keep the buffer
    within the bound, so a whole head past it never arrives at once. What arrives while
    h11 waits for the response to the previous request (it would only buffer it, unread)
    is held here, and handed on once that response is complete."""

    _held = b""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # In place of uvicorn's (h11_max_incomplete_event_size): never reached, as the
        # pieces keep h11's buffer within it.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._header_cap())

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(begun=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        self._stop_lingering()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._note_data(data)
        if self._refused_data():
            return
        self._held += data
        self._feed_held()

    def _buffered(self) -> int:
        return len(self.conn.trailing_data[0])

    def _feed_held(self) -> None:
        data, self._held = self._held, b""
        start = 0
        while start < len(data) and not (self.transport.is_closing() or self._head_refused):
            state = self.conn.their_state
            if state is h11.DONE:  # until the response is complete
                self._held = data[start:]
                self.flow.pause_reading()
                return
            end = len(data)
            if state is h11.IDLE or state is h11.SEND_BODY:
                end = min(end, start + max(self._header_cap() - self._buffered(), 1))
            super().data_received(data[start:end])
            start = end
            self._check_head()

    def _check_head(self) -> None:
        """Refuses the head h11 waits on (having handed on all it could) once its buffer
        holds the bound."""
        if (
            not (self.transport.is_closing() or self._head_refused)
            and self.conn.their_state is h11.IDLE
            and self._buffered() >= self._header_cap()
        ):
            self._refuse_head()

    def _response_owed(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def handle_events(self) -> None:
        """Stops the deadline once h11 produced a request (a new cycle)."""
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._stop_header_deadline()

    def on_response_complete(self) -> None:
        """Re-arms the deadline before uvicorn's own goes on to a pipelined request; a 408
        is owed if a body the app did not wait for, or bytes of the next request, are due.
        Then hands on what was held."""
        if not self.transport.is_closing():
            pending = (
                self.conn.their_state is h11.SEND_BODY
                or bool(self.conn.trailing_data[0])
                or bool(self._held)
            )
            self._arm_header_deadline(begun=pending)
        super().on_response_complete()
        self._check_head()
        if self._held and not (self.transport.is_closing() or self._head_refused):
            self._feed_held()


HeaderTimeoutProtocol: type[asyncio.Protocol]
try:
    import httptools  # noqa: F401
except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
    HeaderTimeoutProtocol = H11HeaderTimeout
else:
    HeaderTimeoutProtocol = HttpToolsHeaderTimeout
