"""A real webhook receiver for the tests: an HTTP/1.1 server (asyncio and h11) on loopback
in the test's event loop, which verifies every request with the standardwebhooks library
(`Webhook(secret).verify(body, headers)`, with each secret it knows) and answers what the
test tells it to."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import h11
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# A status; "hang": no answer until the receiver stops; "hold": 200 once the test calls
# release() (or the receiver stops); "huge": 200 and a body of HUGE bytes.
Answer = int | Literal["hang", "hold", "huge"]
HUGE = 64 * 1024 * 1024  # more than the socket buffers on both sides hold


def secret_for(name: str) -> str:
    """A Standard Webhooks secret (whsec_ and base64 of 32 bytes), the same for a name."""
    return "whsec_" + base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


@dataclass
class Received:
    """One request the receiver verified, and the status it answered."""

    webhook_id: str
    timestamp: int
    signatures: list[str]
    content_type: str
    body: bytes
    payload: Any
    status: int


@dataclass
class Receiver:
    """Listens on 127.0.0.1 (a free port unless given). `answers` are used up one a request
    (a status, "hang": no answer until stop, or "hold": 200 once released); then `default`.
    A request no secret verifies is answered 401 and kept in `rejected`."""

    secrets: Sequence[str]
    answers: deque[Answer] = field(default_factory=deque)
    default: int = 200
    port: int = 0
    path: str = "/hook"
    received: list[Received] = field(default_factory=list)
    rejected: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    connections: int = 0
    cut_short: int = 0  # answers the client stopped reading before their end
    _server: asyncio.Server | None = None
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def ids(self) -> list[str]:
        """The webhook-id of every verified request, in the order they came."""
        return [item.webhook_id for item in self.received]

    def answer(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    def release(self) -> None:
        """Answers the requests held ("hold"), and those held from now on, at once."""
        self._released.set()

    async def start(self) -> Receiver:
        self._stopped.clear()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.close()
            # Connections end by being closed (a cancelled handler upsets asyncio's own
            # callback on Python 3.11): a read then sees the end, a hang is over.
            handlers = dict(self._handlers)
            for writer in handlers.values():
                writer.close()
            if handlers:
                await asyncio.wait(handlers, timeout=5.0)
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, limit: float = 20.0) -> list[Received]:
        """Until `count` requests were verified (real time: a server in another process)."""
        async with asyncio.timeout(limit):
            while len(self.received) < count:  # noqa: ASYNC110 - polled: requests are few
                await asyncio.sleep(0.02)
        return self.received

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read(connection, reader)
                if request is None:
                    return
                status = await self._judge(request, body)
                size = HUGE if status == "huge" else 0
                head = h11.Response(
                    status_code=200 if status == "huge" else status,
                    headers=[("content-length", str(size))],
                )
                writer.write(connection.send(head) or b"")
                try:
                    for _ in range(size // 65536):
                        writer.write(connection.send(h11.Data(data=b"x" * 65536)) or b"")
                        await writer.drain()
                except OSError:
                    self.cut_short += 1
                    raise
                writer.write(connection.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, OSError):
            return
        finally:
            self._handlers.pop(task, None)
            writer.close()

    @staticmethod
    async def _read(
        connection: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:  # ConnectionClosed, PAUSED
                return None, b""

    async def _judge(self, request: h11.Request, body: bytes) -> int | Literal["huge"]:
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        payload: Any = None
        problems: list[str] = []
        for secret in self.secrets:
            try:
                payload = Webhook(secret).verify(body, headers)
                break
            except WebhookVerificationError as exc:
                problems.append(str(exc))
        else:
            self.rejected.append((headers, body, "; ".join(problems)))
            return 401
        answer = self.answers.popleft() if self.answers else self.default
        received = Received(
            webhook_id=headers["webhook-id"],
            timestamp=int(headers["webhook-timestamp"]),
            signatures=headers["webhook-signature"].split(" "),
            content_type=headers.get("content-type", ""),
            body=body,
            payload=payload,
            status=answer if isinstance(answer, int) else 503 if answer == "hang" else 200,
        )
        self.received.append(received)
        if answer == "hang":  # no answer until the receiver stops
            await self._stopped.wait()
        elif answer == "hold":  # no answer until released (or the receiver stops)
            waits = [asyncio.ensure_future(e.wait()) for e in (self._released, self._stopped)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        return "huge" if answer == "huge" else received.status


@contextlib.asynccontextmanager
async def receiving(
    secrets: Sequence[str], *, answers: Iterable[Answer] = (), port: int = 0
) -> AsyncIterator[Receiver]:
    receiver = await Receiver(secrets=list(secrets), answers=deque(answers), port=port).start()
    try:
        yield receiver
    finally:
        await receiver.stop()
