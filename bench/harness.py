"""The moving parts of the benchmark: a scratch database, servers pinned to a core, wrk,
and peak-RSS sampling. bench/run.py puts them together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LUA_DIR = BENCH_DIR / "lua"
HOST = "127.0.0.1"

SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 15.0
RSS_POLL_INTERVAL = 0.05


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed."""


# -- cores ----------------------------------------------------------------------------------


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """argv run on one core with taskset, or unpinned where taskset is missing."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *argv] if taskset else list(argv)


def venv_tool(name: str) -> str:
    """A console script installed beside the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed beside {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- the scratch database -------------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    """A PostgreSQL URL as asyncpg takes it: no SQLAlchemy "+driver" in the scheme."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def with_database(url: str, database: str, *, scheme: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=scheme, path=f"/{database}"))


def check_local(url: str) -> None:
    """All traffic stays on this machine: refuse a PostgreSQL elsewhere."""
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError(f"BENCH_PG_URL must point at 127.0.0.1, not {host!r}")


async def create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=30)
    finally:
        await conn.close()


async def run_command(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, time_limit: float
) -> str:
    """Run to completion; stdout on success, BenchError with the output otherwise."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(time_limit):
            out, _ = await proc.communicate()
    except BaseException:
        await _kill(proc)
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}:\n{text}")
    return text


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SERVER_STOP_TIMEOUT):
                await proc.wait()


# -- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def start_server(
    name: str,
    app: str,
    *,
    env: dict[str, str],
    cwd: Path,
    log_dir: Path,
    core: int,
    extra: Sequence[str] = (),
    launcher: Sequence[str] | None = None,
) -> Server:
    """uvicorn with one worker (one process) on `core`; returns once /healthz answers.

    `launcher` runs a module in-process instead of `python -m` (a profiler's own -m)."""
    port = free_port()
    argv = pinned(
        core,
        [
            *(launcher or [sys.executable, "-m"]),
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            *extra,
        ],
    )
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the benchmark, which stops it
        )
    server = Server(name=name, port=port, process=process, log_path=log_path)
    try:
        await _wait_ready(server)
    except BaseException:
        await stop_server(server)
        raise
    return server


async def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.returncode is not None:
                raise BenchError(
                    f"{server.name} exited with {server.process.returncode} while starting:\n"
                    f"{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(server.url("/healthz"))).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise BenchError(
        f"{server.name} did not answer /healthz within {SERVER_START_TIMEOUT:.0f} s:\n"
        f"{server.log_tail()}"
    )


