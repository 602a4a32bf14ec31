"""How cost grows with the data: the same server build against an empty database and
against one with a million users, in one run.

    .venv/bin/python -m bench.scale                      # 1M users, seeded now (~6 min)
    .venv/bin/python -m bench.scale --users 100000       # quicker
    .venv/bin/python -m bench.scale --keep-template strawgate_scale_1m   # keep the seed
    .venv/bin/python -m bench.scale --template strawgate_scale_1m        # reuse it

See bench/README.md ("Scale") for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet

from bench.harness import (
    BENCH_DIR,
    REPO_ROOT,
    BenchError,
    GraphQLClient,
    LoadResult,
    LoadSettings,
    Server,
    asyncpg_dsn,
    check_local,
    combine,
    create_database,
    drop_database,
    run_command,
    run_login_client,
    run_main,
    run_otp_client,
    run_wrk,
    start_server,
    stop_server,
    venv_tool,
    with_database,
)
from bench.otp_seed import USER_COLUMNS, OtpSeeds, seed_otp_users
from bench.report import Row, Scenario
from bench.run import (
    DEFAULT_PG_URL,
    LOAD_CORE,
    LOGIN_FOR_SESSION,
    ME_BODY,
    PASSWORD,
    REFRESH_TEMPLATE,
    SERVER_CORE,
    Bench,
    Options,
    Side,
    git_commit,
    interleaved,
    progress,
)
from bench.scale_explain import Explained, explain
from bench.scale_seed import TABLES, SeedReport, count_backlog, seed_scale
from db.devices import device_family, network_of
from db.security.passwords import PasswordHasher
from db.security.tokens import new_opaque_token, token_digest
from db.settings import RateLimits
from tests.smtp import SmtpSink, free_port

# The goals (issue 13): at scale, throughput at least 0.8 of the empty database's, p99 at
# most 1.5 times its.
MIN_THROUGHPUT_RATIO = 0.8
MAX_P99_RATIO = 1.5
# Housekeeping: no request waits for a lock longer than this.
MAX_LOCK_WAIT_MS = 100.0

SIDES = ("empty", "seeded")  # the interleaved rounds' labels: E and S
EMAIL = "bench1@example.com"  # the request scenarios' user, in both databases
BACKLOG_EMAIL = "bench-backlog@example.com"  # the backlog phase's load, seeded only
LOGIN_TEMPLATE = (
    "mutation($i: LoginInput!){ login(input:$i){ __typename"
    " ... on AuthSession { accessToken } ... on AuthError { code retryAfter } } }"
)
BENCH_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
# The seeded server's log lines of a housekeeping pass (db/services/housekeeping.py).
PASS_LINE = re.compile(
    r"housekeeping: (challenges [\d,]+, .*) removed in ([\d.]+) s, (\d+) batch\(es\), "
    r"the longest (\d+) ms"
)
KIND_LINE = re.compile(
    r"housekeeping: (\w+): ([\d,]+) removed in ([\d.]+) s, (\d+) batch\(es\), the longest (\d+) ms"
)
LOCK_POLL = 0.02  # seconds between looks at pg_stat_activity for requests waiting on a lock
CLIENT_ROUND_MIN = 5  # seconds


@dataclass(frozen=True)
class ScaleOptions:
    users: int
    load: LoadSettings
    rounds: int
    sessions: int  # refresh-token chains per set (at least one per connection)
    otp_rate: float
    pg_url: str
    template: str | None  # copy this seeded database instead of seeding
    keep_template: str | None  # keep the freshly seeded database under this name
    window: float  # seconds of each load window while the backlog is pruned
    max_windows: int
    backlog_connections: int  # wrk connections and login users while it is
    jobs: int
    keep: bool  # keep the run's two databases


@dataclass
class Target:
    """One database, its fixtures and its server."""

    label: str
    database: str
    env: dict[str, str]
    chains: dict[str, Path] = field(default_factory=dict)
    otp: OtpSeeds | None = None
    server: Server | None = None
    access_token: str = ""

    @property
    def url(self) -> str:
        return self.env["DATABASE_URL"]

    def live(self) -> Server:
        if self.server is None:
            raise BenchError(f"the {self.label} server is not running")
        return self.server


# -- fixtures, straight into each database ----------------------------------------------------


async def seed_fixtures(
    target: Target, options: ScaleOptions, work: Path, chain_sets: Sequence[str]
) -> None:
    """The bench users (EMAIL, and BACKLOG_EMAIL on the seeded side, both with PASSWORD),
    refresh-token chains (sessions with one unspent generation each) for every chain set,
    and the verifyOtp users: as the server writes them, in one go, then VACUUM ANALYZE."""
    now = datetime.now(UTC)
    password_hash = PasswordHasher().context.hash(PASSWORD)
    conn = await asyncpg.connect(asyncpg_dsn(target.url), timeout=30)
    try:
        users: dict[str, uuid.UUID] = {EMAIL: uuid.uuid4()}
        if target.label == "seeded":
            users[BACKLOG_EMAIL] = uuid.uuid4()
        await conn.copy_records_to_table(
            "users",
            records=[
                (user_id, email, email, password_hash, True, now, now, now)
                for email, user_id in users.items()
            ],
            columns=USER_COLUMNS,
        )
        sessions: list[tuple[Any, ...]] = []
        tokens: list[tuple[Any, ...]] = []
        for name in chain_sets:
            owner = users[BACKLOG_EMAIL if name.startswith("backlog") else EMAIL]
            issued = [new_opaque_token() for _ in range(options.sessions)]
            for token in issued:
                session_id = uuid.uuid4()
                sessions.append(
                    (
                        session_id,
                        owner,
                        now,
                        now,
                        now + timedelta(days=14),
                        now + timedelta(days=30),
                        now,
                        BENCH_AGENT,
                        "127.0.0.1",
                        "pwd",
                        device_family(BENCH_AGENT),
                        network_of("127.0.0.1"),
                    )
                )
                tokens.append((session_id, 0, token_digest(token), now))
            path = work / f"chains-{target.label}-{name}.txt"
            path.write_text("\n".join(issued) + "\n")
            target.chains[name] = path
        async with conn.transaction():
            await conn.copy_records_to_table(
                "sessions",
                records=sessions,
                columns=[
                    "id",
                    "user_id",
                    "created_at",
                    "last_used_at",
                    "expires_at",
                    "absolute_expires_at",
                    "auth_time",
                    "user_agent",
                    "ip",
                    "amr",
                    "device",
                    "network",
                ],
            )
            await conn.copy_records_to_table(
                "refresh_tokens",
                records=tokens,
                columns=["session_id", "generation", "token_hash", "created_at"],
            )
        await conn.execute("VACUUM (ANALYZE) users, sessions, refresh_tokens", timeout=600)
    finally:
        await conn.close()
    per_round = max(
        options.load.connections, round(options.otp_rate * (1 + client_seconds(options)))
    )
    sets = {
        f"{kind}{index}": per_round
        for index in range(1, options.rounds + 1)
        for kind in ("warmup", "round")
    }
    work_side = work / target.label
    work_side.mkdir(exist_ok=True)
    target.otp = await seed_otp_users(
        target.url,
        target.env["ENCRYPTION_KEYS"],
        sets,
        work=work_side,
        challenge_lifetime=timedelta(hours=3),
    )


def round_seconds(options: ScaleOptions) -> int:
    return max(1, round(options.load.duration / options.rounds))


def client_seconds(options: ScaleOptions) -> int:
    """A login or verifyOtp round: at least 5 s (logins go through at a few dozen a
    second, and a round's p99 needs a few hundred)."""
    return max(CLIENT_ROUND_MIN, round_seconds(options))


async def sign_in(target: Target) -> str:
    """An access token for `me`: one login through the API."""
    async with GraphQLClient(target.live().url("/graphql")) as client:
        for _ in range(50):
            answer = await client.field(
                LOGIN_FOR_SESSION, {"i": {"email": EMAIL, "password": PASSWORD}}, "login"
            )
            if answer.get("__typename") == "AuthSession":
                return str(answer["accessToken"])
            if answer.get("code") != "RATE_LIMITED":
                raise BenchError(f"login for the access token failed: {answer}")
            await asyncio.sleep(0.2)
    raise BenchError("login for the access token stayed RATE_LIMITED")


# -- the seeded server's log --------------------------------------------------------------


def _messages(log_path: Path) -> list[str]:
    """The server log's messages (JSON lines in production, else the text after the
    logger's name)."""
    found: list[str] = []
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(str(json.loads(line).get("message", "")))
        elif "housekeeping:" in line:
            found.append(line[line.index("housekeeping:") :])
    return found


@dataclass(frozen=True)
class PassSeen:
    summary: str
    seconds: float
    batches: int
    longest_ms: float


def passes(log_path: Path) -> list[PassSeen]:
    seen = []
    for message in _messages(log_path):
        found = PASS_LINE.search(message)
        if found:
            seen.append(
                PassSeen(
                    found.group(1),
                    float(found.group(2)),
                    int(found.group(3)),
                    float(found.group(4)),
                )
            )
    return seen


def kinds(log_path: Path) -> list[dict[str, Any]]:
    """The per-kind lines of the first pass that removed anything (the backlog's)."""
    found: list[dict[str, Any]] = []
    for message in _messages(log_path):
        if PASS_LINE.search(message):
            break
        line = KIND_LINE.search(message)
        if line:
            found.append(
                {
                    "kind": line.group(1),
                    "rows": int(line.group(2).replace(",", "")),
                    "seconds": float(line.group(3)),
                    "batches": int(line.group(4)),
                    "longest_ms": float(line.group(5)),
                }
            )
    return found


# -- lock waits -----------------------------------------------------------------------------


# A housekeeping batch's statement (db/services/batches.py picks its rows as "candidate",
# spent generations as "spent"); a backend keeps showing its last statement until its
# transaction commits.
HOUSEKEEPING_SQL = re.compile(r"ANY\(ARRAY\(SELECT (candidate|spent)\.")


class LockWaits:
    """Samples pg_stat_activity of one database every LOCK_POLL s: every backend waiting
    on a lock, for how long its statement has run (an upper bound of the wait), and what
    the backends it waits for are running: a housekeeping batch, or another request."""

    def __init__(self, database_url: str) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.longest: dict[tuple[int, Any], dict[str, Any]] = {}
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LockWaits:
        self._conn = await asyncpg.connect(self.dsn, timeout=10)
        self._task = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            rows = await self._conn.fetch(
                """
                SELECT w.pid, w.query_start,
                       extract(epoch FROM clock_timestamp() - w.query_start) * 1000 AS ms,
                       left(w.query, 100) AS waiting,
                       ARRAY(SELECT left(b.query, 200) FROM pg_stat_activity b
                             WHERE b.pid = ANY(pg_blocking_pids(w.pid))) AS blockers
                FROM pg_stat_activity w
                WHERE w.datname = current_database() AND w.wait_event_type = 'Lock'
                """
            )
            self.samples += 1
            for row in rows:
                key = (int(row["pid"]), row["query_start"])
                blockers = [str(query) for query in row["blockers"] or []]
                seen = self.longest.get(key)
                if seen is None:
                    seen = self.longest[key] = {
                        "ms": 0.0,
                        "waiting": row["waiting"],
                        "blockers": [],
                        "behind_housekeeping": False,
                    }
                seen["ms"] = max(seen["ms"], float(row["ms"]))
                seen["blockers"] = sorted({*seen["blockers"], *(b[:100] for b in blockers)})
                if any(HOUSEKEEPING_SQL.search(b) for b in blockers):
                    seen["behind_housekeeping"] = True
            await asyncio.sleep(LOCK_POLL)

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._conn.close()

    def worst(self, *, behind_housekeeping: bool, count: int = 3) -> list[dict[str, Any]]:
        chosen = [
            w for w in self.longest.values() if w["behind_housekeeping"] == behind_housekeeping
        ]
        return sorted(chosen, key=lambda wait: -wait["ms"])[:count]

    def as_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "waits": len(self.longest),
            "behind_housekeeping": sum(w["behind_housekeeping"] for w in self.longest.values()),
            "worst_behind_housekeeping": self.worst(behind_housekeeping=True),
            "worst_behind_requests": self.worst(behind_housekeeping=False),
        }


