"""Real server processes for the tests: uvicorn (or `strawgate serve`) in a subprocess,
spoken to over HTTP on 127.0.0.1. Every wait is bounded; every process is ended."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from db.settings import Settings
from tests.pg import free_port

# Starts on another free port when the one picked was taken meanwhile (see start).
PORT_ATTEMPTS = 3

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Variables a server reads besides the Settings fields; removed unless a test sets them.
_OTHER_SERVER_VARIABLES = ("FORWARDED_ALLOW_IPS", "WEB_CONCURRENCY")


def server_env(**overrides: str) -> dict[str, str]:
    """The test runner's environment without any server setting (conftest sets some for
    the in-process app), plus `overrides`."""
    known = {name.upper() for name in Settings.model_fields} | set(_OTHER_SERVER_VARIABLES)
    env = {key: value for key, value in os.environ.items() if key.upper() not in known}
    env.update(overrides)
    return env


def strawgate_script() -> str:
    """The `strawgate` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("strawgate")
    assert script.exists(), f"no strawgate script beside {sys.executable}"
    return str(script)


def strawgate_command(port: int, *extra: str) -> list[str]:
    return [strawgate_script(), "serve", "--port", str(port), *extra]


def uvicorn_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "graph.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]


@dataclass
class Server:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """What the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, timeout: float = 15.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers={"user-agent": "pytest"}
        )

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return int(self.process.returncode or 0)


def _log_file(logs: Path, port: int) -> Path:
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"server-{port}-{time.monotonic_ns()}.log"


async def spawn(
    command: list[str], *, env: dict[str, str], cwd: Path, logs: Path, port: int = 0
) -> Server:
    """Start `command` with its output (stdout and stderr) in a file under `logs`."""
    log_path = _log_file(logs, port)
    with log_path.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    return Server(process=process, port=port, log_path=log_path)


async def wait_healthy(server: Server, limit: float = START_TIMEOUT) -> None:
    """Until GET /healthz answers 200; fails with the server's output if it exits first
    or the time runs out."""
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(base_url=server.base_url, timeout=1.0) as http:
        while time.monotonic() < deadline:
            if server.process.returncode is not None:
                raise AssertionError(
                    f"server exited with {server.process.returncode} before it was "
                    f"healthy:\n{server.log()}"
                )
            try:
                response = await http.get("/healthz")
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"server not healthy within {limit} s:\n{server.log()}")


async def start(
    command: list[str] | None = None,
    *,
    env: dict[str, str],
    cwd: Path,
    logs: Path,
    port: int | None = None,
) -> Server:
    """A healthy server (uvicorn on a free port unless `command` is given). The caller
    stops it; on a failed start it is stopped here. A free port picked here can be taken
    by another test's process before the server binds it (the suite runs on several
    workers): a server that exits for that starts again on another port."""
    for attempt in range(PORT_ATTEMPTS):
        chosen = port or free_port()
        server = await spawn(
            command or uvicorn_command(chosen), env=env, cwd=cwd, logs=logs, port=chosen
        )
        try:
            await wait_healthy(server)
        except AssertionError:
            await server.stop()
            taken = "address already in use" in server.log().lower()
            if port is None and command is None and taken and attempt + 1 < PORT_ATTEMPTS:
                continue
            raise
        except BaseException:
            await server.stop()
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


@contextlib.asynccontextmanager
async def running(
    command: list[str] | None = None,
    *,
    env: dict[str, str],
    cwd: Path,
    logs: Path,
    port: int | None = None,
) -> AsyncIterator[Server]:
    """A healthy server for the block, always stopped after it."""
    server = await start(command, env=env, cwd=cwd, logs=logs, port=port)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_many(
    count: int, *, env: dict[str, str], cwd: Path, logs: Path
) -> AsyncIterator[list[Server]]:
    """`count` healthy uvicorn servers started side by side, all stopped after the block."""
    started = await asyncio.gather(
        *(start(env=env, cwd=cwd, logs=logs) for _ in range(count)), return_exceptions=True
    )
    servers = [item for item in started if isinstance(item, Server)]
    try:
        for item in started:
            if isinstance(item, BaseException):
                raise item
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def run_to_exit(
    command: list[str], *, env: dict[str, str], cwd: Path, logs: Path, limit: float = 20.0
) -> tuple[int, str]:
    """Run a process that is expected to exit by itself; its exit code and output. A
    process still running after `limit` seconds is stopped and the test fails."""
    server = await spawn(command, env=env, cwd=cwd, logs=logs)
    try:
        await asyncio.wait_for(server.process.wait(), limit)
    except TimeoutError:
        await server.stop()
        raise AssertionError(f"{command} still running after {limit} s:\n{server.log()}") from None
    finally:
        if server.process.returncode is None:
            await server.stop()
    return int(server.process.returncode or 0), server.log()


def redis_reachable() -> bool:
    """Whether a Redis answers at 127.0.0.1:6379 (tests that need one skip otherwise)."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False
