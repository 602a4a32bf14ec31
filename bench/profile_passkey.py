"""A profile of Strawgate under the finishPasskeyLogin load (not a measurement).

    .venv/bin/python -m bench.profile_passkey [--duration 10] [--rate 1000]

The finishPasskeyLogin scenario of bench/run.py on its own, with the server run under
pyinstrument (`python -m pyinstrument -r text`): a scratch database migrated, one
Strawgate process pinned to core 0 with bench/run.py's environment, the passkey users
seeded and their ceremonies started and answered (bench/passkey_seed.py), then
bench/otp_client.py's load for `--warmup` + `--duration` seconds on core 1. The server is
stopped with SIGINT, so pyinstrument writes its report to
bench/results/profile-passkey.txt; the database is dropped. pyinstrument must be
importable by the venv's Python (or through PYTHONPATH); ok/s is printed, but a profiled
server is slower than a plain one: read bench/run.py's figures for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import signal
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

from bench.harness import (
    BENCH_DIR,
    BenchError,
    LoadSettings,
    check_local,
    create_database,
    drop_database,
    run_bodies_client,
    run_command,
    run_main,
    start_server,
    stop_server,
    venv_tool,
)
from bench.passkey_seed import prepare_sign_ins, seed_passkey_users
from bench.run import DEFAULT_PG_URL, LOAD_CORE, PASSKEY, SERVER_CORE, progress, server_env
from tests.smtp import SmtpSink, free_port

TIME_LIMIT = 600.0  # seconds for the whole profile, its seeding included


async def profile(args: argparse.Namespace, pg_url: str) -> int:
    if find_spec("pyinstrument") is None:
        raise BenchError("pyinstrument is not importable (install it, or set PYTHONPATH)")
    results = BENCH_DIR / "results"
    logs = results / "profile-passkey-logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = results / "profile-passkey.txt"
    out.unlink(missing_ok=True)
    check_local(pg_url)
    database = f"strawgate_bench_{secrets.token_hex(4)}"
    mailbox = SmtpSink(port=free_port())
    env = server_env(pg_url, database, mailbox)
    load = LoadSettings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=1,
        core=LOAD_CORE,
    )
    sets = {
        "warmup": max(load.connections, math.ceil(args.warmup * args.rate)),
        "measured": max(load.connections, math.ceil(args.duration * args.rate)),
    }
    with tempfile.TemporaryDirectory(prefix="strawgate-profile-") as tmp:
        work = Path(tmp)
        async with contextlib.AsyncExitStack() as stack, asyncio.timeout(TIME_LIMIT):
            progress(f"creating database {database}")
            await create_database(pg_url, database)
            stack.push_async_callback(drop_database, pg_url, database)
            await run_command(
                [venv_tool("strawgate"), "migrate"], env=env, cwd=work, time_limit=120
            )
            mailbox.start()
            stack.callback(mailbox.stop)
            progress("starting Strawgate under pyinstrument")
            server = await start_server(
                "strawgate-pyinstrument",
                "graph.app:app",
                env=env,
                cwd=work,
                log_dir=logs,
                core=SERVER_CORE,
                launcher=[sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(out), "-m"],
            )
            stack.push_async_callback(stop_server, server, signal.SIGINT)
            progress(f"seeding {sum(sets.values()):,} passkey users, starting their ceremonies")
            users = await seed_passkey_users(env["DATABASE_URL"], sets)
            sign_ins = await prepare_sign_ins(
                server.url("/graphql"), env["DATABASE_URL"], users, work=work
            )
            progress(f"load: {load.warmup:g} s warm-up, {load.duration:g} s profiled")
            result, _rss, record = await run_bodies_client(
                server.url("/graphql"),
                mutation=PASSKEY,
                warmup_bodies=sign_ins.files["warmup"],
                bodies=sign_ins.files["measured"],
                load=load,
                server_pid=server.pid,
                log_path=logs / "passkey-client.txt",
            )
            # uvicorn re-raises the signal once shut down: as KeyboardInterrupt, SIGINT
            # lets pyinstrument write its report.
            await stop_server(server, signal.SIGINT)
    print(
        f"{PASSKEY} under pyinstrument: {result.ok_rps:,.1f} ok/s, p50 {result.p50_ms} ms,"
        f" p99 {result.p99_ms} ms; answers {record.get('outcomes')}"
    )
    written = out.exists() and out.stat().st_size > 0
    print(f"profile: {out}" if written else "pyinstrument wrote no profile")
    return 0 if written else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_passkey",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds profiled")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up first")
    parser.add_argument("--connections", type=int, default=32, help="concurrent users")
    parser.add_argument("--rate", type=float, default=1000.0, help="sign-ins prepared a second")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rate <= 0 or args.connections < 1:
        parser.error("need a positive --duration, --rate and --connections, --warmup >= 0")
    pg_url = os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL)
    return run_main(
        profile(args, pg_url),
        logs=BENCH_DIR / "results" / "profile-passkey-logs",
        dropped="database dropped",
    )


if __name__ == "__main__":
    sys.exit(main())