# -- the backlog phase ----------------------------------------------------------------------


@dataclass
class Window:
    during_pass: bool
    refresh: LoadResult
    login: LoadResult

    def as_json(self) -> dict[str, Any]:
        return {
            "during_pass": self.during_pass,
            "refresh": self.refresh.as_json(),
            "login": self.login.as_json(),
        }


async def backlog_phase(
    target: Target, options: ScaleOptions, logs: Path
) -> tuple[list[Window], LockWaits, float]:
    """While the seeded server's first housekeeping pass (started with the server) prunes
    the backlog: windows of refresh (wrk) and login (the retryAfter-honouring client)
    against it, back to back, until the pass has ended; then two windows more, without a
    pass, for comparison. Returns the windows, the lock waits seen, and when (monotonic
    seconds after the server started) the pass ended."""
    server = target.live()
    started = time.monotonic()
    load = options.load
    body = json.dumps(
        {
            "query": LOGIN_TEMPLATE,
            "variables": {"i": {"email": BACKLOG_EMAIL, "password": PASSWORD}},
        }
    )
    windows: list[Window] = []
    ended_at: float | None = None
    window_load = LoadSettings(
        duration=options.window,
        warmup=0.5,
        connections=options.backlog_connections,
        threads=min(load.threads, options.backlog_connections),
        core=load.core,
    )
    async with LockWaits(target.url) as waits:
        index = 0
        after = 0
        while after < 2 and index < options.max_windows:
            index += 1
            during = ended_at is None
            refresh, (login, _rss, _record) = await asyncio.gather(
                run_wrk(
                    server.url("/graphql"),
                    "refresh.lua",
                    [
                        REFRESH_TEMPLATE,
                        str(target.chains[f"backlog{index}"]),
                        str(window_load.threads),
                    ],
                    load=window_load,
                    seconds=options.window,
                    log_path=logs / f"wrk-backlog-refresh-{index}.txt",
                ),
                run_login_client(
                    server.url("/graphql"),
                    body,
                    load=window_load,
                    server_pid=server.pid,
                    log_path=logs / f"login-client-backlog-{index}.txt",
                ),
            )
            windows.append(Window(during, refresh, login))
            if ended_at is None and passes(server.log_path):
                ended_at = time.monotonic() - started
            elif ended_at is not None:
                after += 1
            progress(
                f"backlog window {index}: {'pass running' if during else 'no pass'};"
                f" refresh {refresh.ok_rps:,.0f} ok/s p99 {refresh.p99_ms or 0:,.1f} ms,"
                f" login {login.ok_rps:,.1f} ok/s p99 {login.p99_ms or 0:,.1f} ms"
            )
    if ended_at is None:
        raise BenchError(
            f"the backlog pass did not end within {options.max_windows} windows"
            f" of {options.window:g} s (raise --max-windows)"
        )
    return windows, waits, ended_at


