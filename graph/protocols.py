"""uvicorn's HTTP/1.1 protocols with a bound on the request line and headers (issue 12).

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

`strawgate serve` passes `HeaderTimeoutProtocol` to uvicorn."""

from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from db.settings import Settings

_MESSAGE = b"The request's headers did not arrive in time."


@functools.cache
def configured_header_timeout() -> float:
    """HTTP_HEADER_TIMEOUT in seconds, read once per process (each worker reads its own
    settings, as the app does)."""
    return Settings().http_header_timeout.total_seconds()


def _timeout_response(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 408 Request Timeout"]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: text/plain; charset=utf-8",
        b"content-length: " + str(len(_MESSAGE)).encode("ascii"),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + _MESSAGE


class _HeaderDeadline:
    """The timer both protocols share: armed while the connection waits for a request's
    line and headers, stopped once they are complete. `header_timeout` in seconds (None:
    HTTP_HEADER_TIMEOUT of the settings)."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: ServerState

    header_timeout: float | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _request_begun = False

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
            self.transport.write(_timeout_response(self.server_state.default_headers))
        self.transport.close()


class HttpToolsHeaderTimeout(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with the header deadline."""

    _in_message = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(begun=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._note_data(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stop_header_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """Re-arms the deadline unless a pipelined request is queued behind; a 408 is owed
        if the parser is inside a message (a body the app did not wait for, or half of the
        next request)."""
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:
            self._arm_header_deadline(begun=self._in_message)


class H11HeaderTimeout(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(begun=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._note_data(data)
        super().data_received(data)

    def handle_events(self) -> None:
        """Stops the deadline once h11 produced a request (a new cycle)."""
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._stop_header_deadline()

    def on_response_complete(self) -> None:
        """Re-arms the deadline before uvicorn's own goes on to a pipelined request; a 408
        is owed if a body the app did not wait for, or bytes of the next request, are due."""
        if not self.transport.is_closing():
            pending = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
            self._arm_header_deadline(begun=pending)
        super().on_response_complete()


HeaderTimeoutProtocol: type[asyncio.Protocol]
try:
    import httptools  # noqa: F401
except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
    HeaderTimeoutProtocol = H11HeaderTimeout
else:
    HeaderTimeoutProtocol = HttpToolsHeaderTimeout