async def stop_server(server: Server, how: signal.Signals = signal.SIGTERM) -> None:
    """SIGTERM or SIGINT (uvicorn shuts down gracefully), SIGKILL if it lingers."""
    proc = server.process
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(how)
    try:
        async with asyncio.timeout(SERVER_STOP_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        await _kill(proc)


# -- peak RSS -------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    """A "VmRSS:   1234 kB"-style line of /proc/<pid>/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class PeakRss:
    """Peak resident set size of one process while the block runs, in MiB (the kernel's
    "kB" are KiB).

    The kernel's high-water mark (VmHWM) is reset at the start through clear_refs where
    allowed, and VmRSS is polled every 50 ms as well; the larger of the two is the peak.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mib: float | None = None
        self.start_mib: float | None = None
        self._polled_kib = 0
        self._hwm_reset = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        start = _status_kib(self.pid, "VmRSS")
        self.start_mib = start / 1024 if start is not None else None
        self._hwm_reset = _reset_peak(self.pid)
        self._task = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            rss = _status_kib(self.pid, "VmRSS")
            if rss is not None:
                self._polled_kib = max(self._polled_kib, rss)
            await asyncio.sleep(RSS_POLL_INTERVAL)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        peak = self._polled_kib
        if self._hwm_reset:
            peak = max(peak, _status_kib(self.pid, "VmHWM") or 0)
        self.peak_mib = peak / 1024 if peak else None


# -- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    duration: float
    warmup: float
    connections: int
    threads: int
    core: int


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured (wrk, or bench/login_client.py or otp_client.py);
    latencies in ms.

    wrk times every answer; the Python clients time only the successful ones (None when
    there were none). `socket_errors` are wrk's; the Python clients count their transport
    errors among the outcomes."""

    requests: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    socket_errors: dict[str, int]
    outcomes: dict[str, int]
    samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        return self.outcomes.get("ok", 0)

    @property
    def ok_rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def failures(self) -> dict[str, int]:
        return {name: n for name, n in sorted(self.outcomes.items()) if name != "ok"}

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.rps, 1),
            "ok_per_s": round(self.ok_rps, 1),
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "mean_ms": _round(self.mean_ms),
            "max_ms": _round(self.max_ms),
            "socket_errors": self.socket_errors,
            "outcomes": self.outcomes,
            "samples": self.samples,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def combine(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs of one side (the rounds of an interleaved scenario) as one.

    Requests, seconds, outcomes and socket errors are added up, so the rates are totals
    over all runs. wrk reports percentiles per run, not the latencies themselves (its Lua
    histogram accessor costs time quadratic in the latency range), and on a machine whose
    speed drifts between rounds, one round's p99 over another's p50 means nothing. So p50
    and p99 are those of one round: the one whose p99/p50 is the median of the rounds'.
    The mean is weighted by requests."""
    if not results:
        raise ValueError("no runs to combine")
    requests = sum(r.requests for r in results)
    socket_errors: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for r in results:
        for name, n in r.socket_errors.items():
            socket_errors[name] = socket_errors.get(name, 0) + n
        for name, n in r.outcomes.items():
            outcomes[name] = outcomes.get(name, 0) + n
    timed = sorted(
        (r for r in results if r.p50_ms and r.p99_ms is not None),
        key=lambda r: (r.p99_ms or 0.0) / (r.p50_ms or 1.0),
    )
    median_round = timed[(len(timed) - 1) // 2] if timed else None
    maxes = [r.max_ms for r in results if r.max_ms is not None]
    weighted = [(r.mean_ms, r.requests) for r in results if r.mean_ms is not None]
    weight = sum(n for _, n in weighted)
    return LoadResult(
        requests=requests,
        seconds=sum(r.seconds for r in results),
        p50_ms=median_round.p50_ms if median_round else None,
        p99_ms=median_round.p99_ms if median_round else None,
        mean_ms=sum(m * n for m, n in weighted) / weight if weight else None,
        max_ms=max(maxes) if maxes else None,
        socket_errors=dict(sorted(socket_errors.items())),
        outcomes=dict(sorted(outcomes.items())),
        samples=[sample for r in results for sample in r.samples],
    )


RESULT_MARKER = "BENCH_RESULT "


async def run_wrk(
    url: str,
    script: str,
    script_args: Sequence[str],
    *,
    load: LoadSettings,
    seconds: float,
    log_path: Path,
) -> LoadResult:
    """One wrk run of `seconds` with a scenario script from bench/lua."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed")
    argv = pinned(
        load.core,
        [
            wrk,
            f"--threads={load.threads}",
            f"--connections={load.connections}",
            f"--duration={max(1, round(seconds))}s",
            "--timeout=10s",
            "--latency",
            f"--script={LUA_DIR / script}",
            url,
            "--",
            *script_args,
        ],
    )
    output = await run_command(argv, env=dict(os.environ), cwd=BENCH_DIR, time_limit=seconds + 60)
    return _read_wrk_output(output, log_path)


def _read_wrk_output(output: str, log_path: Path) -> LoadResult:
    """Keep wrk's whole output in the log; parse the line common.lua's done() prints."""
    log_path.write_text(output)
    for line in output.splitlines():
        if line.startswith(RESULT_MARKER):
            return _parse_wrk(json.loads(line[len(RESULT_MARKER) :]))
    raise BenchError(f"wrk printed no result line:\n{output}")


def _parse_wrk(raw: dict[str, Any]) -> LoadResult:
    return LoadResult(
        requests=int(raw["requests"]),
        seconds=float(raw["duration_us"]) / 1e6,
        p50_ms=float(raw["p50_us"]) / 1000,
        p99_ms=float(raw["p99_us"]) / 1000,
        mean_ms=float(raw["mean_us"]) / 1000,
        max_ms=float(raw["max_us"]) / 1000,
        socket_errors={name: int(n) for name, n in raw["errors"].items() if n},
        outcomes={name: int(n) for name, n in sorted(raw["outcomes"].items())},
        samples=[str(sample) for sample in raw["samples"]],
    )


# -- Python load clients (login_client.py, otp_client.py) ------------------------------

MEASURING_MARKER = "MEASURING"


async def run_login_client(
    url: str, body: str, *, load: LoadSettings, server_pid: int, log_path: Path
) -> tuple[LoadResult, PeakRss, dict[str, Any]]:
    """bench/login_client.py on the load core: `load.connections` users that honour
    retryAfter, `load.warmup` s unmeasured then `load.duration` s measured in one go. The
    server's peak RSS is sampled from the client's "MEASURING" line to its result line.
    Returns the result, the RSS and the client's whole result record."""
    return await run_load_client(
        "login_client.py",
        ["--body", body],
        url=url,
        load=load,
        server_pid=server_pid,
        log_path=log_path,
    )


async def run_otp_client(
    url: str,
    *,
    warmup_pairs: Path,
    pairs: Path,
    load: LoadSettings,
    server_pid: int,
    log_path: Path,
) -> tuple[LoadResult, PeakRss, dict[str, Any]]:
    """bench/otp_client.py on the load core: `load.connections` users, each sending
    verifyOtp with the next unused (challenge token, TOTP secret) pair, the warm-up's
    pairs for `load.warmup` s (unmeasured) then the measured ones for `load.duration` s,
    or until they run out. RSS and the result as for run_login_client."""
    return await run_load_client(
        "otp_client.py",
        ["--warmup-pairs", str(warmup_pairs), "--pairs", str(pairs)],
        url=url,
        load=load,
        server_pid=server_pid,
        log_path=log_path,
    )