# -- the request scenarios: empty against seeded ----------------------------------------------


@dataclass
class Compared:
    """One operation on both databases, round by round (seeded over empty)."""

    name: str
    title: str
    empty: list[LoadResult] = field(default_factory=list)
    seeded: list[LoadResult] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratios(self, pick: str) -> list[float]:
        found = []
        for mine, theirs in zip(self.seeded, self.empty, strict=True):
            a, b = getattr(mine, pick), getattr(theirs, pick)
            if a is not None and b:
                found.append(a / b)
        return found

    @property
    def throughput_ratio(self) -> float | None:
        found = self.ratios("ok_rps")
        return statistics.median(found) if found else None

    @property
    def p99_ratio(self) -> float | None:
        found = self.ratios("p99_ms")
        return statistics.median(found) if found else None

    def side(self, label: str) -> dict[str, Any]:
        results = self.empty if label == "empty" else self.seeded
        if not results:
            return {}
        total = combine(results)
        p99s = [r.p99_ms for r in results if r.p99_ms is not None]
        p50s = [r.p50_ms for r in results if r.p50_ms is not None]
        return {
            "ok_per_s": total.ok_rps,
            "requests_per_s": total.rps,
            "p50_ms": statistics.median(p50s) if p50s else None,
            "p99_ms": statistics.median(p99s) if p99s else None,
            "failures": total.failures,
            "rounds": [r.as_json() for r in results],
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "empty": self.side("empty"),
            "seeded": self.side("seeded"),
            "round_orders": self.orders,
            "throughput_ratios": self.ratios("ok_rps"),
            "p99_ratios": self.ratios("p99_ms"),
            "throughput_ratio": self.throughput_ratio,
            "p99_ratio": self.p99_ratio,
            "notes": self.notes,
        }


