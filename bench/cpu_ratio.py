"""CPU time per finishPasskeyLogin and per refresh, in one process through the ASGI app
(not a load test: a ratio that the machine's load moves less than bench/run.py's).

    taskset -c 0 .venv/bin/python -m bench.cpu_ratio [--rounds 5] [--per-round 400] \\
        2>bench/results/logs/cpu-ratio.txt

bench/run.py's target `finishPasskeyLogin ok/s >= 0.5 x refresh ok/s` compares two
scenarios measured a minute apart on a machine whose speed drifts; this measures the same
ratio from the CPU time each request costs, alternating the two in rounds. A scratch
database is migrated and the passkey users seeded and their ceremonies started over HTTP
(bench/passkey_seed.py, with a Strawgate process of its own, then stopped); then, in this
process (pin it: `taskset -c 0`), the app with bench/run.py's environment (and a
`CLAIMS_HOOK` from this one's) answers finishPasskeyLogin and refresh called through ASGI
directly, with no HTTP and no load client: 64 sign-ins first, whose sessions the refreshes
rotate. Each round times `--per-round` sign-ins, then as many refreshes, with
`time.process_time()` (this process's CPU, its threads included), on uvloop as uvicorn
runs. The app logs as a server does (a JSON line per security event, to stderr: send it
to a file, as above, not a terminal).

Printed: each round's microseconds per request, and the median of the rounds' ratios
refresh / finishPasskeyLogin (what bench/run.py's ok/s ratio would be if the server's
core were all there was). HTTP parsing (uvicorn) is left out: it costs both about the
same, which would move the ratio slightly toward 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from starlette.types import ASGIApp, Message

from bench.harness import (
    BENCH_DIR,
    check_local,
    create_database,
    drop_database,
    run_command,
    run_main,
    start_server,
    stop_server,
    venv_tool,
)
from bench.passkey_seed import prepare_sign_ins, seed_passkey_users
from bench.run import DEFAULT_PG_URL, SERVER_CORE, progress, server_env
from tests.smtp import SmtpSink, free_port

REFRESH = (
    "mutation($i: RefreshInput!){ refresh(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code } } }"
)
SESSIONS = 64  # sessions the refreshes rotate (one refresh token chain each)
LOGS = BENCH_DIR / "results" / "logs"


async def call(app: ASGIApp, body: bytes) -> dict[str, Any]:
    """One POST /graphql through the ASGI app; the answer's JSON."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"user-agent", b"bench"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    delivered = False
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if delivered:  # nothing more: the client stays connected
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer


def _field(answer: dict[str, Any], name: str) -> dict[str, Any]:
    found = (answer.get("data") or {}).get(name) or {}
    if found.get("__typename") != "AuthSession":
        raise RuntimeError(f"{name} did not answer an AuthSession: {answer}")
    return dict(found)


async def measure(args: argparse.Namespace) -> int:
    pg_url = os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL)
    check_local(pg_url)
    database = f"strawgate_bench_{secrets.token_hex(4)}"
    mailbox = SmtpSink(port=free_port())
    env = server_env(pg_url, database, mailbox)
    async with contextlib.AsyncExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strawgate-cpu-")))
        progress(f"creating database {database}")
        await create_database(pg_url, database)
        stack.push_async_callback(drop_database, pg_url, database)
        await run_command([venv_tool("strawgate"), "migrate"], env=env, cwd=work, time_limit=120)
        mailbox.start()
        stack.callback(mailbox.stop)
        count = SESSIONS + args.rounds * args.per_round
        progress(f"seeding {count:,} passkey users, starting their ceremonies")
        seeder = await start_server(
            "cpu-ratio-seeder", "graph.app:app", env=env, cwd=work, log_dir=LOGS, core=SERVER_CORE
        )
        try:
            users = await seed_passkey_users(env["DATABASE_URL"], {"all": count})
            sign_ins = await prepare_sign_ins(
                seeder.url("/graphql"), env["DATABASE_URL"], users, work=work
            )
        finally:
            await stop_server(seeder, signal.SIGINT)
        bodies = [line.encode() for line in sign_ins.files["all"].read_text().splitlines() if line]
        os.environ.update(env)
        from graph.app import create_app  # with the environment above

        app = create_app()
        await stack.enter_async_context(app.router.lifespan_context(app))
        progress("measuring")
        tokens = [
            _field(await call(app, body), "finishPasskeyLogin")["refreshToken"]
            for body in bodies[:SESSIONS]
        ]

        async def refresh(n: int) -> None:
            variables = {"i": {"refreshToken": tokens[n % SESSIONS]}}
            body = json.dumps({"query": REFRESH, "variables": variables}).encode()
            tokens[n % SESSIONS] = _field(await call(app, body), "refresh")["refreshToken"]

        for n in range(SESSIONS):  # warm
            await refresh(n)
        passkey_us: list[float] = []
        refresh_us: list[float] = []
        for round_ in range(args.rounds):
            chunk = bodies[SESSIONS + round_ * args.per_round :][: args.per_round]
            started = time.process_time()
            for body in chunk:
                _field(await call(app, body), "finishPasskeyLogin")
            passkey_us.append((time.process_time() - started) / len(chunk) * 1e6)
            started = time.process_time()
            for n in range(args.per_round):
                await refresh(n)
            refresh_us.append((time.process_time() - started) / args.per_round * 1e6)
    print("finishPasskeyLogin us:", " ".join(f"{us:.0f}" for us in passkey_us))
    print("refresh us:           ", " ".join(f"{us:.0f}" for us in refresh_us))
    ratios = [r / p for r, p in zip(refresh_us, passkey_us, strict=True)]
    print(
        f"refresh / finishPasskeyLogin CPU per request: median {statistics.median(ratios):.3f}"
        f" ({min(ratios):.3f}-{max(ratios):.3f}; bench/run.py's target: >= 0.5)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu_ratio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=400, help="requests of each kind")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.per_round < 1:
        parser.error("--rounds and --per-round must be at least 1")
    LOGS.mkdir(parents=True, exist_ok=True)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return run_main(measure(args), logs=LOGS, dropped="database dropped")


if __name__ == "__main__":
    sys.exit(main())