async def run_bodies_client(
    url: str,
    *,
    mutation: str,
    warmup_bodies: Path,
    bodies: Path,
    load: LoadSettings,
    server_pid: int,
    log_path: Path,
) -> tuple[LoadResult, PeakRss, dict[str, Any]]:
    """bench/otp_client.py with pre-made bodies (one JSON document a line): each of
    `load.connections` users sends the next unused body, the warm-up's for `load.warmup` s
    (unmeasured) then the measured ones for `load.duration` s, or until they run out; an
    AuthSession in `data.<mutation>` is a success. RSS and the result as for
    run_login_client."""
    return await run_load_client(
        "otp_client.py",
        [
            "--mutation",
            mutation,
            "--warmup-bodies",
            str(warmup_bodies),
            "--bodies",
            str(bodies),
        ],
        url=url,
        load=load,
        server_pid=server_pid,
        log_path=log_path,
    )


async def run_load_client(
    script: str,
    args: Sequence[str],
    *,
    url: str,
    load: LoadSettings,
    server_pid: int,
    log_path: Path,
) -> tuple[LoadResult, PeakRss, dict[str, Any]]:
    """A Python load client from bench/ (login_client.py, otp_client.py) on the load
    core, with the warm-up/measured protocol: "MEASURING" when the measured part starts,
    "BENCH_RESULT {json}" when it ends; the server's peak RSS is sampled in between."""
    argv = pinned(
        load.core,
        [
            sys.executable,
            str(BENCH_DIR / script),
            "--url",
            url,
            *args,
            "--users",
            str(load.connections),
            "--warmup",
            str(load.warmup),
            "--duration",
            str(load.duration),
        ],
    )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(os.environ),
        cwd=BENCH_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    raw: dict[str, Any] | None = None
    rss: PeakRss | None = None
    try:
        async with (
            asyncio.timeout(load.warmup + load.duration + 60),
            contextlib.AsyncExitStack() as stack,
        ):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                lines.append(line)
                if line.strip() == MEASURING_MARKER and rss is None:
                    rss = await stack.enter_async_context(PeakRss(server_pid))
                elif line.startswith(RESULT_MARKER) and raw is None:
                    await stack.aclose()  # the measured part is over: stop sampling
                    raw = json.loads(line[len(RESULT_MARKER) :])
            await proc.wait()
    except BaseException:
        await _kill(proc)
        raise
    finally:
        _write_log(log_path, lines)
    if proc.returncode != 0 or raw is None or rss is None:
        raise BenchError(
            f"{script} exited with {proc.returncode} and no result:\n{''.join(lines[-30:])}"
        )
    return _parse_login_client(raw), rss, raw


def _write_log(log_path: Path, lines: list[str]) -> None:
    log_path.write_text("".join(lines))


def _parse_login_client(raw: dict[str, Any]) -> LoadResult:
    def ms(key: str) -> float | None:
        value = raw.get(key)
        return None if value is None else float(value)

    return LoadResult(
        requests=int(raw["requests"]),
        seconds=float(raw["seconds"]),
        p50_ms=ms("p50_ms"),
        p99_ms=ms("p99_ms"),
        mean_ms=ms("mean_ms"),
        max_ms=ms("max_ms"),
        socket_errors={},
        outcomes={name: int(n) for name, n in sorted(raw["outcomes"].items())},
        samples=[str(sample) for sample in raw["samples"]],
    )


# -- GraphQL client for seeding ---------------------------------------------------------------


class GraphQLClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client = httpx.AsyncClient(timeout=30.0)

    async def __aenter__(self) -> GraphQLClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def field(self, query: str, variables: dict[str, Any], name: str) -> dict[str, Any]:
        """data[name] of a POST /graphql, or BenchError with what came back instead."""
        response = await self._client.post(self.url, json={"query": query, "variables": variables})
        try:
            answer = response.json()
            value = answer["data"][name]
        except (ValueError, KeyError, TypeError):
            raise BenchError(
                f"{name}: HTTP {response.status_code}: {response.text[:500]}"
            ) from None
        if not isinstance(value, dict):
            raise BenchError(f"{name}: HTTP {response.status_code}: {response.text[:500]}")
        return value


async def _cancelled_by_sigterm(bench: Coroutine[Any, Any, int]) -> int:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cleans up like Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await bench


def run_main(bench: Coroutine[Any, Any, int], *, logs: Path, dropped: str) -> int:
    """A benchmark's entry point: its exit status (0 every target met, 1 one missed, 2 it
    could not run, 130 interrupted, its servers stopped and its scratch data `dropped`)."""
    try:
        return asyncio.run(_cancelled_by_sigterm(bench))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"server logs: {logs}/", file=sys.stderr)
        return 2
    except TimeoutError:
        print("benchmark failed: it ran over its time budget", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"benchmark interrupted; servers stopped, {dropped}", file=sys.stderr)
        return 130