def _bench(
    options: ScaleOptions,
    env: dict[str, str],
    work: Path,
    logs: Path,
    seeded: Server,
    empty: Server,
    mailbox: SmtpSink,
) -> Bench:
    """run.py's Bench, for its interleaved rounds (seeded as "ours", empty as "theirs")."""
    return Bench(
        Options(
            load=options.load,
            rounds=options.rounds,
            sessions=options.sessions,
            hash_samples=1,
            otp_rate=options.otp_rate,
            profile=False,
            pg_url=options.pg_url,
            limiter=False,
        ),
        env,
        work,
        logs,
        logs.parent,
        seeded,
        empty,
        mailbox,
    )


async def compare_wrk(
    bench: Bench,
    name: str,
    title: str,
    script: str,
    sides: dict[str, tuple[Target, list[str], list[list[str]]]],
) -> Compared:
    """me or refresh through run.py's interleaved rounds: a warm-up of each side, then
    --rounds rounds, alternating which goes first."""
    scenario = Scenario(name, title, Row("seeded"), Row("empty"))
    made = {
        label: Side(label, target.live(), "/graphql", warmup_args, round_args)
        for label, (target, warmup_args, round_args) in sides.items()
    }
    await interleaved(bench, scenario, script, made["seeded"], made["empty"])
    compared = Compared(name, title, orders=scenario.round_orders, notes=scenario.notes)
    compared.seeded = list(made["seeded"].results)
    compared.empty = list(made["empty"].results)
    return compared


async def compare_clients(
    options: ScaleOptions,
    name: str,
    title: str,
    targets: dict[str, Target],
    logs: Path,
) -> Compared:
    """login or verifyOtp: --rounds rounds of the Python client against each side,
    alternating which goes first, each with a 1 s warm-up of its own."""
    compared = Compared(name, title)
    load = LoadSettings(
        duration=client_seconds(options),
        warmup=1.0,
        connections=options.load.connections,
        threads=options.load.threads,
        core=options.load.core,
    )
    body = json.dumps(
        {"query": LOGIN_TEMPLATE, "variables": {"i": {"email": EMAIL, "password": PASSWORD}}}
    )
    for index in range(1, options.rounds + 1):
        order = SIDES if index % 2 == 1 else SIDES[::-1]
        compared.orders.append(" ".join(label[0].upper() for label in order))
        for label in order:
            target = targets[label]
            server = target.live()
            log_path = logs / f"{name}-{label}-round{index}.txt"
            if name == "login":
                result, _rss, _record = await run_login_client(
                    server.url("/graphql"),
                    body,
                    load=load,
                    server_pid=server.pid,
                    log_path=log_path,
                )
            else:
                assert target.otp is not None
                result, _rss, record = await run_otp_client(
                    server.url("/graphql"),
                    warmup_pairs=target.otp.files[f"warmup{index}"],
                    pairs=target.otp.files[f"round{index}"],
                    load=load,
                    server_pid=server.pid,
                    log_path=log_path,
                )
                if record.get("ran_out"):
                    compared.notes.append(
                        f"{label} round {index}: the pairs ran out (raise --otp-rate)"
                    )
            (compared.seeded if label == "seeded" else compared.empty).append(result)
    for label, results in (("empty", compared.empty), ("seeded", compared.seeded)):
        total = combine(results)
        if total.failures:
            compared.notes.append(f"{label}: answers other than AuthSession: {total.failures}")
    return compared


# -- the report -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_report(record: dict[str, Any]) -> str:
    lines = [*record["header"], ""]
    seed = record["seed"]
    lines.append(
        f"[seed] {seed['users']:,} users in {seed['seconds']:.0f} s"
        f" ({', '.join(f'{k} {v:.0f} s' for k, v in seed['steps_s'].items())});"
        f" database {seed['database_bytes'] / 2**30:.2f} GiB"
    )
    lines.append("  " + ", ".join(f"{table} {rows:,}" for table, rows in seed["rows"].items()))
    lines.append(
        "  backlog (past the default retentions): "
        + ", ".join(f"{table} {rows:,}" for table, rows in seed["backlog"].items())
    )
    lines.append("")
    backlog = record["backlog"]
    lines.append(
        f"[housekeeping backlog] the seeded server's first pass: {backlog['pass_seconds']:.1f} s,"
        f" {backlog['pass_batches']:,} batches, the longest {backlog['longest_batch_ms']:.0f} ms"
        f" (target: no lock a request waits on held over {MAX_LOCK_WAIT_MS:.0f} ms)"
    )
    lines.append(f"  {'kind':<19}{'rows':>12}{'s':>8}{'batches':>9}{'longest ms':>12}")
    for kind in backlog["kinds"]:
        lines.append(
            f"  {kind['kind']:<19}{kind['rows']:>12,}{kind['seconds']:>8.1f}{kind['batches']:>9,}"
            f"{kind['longest_ms']:>12.0f}"
        )
    waits = backlog["lock_waits"]
    behind = waits["worst_behind_housekeeping"]
    others = waits["worst_behind_requests"]
    lines.append(
        f"  requests waiting on a lock held by housekeeping: {waits['behind_housekeeping']},"
        f" the longest {behind[0]['ms'] if behind else 0:.0f} ms; waiting behind other requests:"
        f" {waits['waits'] - waits['behind_housekeeping']}, the longest"
        f" {others[0]['ms'] if others else 0:.0f} ms ({waits['samples']:,} looks at"
        f" pg_stat_activity, every {LOCK_POLL * 1000:.0f} ms, during the pass and after it)"
    )
    for wait in behind + others[:1]:
        lines.append(f"    {wait['ms']:.0f} ms: {wait['waiting']!r} behind {wait['blockers']!r}")
    lines.append(
        f"  load while the pass ran and after it (windows of {backlog['window_s']:g} s,"
        " refresh by wrk and login by the retryAfter client at once):"
    )
    lines.append(
        f"  {'window':<22}{'refresh ok/s':>13}{'p99 ms':>9}{'max ms':>9}"
        f"{'login ok/s':>12}{'p99 ms':>9}"
    )
    for index, window in enumerate(backlog["windows"], 1):
        refresh, login = window["refresh"], window["login"]
        lines.append(
            f"  {index:>2} {'pass running' if window['during_pass'] else 'no pass':<19}"
            f"{_num(refresh['ok_per_s'], 0):>13}{_num(refresh['p99_ms']):>9}"
            f"{_num(refresh['max_ms']):>9}"
            f"{_num(login['ok_per_s']):>12}{_num(login['p99_ms']):>9}"
        )
    lines.append("")
    lines.append("[request path statements] EXPLAIN ANALYZE, median ms (buffers)")
    lines.append(f"  {'operation':<10}{'statement':<34}{'empty':>16}{'seeded':>16}")
    for empty, seeded in zip(record["explain"]["empty"], record["explain"]["seeded"], strict=True):
        seq = sorted(set(seeded["seq_scans"]))  # the empty side's tables are too small to say
        lines.append(
            f"  {empty['operation']:<10}{empty['statement']:<34}"
            f"{empty['median_ms']:>9.3f} ({empty['shared_buffers']:>3}){seeded['median_ms']:>9.3f}"
            f" ({seeded['shared_buffers']:>3})" + (f"  SEQ SCAN {', '.join(seq)}" if seq else "")
        )
    lines.append("")
    lines.append(
        f"[requests] same build, empty database vs {seed['users']:,} users;"
        f" ratios: seeded / empty, the median of {record['settings']['rounds']} rounds"
    )
    lines.append(
        f"  {'operation':<10}{'empty ok/s':>11}{'seeded ok/s':>12}{'ratio':>7}"
        f"{'empty p99':>11}{'seeded p99':>11}{'ratio':>7}"
        f"   goals (>= {MIN_THROUGHPUT_RATIO:g}, <= {MAX_P99_RATIO:g})"
    )
    for name, op in record["operations"].items():
        t, p = op["throughput_ratio"], op["p99_ratio"]
        verdict = (
            ("PASS" if t is not None and t >= MIN_THROUGHPUT_RATIO else "FAIL")
            + " "
            + ("PASS" if p is not None and p <= MAX_P99_RATIO else "FAIL")
        )
        lines.append(
            f"  {name:<10}{_num(op['empty'].get('ok_per_s')):>11}"
            f"{_num(op['seeded'].get('ok_per_s')):>12}{_num(t, 2):>7}"
            f"{_num(op['empty'].get('p99_ms')):>11}{_num(op['seeded'].get('p99_ms')):>11}"
            f"{_num(p, 2):>7}   {verdict}"
        )
        ratios = "  ".join(
            f"{a:.2f}/{b:.2f} ({o})"
            for a, b, o in zip(
                op["throughput_ratios"], op["p99_ratios"], op["round_orders"], strict=False
            )
        )
        lines.append(f"    per round, throughput/p99 ratio (order): {ratios}")
        lines.extend(f"    {note}" for note in op["notes"])
    steady = record["steady_passes"]
    lines.append("")
    for label in SIDES:
        seen = steady[label]
        if seen:
            shown = ", ".join(f"{p['seconds']:.1f} s" for p in seen)
            lines.append(
                f"[housekeeping, steady] {label}: passes during the request scenarios: {shown}"
            )
        else:
            lines.append(
                f"[housekeeping, steady] {label}: no pass logged during the request scenarios"
                " (a pass that removes nothing in under 1 s is not logged)"
            )
    lines.append("")
    lines.append("Goals")
    for check in record["checks"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        lines.append(
            f"  {verdict}  {check['name']:<44}{_num(check['value'], 2):>9}"
            f"   ({check['comparison']} {check['limit']:g})"
        )
    return "\n".join(lines)


def checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for name, op in record["operations"].items():
        found.append(
            {
                "name": f"{name}: throughput seeded / empty",
                "value": op["throughput_ratio"],
                "limit": MIN_THROUGHPUT_RATIO,
                "comparison": ">=",
            }
        )
        found.append(
            {
                "name": f"{name}: p99 seeded / empty",
                "value": op["p99_ratio"],
                "limit": MAX_P99_RATIO,
                "comparison": "<=",
            }
        )
    waits = record["backlog"]["lock_waits"]["worst_behind_housekeeping"]
    found.append(
        {
            "name": "housekeeping: longest wait behind it (ms)",
            "value": waits[0]["ms"] if waits else 0.0,
            "limit": MAX_LOCK_WAIT_MS,
            "comparison": "<=",
        }
    )
    for check in found:
        value = check["value"]
        check["passed"] = value is not None and (
            value >= check["limit"] if check["comparison"] == ">=" else value <= check["limit"]
        )
    return found


# -- the run ----------------------------------------------------------------------------------


async def run(options: ScaleOptions) -> int:
    results = BENCH_DIR / "results"
    logs = results / "scale-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    check_local(options.pg_url)
    suffix = secrets.token_hex(4)
    names = {
        "empty": f"strawgate_scale_empty_{suffix}",
        "seeded": f"strawgate_scale_seeded_{suffix}",
    }
    mailbox = SmtpSink(port=free_port())
    base_env = {
        **os.environ,
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(36),
        "ENCRYPTION_KEYS": Fernet.generate_key().decode("ascii"),
        **{name.upper(): str(value) for name, value in mailbox.settings().items()},
        **{f"RATE_LIMITS__{name.upper()}": "100000000/minute" for name in RateLimits.model_fields},
        "MAX_SESSIONS_PER_USER": "10000",
        # Production refuses links in mails that lead back to this machine.
        "PRODUCT_URL": "https://auth.example.com",
        "ACCESS_TOKEN_EXPIRE_MINUTES": "120",
    }
    targets = {
        label: Target(
            label,
            names[label],
            {
                **base_env,
                "DATABASE_URL": with_database(
                    options.pg_url, names[label], scheme="postgresql+asyncpg"
                ),
            },
        )
        for label in SIDES
    }
    started = datetime.now(UTC)
    record: dict[str, Any] = {
        "started": started.isoformat(),
        "commit": git_commit(),
        "settings": {
            "users": options.users,
            "duration_s": options.load.duration,
            "warmup_s": options.load.warmup,
            "rounds": options.rounds,
            "round_s": round_seconds(options),
            "connections": options.load.connections,
            "wrk_threads": options.load.threads,
            "chains_per_set": options.sessions,
            "otp_rate_per_s": options.otp_rate,
            "template": options.template,
        },
    }
    load_note = os.getloadavg()
    record["header"] = [
        f"Strawgate at scale, {started:%Y-%m-%d %H:%M} UTC, commit {record['commit'] or 'unknown'}",
        f"servers: uvicorn, 1 worker each, core {SERVER_CORE} (measured one at a time); load on"
        f" core {LOAD_CORE}; PostgreSQL unpinned; machine load average at start"
        f" {load_note[0]:.2f} {load_note[1]:.2f} {load_note[2]:.2f}",
    ]
    chain_sets = ["warmup"] + [f"round{i}" for i in range(1, options.rounds + 1)]
    backlog_sets = [f"backlog{i}" for i in range(1, options.max_windows + 1)]
    with tempfile.TemporaryDirectory(prefix="strawgate-scale-") as tmp:
        work = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            for target in targets.values():
                if target.label == "seeded" and options.template:
                    progress(f"copying {options.template} into {target.database}")
                    copy_started = time.perf_counter()
                    conn = await asyncpg.connect(asyncpg_dsn(options.pg_url), timeout=10)
                    try:
                        await conn.execute(
                            f'CREATE DATABASE "{target.database}" TEMPLATE "{options.template}"',
                            timeout=3600,
                        )
                    finally:
                        await conn.close()
                    if not options.keep:
                        stack.push_async_callback(drop_database, options.pg_url, target.database)
                    record["seed"] = {
                        "template": options.template,
                        "copy_s": time.perf_counter() - copy_started,
                    }
                    continue
                progress(f"creating and migrating {target.database}")
                await create_database(options.pg_url, target.database)
                if not options.keep:
                    stack.push_async_callback(drop_database, options.pg_url, target.database)
                await run_command(
                    [venv_tool("strawgate"), "migrate"], env=target.env, cwd=work, time_limit=300
                )
            seeded = targets["seeded"]
            if not options.template:
                progress(f"seeding {options.users:,} users (bench/scale_seed.py)")
                report: SeedReport = await seed_scale(
                    seeded.url, options.users, jobs=options.jobs, progress=progress
                )
                record["seed"] = report.as_json()
                if options.keep_template:
                    progress(f"keeping the seed as {options.keep_template}")
                    conn = await asyncpg.connect(asyncpg_dsn(options.pg_url), timeout=10)
                    try:
                        await conn.execute(
                            f'DROP DATABASE IF EXISTS "{options.keep_template}" WITH (FORCE)'
                        )
                        await conn.execute(
                            f'CREATE DATABASE "{options.keep_template}"'
                            f' TEMPLATE "{seeded.database}"',
                            timeout=3600,
                        )
                    finally:
                        await conn.close()
            else:
                record["seed"] = {
                    **await _describe_seed(seeded.url, options.users),
                    **record["seed"],
                }
            progress("fixtures: the bench users, refresh chains, verifyOtp users (both databases)")
            for target in targets.values():
                await seed_fixtures(
                    target,
                    options,
                    work,
                    chain_sets + (backlog_sets if target.label == "seeded" else []),
                )
            mailbox.start()
            stack.callback(mailbox.stop)
            progress("starting the seeded server: its first housekeeping pass takes on the backlog")
            seeded.server = await start_server(
                "strawgate-seeded",
                "graph.app:app",
                env=seeded.env,
                cwd=work,
                log_dir=logs,
                core=SERVER_CORE,
            )
            stack.push_async_callback(stop_server, seeded.server)
            windows, waits, ended_at = await backlog_phase(seeded, options, logs)
            first = passes(seeded.server.log_path)[0]
            record["backlog"] = {
                "pass_seconds": first.seconds,
                "pass_batches": first.batches,
                "longest_batch_ms": first.longest_ms,
                "pass_summary": first.summary,
                "ended_after_start_s": ended_at,
                "kinds": kinds(seeded.server.log_path),
                "window_s": options.window,
                "windows": [w.as_json() for w in windows],
                "lock_waits": waits.as_json(),
            }
            progress("VACUUM ANALYZE (what autovacuum does after a backlog; off on some servers)")
            for target in targets.values():
                conn = await asyncpg.connect(asyncpg_dsn(target.url), timeout=10)
                try:
                    await conn.execute("VACUUM (ANALYZE)", timeout=3600)
                finally:
                    await conn.close()
            progress("EXPLAIN ANALYZE of the request path's statements, both databases")
            explained: dict[str, list[Explained]] = {}
            for label, target in targets.items():
                explained[label] = await explain(target.url.replace("+asyncpg", ""))
            record["explain"] = {
                label: [e.as_json() for e in found] for label, found in explained.items()
            }
            progress("starting the empty database's server")
            empty = targets["empty"]
            empty.server = await start_server(
                "strawgate-empty",
                "graph.app:app",
                env=empty.env,
                cwd=work,
                log_dir=logs,
                core=SERVER_CORE,
            )
            stack.push_async_callback(stop_server, empty.server)
            for target in targets.values():
                target.access_token = await sign_in(target)
            passes_before = {label: len(passes(t.live().log_path)) for label, t in targets.items()}
            bench = _bench(options, base_env, work, logs, seeded.live(), empty.live(), mailbox)
            threads = str(options.load.threads)
            operations: dict[str, Compared] = {}
            await analyze(targets)
            progress("scenario me (interleaved rounds)")
            operations["me"] = await compare_wrk(
                bench,
                "me",
                "POST { me { id email } } with a bearer token",
                "me.lua",
                {
                    label: (
                        t,
                        [ME_BODY, t.access_token],
                        [[ME_BODY, t.access_token]] * options.rounds,
                    )
                    for label, t in targets.items()
                },
            )
            await analyze(targets)
            progress("scenario refresh (interleaved rounds)")
            operations["refresh"] = await compare_wrk(
                bench,
                "refresh",
                "refresh mutation, every connection on its own token chain",
                "refresh.lua",
                {
                    label: (
                        t,
                        [REFRESH_TEMPLATE, str(t.chains["warmup"]), threads],
                        [
                            [REFRESH_TEMPLATE, str(t.chains[f"round{i}"]), threads]
                            for i in range(1, options.rounds + 1)
                        ],
                    )
                    for label, t in targets.items()
                },
            )
            await analyze(targets)
            progress("scenario login (alternating rounds)")
            operations["login"] = await compare_clients(
                options, "login", "login mutation, 32 clients honouring retryAfter", targets, logs
            )
            await analyze(targets)
            progress("scenario verifyOtp (alternating rounds)")
            operations["verifyOtp"] = await compare_clients(
                options,
                "verifyOtp",
                "verifyOtp mutation, a fresh challenge and user per request",
                targets,
                logs,
            )
            record["operations"] = {name: op.as_json() for name, op in operations.items()}
            record["steady_passes"] = {
                label: [
                    {
                        "seconds": p.seconds,
                        "batches": p.batches,
                        "longest_ms": p.longest_ms,
                        "summary": p.summary,
                    }
                    for p in passes(t.live().log_path)[passes_before[label] :]
                ]
                for label, t in targets.items()
            }
            progress("stopping servers" + ("" if options.keep else ", dropping the databases"))
    record["checks"] = checks(record)
    record["passed"] = all(check["passed"] for check in record["checks"])
    print(format_report(record))
    out = results / "scale-latest.json"
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nresults: {out.relative_to(REPO_ROOT)}; logs: {logs.relative_to(REPO_ROOT)}/")
    return 0 if record["passed"] else 1


async def analyze(targets: dict[str, Target]) -> None:
    """ANALYZE both databases: what autovacuum's auto-analyze does as the fixtures' tables
    grow during the run (a server may run with autovacuum off, as some test servers do:
    then the empty database's plans stay those of its nearly empty tables)."""
    for target in targets.values():
        conn = await asyncpg.connect(asyncpg_dsn(target.url), timeout=10)
        try:
            await conn.execute("ANALYZE", timeout=600)
        finally:
            await conn.close()


async def _describe_seed(database_url: str, users: int) -> dict[str, Any]:
    """A copied seed's rows and size (its seeding time is not this run's)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=30)
    try:
        rows = {}
        for table in TABLES:
            rows[table] = int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))  # noqa: S608
        return {
            "users": users,
            "seconds": 0.0,
            "steps_s": {},
            "rows": rows,
            "backlog": await count_backlog(conn, datetime.now(UTC)),
            "database_bytes": int(
                await conn.fetchval("SELECT pg_database_size(current_database())")
            ),
        }
    finally:
        await conn.close()


def parse_options(argv: list[str] | None) -> ScaleOptions:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--users", type=int, default=1_000_000, help="users to seed (and all in proportion)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=15.0,
        help="measured seconds per side, shared out over the rounds",
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=64, help="refresh-token chains per set")
    parser.add_argument(
        "--otp-rate",
        type=float,
        default=1000.0,
        help="verifyOtp users seeded per second of a round",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=5.0,
        help="seconds per load window while the backlog is pruned",
    )
    parser.add_argument("--max-windows", type=int, default=120)
    parser.add_argument(
        "--backlog-connections",
        type=int,
        default=8,
        help="wrk connections and login users while the backlog is pruned",
    )
    parser.add_argument("--jobs", type=int, default=2, help="seeding statements at a time")
    parser.add_argument("--template", help="copy this seeded database instead of seeding one")
    parser.add_argument(
        "--keep-template", help="keep the seeded database (before the run) under this name"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's two databases")
    args = parser.parse_args(argv)
    if args.users < 100:
        parser.error("--users must be at least 100")
    if args.sessions < args.connections:
        parser.error("--sessions must be at least --connections")
    return ScaleOptions(
        users=args.users,
        load=LoadSettings(
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            threads=args.threads,
            core=LOAD_CORE,
        ),
        rounds=max(1, args.rounds),
        sessions=args.sessions,
        otp_rate=args.otp_rate,
        pg_url=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        template=args.template,
        keep_template=args.keep_template,
        window=args.window,
        max_windows=args.max_windows,
        backlog_connections=max(1, args.backlog_connections),
        jobs=args.jobs,
        keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    return run_main(
        run(parse_options(argv)),
        logs=BENCH_DIR / "results" / "scale-logs",
        dropped="databases dropped",
    )


if __name__ == "__main__":
    sys.exit(main())
