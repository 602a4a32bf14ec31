"""Strawgate under load, beside a plain baseline measured in the same run.

    .venv/bin/python -m bench.run [--duration 10] [--warmup 2] [--rounds 3] [--profile]

See bench/README.md for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from bench.harness import (
    BENCH_DIR,
    REPO_ROOT,
    BenchError,
    GraphQLClient,
    LoadResult,
    LoadSettings,
    PeakRss,
    Server,
    check_local,
    combine,
    create_database,
    drop_database,
    pinned,
    run_bodies_client,
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
from bench.id_token_seed import MUTATION as ID_TOKEN
from bench.id_token_seed import first_sign_ins, write_bodies
from bench.id_token_seed import server_settings as id_token_settings
from bench.otp_seed import OtpSeeds, seed_otp_users
from bench.passkey_seed import (
    PasskeyUsers,
    prepare_sign_ins,
    seed_passkey_users,
    server_settings,
)
from bench.report import (
    Check,
    Extra,
    Relative,
    Reported,
    Row,
    Scenario,
    checks_for,
    checks_for_relative,
    format_report,
    relative_json,
    reported_json,
    scenario_json,
)
from db.settings import RateLimits
from tests.identity_provider import LocalProvider
from tests.servers import redis_reachable
from tests.smtp import SmtpSink, free_port

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVER_CORE = 0
LOAD_CORE = 1

EMAIL = "bench1@example.com"
PASSWORD = "a long bench password 123"

SIGNUP = (
    "mutation($i: SignupInput!){ signup(input:$i){ __typename"
    " ... on OtpChallenge { challengeToken } ... on AuthError { code message } } }"
)
# Signup verifies the address first (REQUIRE_EMAIL_VERIFICATION, the default): the code
# comes by mail to the bench's own SMTP server.
VERIFY_OTP = (
    "mutation($i: VerifyOtpInput!){ verifyOtp(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code message } } }"
)
# retryAfter: the login client sleeps what a RATE_LIMITED answer says.
LOGIN = (
    "mutation($i: LoginInput!){ login(input:$i){ __typename"
    " ... on AuthSession { accessToken } ... on AuthError { code retryAfter } } }"
)
# Seeding needs the refresh token too.
LOGIN_FOR_SESSION = (
    "mutation($i: LoginInput!){ login(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code } } }"
)
REFRESH = (
    "mutation($i: RefreshInput!){ refresh(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code } } }"
)
ME_BODY = json.dumps({"query": "{ me { id email } }"})
LOGIN_BODY = json.dumps(
    {"query": LOGIN, "variables": {"i": {"email": EMAIL, "password": PASSWORD}}}
)
REFRESH_TEMPLATE = json.dumps({"query": REFRESH, "variables": {"i": {"refreshToken": "@TOKEN@"}}})

# Logins in flight while seeding: the server's hash queue refuses beyond a few per core.
SEED_CONCURRENCY = 2
SEED_ATTEMPTS = 50


@dataclass(frozen=True)
class Options:
    load: LoadSettings
    rounds: int  # interleaved rounds of `me` and `refresh`
    sessions: int
    hash_samples: int
    otp_rate: float  # verifyOtp users seeded per second of warm-up and of measured run
    profile: bool
    pg_url: str
    limiter: bool = True  # also measure the rate limiter's cost (three more servers)
    # finishPasskeyLogin sign-ins prepared per second of warm-up and of measured run
    passkey_rate: float = 1000.0
    # signInWithIdToken: ID tokens minted per second of warm-up and of measured run, and
    # the distinct provider accounts they sign in (each signed in once before, unmeasured)
    id_token_rate: float = 1000.0
    id_token_users: int = 2000


@dataclass
class Bench:
    """Everything a scenario needs: the two running servers and where to write."""

    options: Options
    env: dict[str, str]
    work: Path
    logs: Path
    results: Path
    strawgate: Server
    reference: Server
    mailbox: SmtpSink  # where Strawgate's mail goes

    @property
    def load(self) -> LoadSettings:
        return self.options.load

    @property
    def round_seconds(self) -> int:
        return round_seconds(self.options)


def round_seconds(options: Options) -> int:
    """Seconds of one side in one round: the duration shared out over the rounds, in
    whole seconds as wrk runs them."""
    return max(1, round(options.load.duration / options.rounds))


def chain_sets(rounds: int) -> list[str]:
    """The refresh-token chain sets to seed: each app's warm-up and each of its rounds."""
    names = ["strawgate-warmup", "reference-warmup"]
    for index in range(1, rounds + 1):
        names.extend([f"strawgate-round{index}", f"reference-round{index}"])
    return names


def otp_sets(options: Options) -> dict[str, int]:
    """verifyOtp users to seed: one per request at `--otp-rate` requests a second, for the
    warm-up and for the measured run (separate sets); at least one per connection."""
    load = options.load
    least = load.connections
    return {
        "warmup": max(least, math.ceil(load.warmup * options.otp_rate)) if load.warmup else 0,
        "measured": max(least, math.ceil(load.duration * options.otp_rate)),
    }


def passkey_sets(options: Options) -> dict[str, int]:
    """finishPasskeyLogin sign-ins to prepare (a user with a passkey and a ceremony each):
    one per request at `--passkey-rate` requests a second, for the warm-up and for the
    measured run (separate sets); at least one per connection."""
    load = options.load
    least = load.connections
    return {
        "warmup": max(least, math.ceil(load.warmup * options.passkey_rate)) if load.warmup else 0,
        "measured": max(least, math.ceil(load.duration * options.passkey_rate)),
    }


def id_token_sets(options: Options) -> dict[str, int]:
    """signInWithIdToken bodies to mint (a fresh ID token each): one per request at
    `--id-token-rate` requests a second, for the warm-up and for the measured run (separate
    sets); at least one per connection."""
    load = options.load
    least = load.connections
    return {
        "warmup": max(least, math.ceil(load.warmup * options.id_token_rate)) if load.warmup else 0,
        "measured": max(least, math.ceil(load.duration * options.id_token_rate)),
    }


def time_budget(options: Options) -> float:
    """Seconds the whole run may take before it is stopped."""
    load = options.load
    seeded_logins = len(chain_sets(options.rounds)) * options.sessions
    seeded_otp = sum(otp_sets(options).values())
    seeded_passkeys = sum(passkey_sets(options).values())
    id_tokens = sum(id_token_sets(options).values())
    return (
        600
        + 12 * (load.duration + load.warmup)
        + 0.5 * seeded_logins
        + 0.001 * seeded_otp
        + 0.005 * seeded_passkeys  # a user, a ceremony over HTTP, an assertion each
        + 0.001 * id_tokens  # an RS256 signature each
        + 0.02 * options.id_token_users  # a first sign-in over HTTP each
    )


@dataclass(frozen=True)
class Seeds:
    access_token: str
    token_files: dict[str, Path]  # a chain set's name (see chain_sets) -> its token file
    otp: OtpSeeds  # verifyOtp: (challenge token, TOTP secret) files, warm-up and measured
    passkeys: PasskeyUsers  # finishPasskeyLogin: users with a passkey, warm-up and measured


# -- seeding ----------------------------------------------------------------------------------


async def seed(bench: Bench) -> Seeds:
    """One user (signup), then sessions through login: a refresh-token chain for every
    connection, separately for each app's warm-up and for each of its rounds (a spent
    token cannot be presented again). Then, straight into the database, the users with
    two-factor on and a pending login challenge that `verifyOtp` spends, one a request,
    and the users with a passkey that `finishPasskeyLogin` signs in, one a request."""
    async with GraphQLClient(bench.strawgate.url("/graphql")) as client:
        challenge = await client.field(
            SIGNUP, {"i": {"email": EMAIL, "password": PASSWORD}}, "signup"
        )
        if challenge.get("__typename") != "OtpChallenge":
            raise BenchError(f"signup did not answer a challenge: {challenge}")
        mail = await bench.mailbox.wait_for(EMAIL, timeout=10)
        signed_up = await client.field(
            VERIFY_OTP,
            {"i": {"challengeToken": challenge["challengeToken"], "code": mail.code()}},
            "verifyOtp",
        )
        if signed_up.get("__typename") != "AuthSession":
            raise BenchError(f"verifyOtp did not give a session: {signed_up}")
        access_token = str(signed_up["accessToken"])
        token_files: dict[str, Path] = {}
        for name in chain_sets(bench.options.rounds):
            tokens = await _log_in_many(client, bench.options.sessions)
            path = bench.work / f"refresh-tokens-{name}.txt"
            path.write_text("\n".join(tokens) + "\n")
            token_files[name] = path
    otp = await seed_otp_users(
        bench.env["DATABASE_URL"],
        bench.env["ENCRYPTION_KEYS"],  # the very keys the server was started with
        otp_sets(bench.options),
        work=bench.work,
        # Valid for the whole run whatever its length (the server checks expires_at).
        challenge_lifetime=timedelta(seconds=max(3600.0, time_budget(bench.options))),
    )
    passkeys = await seed_passkey_users(bench.env["DATABASE_URL"], passkey_sets(bench.options))
    return Seeds(access_token=access_token, token_files=token_files, otp=otp, passkeys=passkeys)


async def _log_in_many(client: GraphQLClient, count: int) -> list[str]:
    gate = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one() -> str:
        async with gate:
            for _ in range(SEED_ATTEMPTS):
                answer = await client.field(
                    LOGIN_FOR_SESSION, {"i": {"email": EMAIL, "password": PASSWORD}}, "login"
                )
                if answer.get("__typename") == "AuthSession" and answer.get("refreshToken"):
                    return str(answer["refreshToken"])
                if answer.get("code") != "RATE_LIMITED":
                    raise BenchError(f"login for seeding failed: {answer}")
                await asyncio.sleep(0.2)
            raise BenchError("login for seeding stayed RATE_LIMITED")

    return list(await asyncio.gather(*(one() for _ in range(count))))


# -- measuring --------------------------------------------------------------------------------


async def warm_up(
    bench: Bench, server: Server, path: str, *, name: str, script: str, args: list[str]
) -> None:
    """An unmeasured run of `--warmup` seconds (none when it is 0)."""
    if bench.load.warmup > 0:
        await run_wrk(
            server.url(path),
            script,
            args,
            load=bench.load,
            seconds=bench.load.warmup,
            log_path=bench.logs / f"wrk-{name}-warmup.txt",
        )


async def measured_run(
    bench: Bench,
    server: Server,
    path: str,
    *,
    name: str,
    script: str,
    args: list[str],
    seconds: float,
) -> tuple[LoadResult, PeakRss]:
    """One measured run with the server's peak RSS sampled."""
    async with PeakRss(server.pid) as rss:
        result = await run_wrk(
            server.url(path),
            script,
            args,
            load=bench.load,
            seconds=seconds,
            log_path=bench.logs / f"wrk-{name}.txt",
        )
    if server.process.returncode is not None:
        raise BenchError(f"{server.name} exited during the run:\n{server.log_tail()}")
    return result, rss


async def measure(
    bench: Bench, server: Server, path: str, *, name: str, script: str, args: list[str]
) -> tuple[LoadResult, PeakRss]:
    """A warm-up run, then one measured run of the whole duration."""
    await warm_up(bench, server, path, name=name, script=script, args=args)
    return await measured_run(
        bench, server, path, name=name, script=script, args=args, seconds=bench.load.duration
    )


def load_row(label: str, result: LoadResult, rss_mib: float | None) -> Row:
    return Row(
        label=label,
        ok_rps=result.ok_rps,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        rss_mib=rss_mib,
        ok_share=result.ok / result.requests if result.requests else None,
    )


def describe(label: str, result: LoadResult) -> list[str]:
    """Notes on whatever was not a correct answer."""
    notes: list[str] = []
    if result.failures:
        shown = ", ".join(f"{name} {n}" for name, n in result.failures.items())
        notes.append(f"{label}: {result.ok} ok of {result.requests}; other answers: {shown}")
    if result.socket_errors:
        shown = ", ".join(f"{name} {n}" for name, n in result.socket_errors.items())
        notes.append(f"{label}: wrk socket errors: {shown}")
    if result.samples:
        notes.append(f"{label}: first unexpected body: {result.samples[0][:300]}")
    return notes


@dataclass
class Side:
    """One side of an interleaved scenario: where it is measured, and its rounds so far."""

    label: str
    server: Server
    path: str
    warmup_args: list[str]
    round_args: list[list[str]]  # one per round (refresh needs fresh chains every round)
    results: list[LoadResult] = field(default_factory=list)
    peaks: list[PeakRss] = field(default_factory=list)
    error: str | None = None

    def fail(self, scenario: Scenario, when: str, exc: BenchError) -> None:
        """A failed run ends this side's measuring; the other side goes on."""
        scenario.notes.append(f"{self.label} ({when}): {exc}")
        self.error = f"{when}: {str(exc).splitlines()[0]}"

    def row(self, scenario: Scenario) -> Row:
        """The side's row over all its rounds; its details into scenario.raw."""
        if self.error is not None:
            return Row(self.label, error=self.error)
        total = combine(self.results)
        peaks = [rss.peak_mib for rss in self.peaks if rss.peak_mib is not None]
        peak = max(peaks) if peaks else None
        scenario.raw[self.label] = {
            **total.as_json(),
            "combined_over": (
                f"{len(self.results)} rounds: counts and seconds added up; p50 the median of"
                " the rounds' p50s, p99 the largest of their p99s, mean weighted by requests"
            ),
            "rss_at_start_mib": self.peaks[0].start_mib,
            "peak_rss_mib": peak,
            "rounds": [
                {
                    **result.as_json(),
                    "rss_at_start_mib": rss.start_mib,
                    "peak_rss_mib": rss.peak_mib,
                }
                for result, rss in zip(self.results, self.peaks, strict=True)
            ],
        }
        scenario.notes.extend(describe(self.label, total))
        return load_row(self.label, total, peak)


async def interleaved(
    bench: Bench, scenario: Scenario, script: str, ours: Side, theirs: Side
) -> None:
    """Warm both sides up, then `--rounds` rounds of a measured run of each, alternating
    which goes first (S R, R S, S R, ...): a slow spell of a shared machine then lands on
    both sides rather than on one. Sets the scenario's rows and per-round ratios."""
    sides = (ours, theirs)
    for side in sides:
        try:
            await warm_up(
                bench,
                side.server,
                side.path,
                name=f"{scenario.name}-{side.label}",
                script=script,
                args=side.warmup_args,
            )
        except BenchError as exc:
            side.fail(scenario, "warm-up", exc)
    for index in range(bench.options.rounds):
        order = sides if index % 2 == 0 else sides[::-1]
        scenario.round_orders.append(" ".join(side.label[0].upper() for side in order))
        for side in order:
            if side.error is not None:
                continue
            try:
                result, rss = await measured_run(
                    bench,
                    side.server,
                    side.path,
                    name=f"{scenario.name}-{side.label}-round{index + 1}",
                    script=script,
                    args=side.round_args[index],
                    seconds=bench.round_seconds,
                )
            except BenchError as exc:
                side.fail(scenario, f"round {index + 1}", exc)
                continue
            side.results.append(result)
            side.peaks.append(rss)
    scenario.strawgate = ours.row(scenario)
    scenario.reference = theirs.row(scenario)
    if ours.error is None and theirs.error is None:
        scenario.round_ratios = [
            mine.ok_rps / other.ok_rps if other.ok_rps else None
            for mine, other in zip(ours.results, theirs.results, strict=True)
        ]
        totals = scenario.strawgate.ok_rps, scenario.reference.ok_rps
        scenario.raw["ratio_of_totals"] = (
            totals[0] / totals[1] if totals[0] is not None and totals[1] else None
        )


def new_scenario(name: str, title: str) -> Scenario:
    return Scenario(name, title, Row("strawgate"), Row("reference"))


async def scenario_me(bench: Bench, seeds: Seeds) -> Scenario:
    scenario = new_scenario(
        "me", "POST { me { id email } } with a bearer token: JWT check + one SELECT"
    )
    args = [ME_BODY, seeds.access_token]
    rounds = [args] * bench.options.rounds
    await interleaved(
        bench,
        scenario,
        "me.lua",
        Side("strawgate", bench.strawgate, "/graphql", args, rounds),
        Side("reference", bench.reference, "/me", args, rounds),
    )
    return scenario


async def scenario_login(bench: Bench) -> Scenario:
    users = bench.load.connections
    scenario = new_scenario(
        "login",
        f"login mutation, one user, {users} clients that honour retryAfter:"
        " argon2id verify + new session (only AuthSession counts)",
    )
    # The hash is timed right before and right after the measured login run, and the
    # limit is taken from both: on a shared machine the core's speed drifts over minutes.
    try:
        before = await hash_probe(bench)
    except BenchError as exc:
        scenario.reference = Row("reference", error=str(exc).splitlines()[0])
        return scenario
    scenario.strawgate = await login_clients(bench, scenario)
    try:
        after = await hash_probe(bench)
    except BenchError as exc:
        scenario.reference = Row("reference", error=str(exc).splitlines()[0])
        return scenario
    scenario.extras.append(await login_hammer(bench, scenario))
    median_s = (float(before["median_s"]) + float(after["median_s"])) / 2
    p99_s = max(float(before["p99_s"]), float(after["p99_s"]))
    probe = {"count": before["count"] + after["count"], "before": before, "after": after}
    scenario.reference = Row(
        "reference",
        ok_rps=1 / median_s,
        rps=1 / median_s,
        p50_ms=1000 * median_s,
        p99_ms=1000 * p99_s,
    )
    scenario.raw["reference"] = {"hash_bound": probe}
    scenario.notes.append(
        f"reference: hash-bound limit = 1 / median password verify ({1000 * median_s:.1f} ms:"
        f" {1000 * float(before['median_s']):.1f} ms before the run,"
        f" {1000 * float(after['median_s']):.1f} ms after; {probe['count']} verifies on core"
        f" {SERVER_CORE}); its p50/p99 are verify times"
    )
    return scenario


def answer_counts(outcomes: dict[str, int]) -> tuple[int, int, int]:
    """(AuthSession, RATE_LIMITED, any other answer) of a login run."""
    ok = outcomes.get("ok", 0)
    limited = outcomes.get("RATE_LIMITED", 0)
    return ok, limited, sum(outcomes.values()) - ok - limited


def other_answers(label: str, result: LoadResult) -> list[str]:
    """Notes on login answers that were neither AuthSession nor RATE_LIMITED."""
    notes: list[str] = []
    others = {n: k for n, k in result.failures.items() if n != "RATE_LIMITED"}
    if others:
        shown = ", ".join(f"{name} {n}" for name, n in others.items())
        notes.append(f"{label}: answers other than AuthSession and RATE_LIMITED: {shown}")
        unexpected = [s for s in result.samples if '"RATE_LIMITED"' not in s]
        if unexpected:
            notes.append(f"{label}: first unexpected body: {unexpected[0][:300]}")
    if result.socket_errors:
        shown = ", ".join(f"{name} {n}" for name, n in result.socket_errors.items())
        notes.append(f"{label}: wrk socket errors: {shown}")
    return notes


async def login_clients(bench: Bench, scenario: Scenario) -> Row:
    """The measured login load: bench/login_client.py, users that sleep retryAfter when
    refused. Its p50/p99 are of the AuthSession answers only."""
    server = bench.strawgate
    try:
        result, rss, record = await run_login_client(
            server.url("/graphql"),
            LOGIN_BODY,
            load=bench.load,
            server_pid=server.pid,
            log_path=bench.logs / "login-client-strawgate.txt",
        )
        if server.process.returncode is not None:
            raise BenchError(f"{server.name} exited during the run:\n{server.log_tail()}")
    except BenchError as exc:
        scenario.notes.append(f"strawgate: {exc}")
        return Row("strawgate", error=str(exc).splitlines()[0])
    scenario.raw["strawgate"] = {
        **result.as_json(),
        "load": f"bench/login_client.py, {bench.load.connections} users honouring retryAfter",
        "latency_of": "AuthSession answers, from request sent to answer",
        "retry_sleep_s": record.get("retry_sleep_s"),
        "rate_limited_without_retry_after": record.get("rate_limited_without_retry_after"),
        "rss_at_start_mib": rss.start_mib,
        "peak_rss_mib": rss.peak_mib,
    }
    ok, limited, other = answer_counts(result.outcomes)
    scenario.notes.append(
        f"strawgate answers: AuthSession {ok:,}, RATE_LIMITED {limited:,} (each followed by"
        f" a retryAfter sleep), other {other:,}; p50/p99 are of the AuthSession answers"
    )
    missing = int(record.get("rate_limited_without_retry_after") or 0)
    if missing:
        scenario.notes.append(
            f"strawgate: {missing:,} RATE_LIMITED answers had no retryAfter (the client slept 1 s)"
        )
    scenario.notes.extend(other_answers("strawgate", result))
    return load_row("strawgate", result, rss.peak_mib)


async def login_hammer(bench: Bench, scenario: Scenario) -> Extra:
    """wrk on login, every connection straight back after each answer (retryAfter ignored).
    Reported only: it shows the server stays responsive and refusals are cheap."""
    load = bench.load
    title = (
        f"login, clients ignore retryAfter (wrk, {load.connections} connections, no backoff):"
        " reported only, not a target; shows the server stays responsive and refusals are cheap"
    )
    try:
        result, rss = await measure(
            bench,
            bench.strawgate,
            "/graphql",
            name="login-ignore-retry-after-strawgate",
            script="login.lua",
            args=[LOGIN_BODY],
        )
    except BenchError as exc:
        return Extra(title, Row("strawgate", error=str(exc).splitlines()[0]), notes=[str(exc)])
    scenario.raw["strawgate_ignoring_retry_after"] = {
        **result.as_json(),
        "rss_at_start_mib": rss.start_mib,
        "peak_rss_mib": rss.peak_mib,
    }
    ok, limited, other = answer_counts(result.outcomes)
    total = ok + limited + other
    refusals_per_s = limited / result.seconds if result.seconds else 0.0
    notes = [
        f"answers: AuthSession {ok:,}, RATE_LIMITED {limited:,} ({refusals_per_s:,.1f}/s),"
        f" other {other:,}; p50/p99 are of every answer"
    ]
    notes.extend(other_answers("strawgate", result))
    return Extra(
        title,
        load_row("strawgate", result, rss.peak_mib),
        refused_share=limited / total if total else None,
        notes=notes,
    )


async def hash_probe(bench: Bench) -> dict[str, Any]:
    argv = pinned(
        SERVER_CORE,
        [
            sys.executable,
            str(BENCH_DIR / "hash_probe.py"),
            "--count",
            str(bench.options.hash_samples),
        ],
    )
    output = await run_command(argv, env=bench.env, cwd=bench.work, time_limit=300)
    probe: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return probe


# What Strawgate does for one verifyOtp (db/services/auth.py verify_otp, db/services/mfa.py
# TwoFactor.check_code), so that its number can be read.
VERIFY_OTP_WORK = [
    "server work per verifyOtp: 2 transactions (BEGIN ... COMMIT each, a WAL flush per"
    " commit), 2 statements committing by themselves and 1 plain read, 15 round trips to"
    " PostgreSQL, no password hash:",
    "  1. UPDATE challenges (take an attempt, RETURNING)   2. SELECT + UPDATE the account's"
    " code-check counter (reserve a check)",
    "  3. SELECT totp_credentials; Fernet decrypt of the secret (AES-CBC + HMAC-SHA256) and"
    " 3 TOTP HMAC-SHA1s (steps -1, 0, +1)",
    "  4. one transaction: lock the user, UPDATE totp_credentials (accept the step: replay"
    " protection), UPDATE challenges (consume), SELECT the user,",
    "     the session (INSERT sessions + INSERT refresh_tokens, with the device history and"
    " the live-session count), LOGIN_SUCCEEDED   5. UPDATE the counter (give the check"
    " back); then a signed access JWT",
]


PAIR_COUNTS = ("pairs_used", "pairs_seeded", "warmup_pairs_used", "warmup_pairs_seeded")


async def scenario_verify_otp(bench: Bench, seeds: Seeds, login: Scenario | None) -> Reported:
    """verifyOtp with a fresh (challenge token, TOTP secret) pair a request, from
    bench/otp_client.py. Reported beside `login`, with no reference and no target."""
    load = bench.load
    counts = seeds.otp.counts
    title = (
        f"verifyOtp mutation (two-factor login, step 2), {load.connections} clients, a"
        " fresh challenge and user per request: TOTP check + new session (only AuthSession"
        " counts)"
    )
    reported = Reported("verifyOtp", title, Row("strawgate"), beside="login")
    reported.notes.append(
        f"seeded in the database (not through the API): {sum(counts.values()):,} users with"
        f" two-factor on and one pending login challenge each ({counts['warmup']:,} for the"
        f" warm-up, {counts['measured']:,} for the measured run; --otp-rate"
        f" {bench.options.otp_rate:g}/s), in {seeds.otp.seconds:.1f} s"
    )
    server = bench.strawgate
    try:
        result, rss, record = await run_otp_client(
            server.url("/graphql"),
            warmup_pairs=seeds.otp.files["warmup"],
            pairs=seeds.otp.files["measured"],
            load=load,
            server_pid=server.pid,
            log_path=bench.logs / "otp-client-strawgate.txt",
        )
        if server.process.returncode is not None:
            raise BenchError(f"{server.name} exited during the run:\n{server.log_tail()}")
    except BenchError as exc:
        reported.notes.append(f"strawgate: {exc}")
        reported.row = Row("strawgate", error=str(exc).splitlines()[0])
        return reported
    reported.row = load_row("strawgate", result, rss.peak_mib)
    reported.raw["strawgate"] = {
        **result.as_json(),
        "load": f"bench/otp_client.py, {load.connections} users, one seeded pair a request",
        "latency_of": "AuthSession answers, from request sent to answer",
        "ran_out": record.get("ran_out"),
        "pairs_seeded": record.get("pairs_seeded"),
        "pairs_used": record.get("pairs_used"),
        "warmup_pairs_seeded": record.get("warmup_pairs_seeded"),
        "warmup_pairs_used": record.get("warmup_pairs_used"),
        "warmup_ran_out": record.get("warmup_ran_out"),
        "rss_at_start_mib": rss.start_mib,
        "peak_rss_mib": rss.peak_mib,
    }
    login_ok = login.strawgate.ok_rps if login is not None else None
    multiple = result.ok_rps / login_ok if login_ok else None
    reported.raw["ok_per_s_over_login_ok_per_s"] = multiple
    others = sum(n for name, n in result.outcomes.items() if name != "ok")
    used = {key: int(record.get(key) or 0) for key in PAIR_COUNTS}
    reported.notes.append(
        f"answers: AuthSession {result.ok:,}, other {others:,}; p50/p99 are of the"
        f" AuthSession answers; pairs used: {used['pairs_used']:,} of"
        f" {used['pairs_seeded']:,} measured, {used['warmup_pairs_used']:,} of"
        f" {used['warmup_pairs_seeded']:,} in the warm-up"
    )
    if multiple is not None:
        reported.notes.append(
            f"ok/s = {multiple:,.1f} x login's ok/s ({result.ok_rps:,.1f} vs {login_ok:,.1f}"
            " AuthSession/s of the clients honouring retryAfter): no argon2 on this path"
        )
    if record.get("ran_out"):
        reported.notes.append(
            f"the measured pairs RAN OUT after {result.seconds:.1f} s of {load.duration:g} s:"
            " ok/s is over that shorter window; seed more (raise --otp-rate)"
        )
    if record.get("warmup_ran_out"):
        reported.notes.append(
            "the warm-up's pairs ran out before the warm-up ended (raise --otp-rate)"
        )
    reported.notes.extend(describe("strawgate", result))
    reported.notes.extend(VERIFY_OTP_WORK)
    return reported


# What Strawgate does for one finishPasskeyLogin (db/services/signin/passkey.py
# PasskeySignIns.finish), so that its number can be read.
PASSKEY_WORK = [
    "server work per finishPasskeyLogin, no password hash, 9 round trips to PostgreSQL: the"
    " login_ip limit; parse the AuthenticationResponseJSON; on one connection, each"
    " committing by itself:",
    "  UPDATE challenges (take an attempt), SELECT the passkey by credential ID (+ its"
    " user); the assertion verified (py_webauthn: clientDataJSON, RP ID hash, flags, one"
    " ECDSA P-256 verify);",
    "  then one transaction: lock the user; one statement consuming the challenge and"
    " moving the passkey's count; the user read (with its roles); one adding the session"
    " and its refresh token",
    "  (with the device history and the live-session count read as before them);"
    " INSERT security_events (LOGIN_SUCCEEDED); then a signed access JWT",
]
PASSKEY = "finishPasskeyLogin"


async def scenario_passkey(
    bench: Bench, seeds: Seeds, login: Scenario | None, refresh: Scenario | None
) -> Relative:
    """finishPasskeyLogin with a ceremony of its own a request (started over HTTP and
    answered offline right before, unmeasured), from bench/otp_client.py with pre-made
    bodies. Its targets: multiples of login's and refresh's Strawgate ok/s in this run."""
    load = bench.load
    users = seeds.passkeys
    counts = users.counts
    title = (
        f"finishPasskeyLogin mutation (discoverable passkey sign-in), {load.connections}"
        " clients, a fresh ceremony and user per request: WebAuthn assertion (ECDSA P-256)"
        " + new session (only AuthSession counts)"
    )
    others = {
        "login": login.strawgate.ok_rps if login is not None else None,
        "refresh": refresh.strawgate.ok_rps if refresh is not None else None,
    }
    # The scenarios its targets name (report.RELATIVE_TARGETS): their Strawgate ok/s.
    relative = Relative(PASSKEY, title, Row("strawgate"), others=others)
    server = bench.strawgate
    try:
        progress(f"finishPasskeyLogin: starting {sum(counts.values()):,} ceremonies over HTTP")
        sign_ins = await prepare_sign_ins(
            server.url("/graphql"), bench.env["DATABASE_URL"], users, work=bench.work
        )
        relative.notes.append(
            f"seeded: {sum(counts.values()):,} users with one passkey each, in the database"
            f" ({users.seconds:.1f} s); as many ceremonies started with startPasskeyLogin"
            f" over HTTP ({sign_ins.start_seconds:.1f} s) and answered offline"
            f" ({sign_ins.sign_seconds:.1f} s): {counts['warmup']:,} for the warm-up,"
            f" {counts['measured']:,} for the measured run; --passkey-rate"
            f" {bench.options.passkey_rate:g}/s"
        )
        result, rss, record = await run_bodies_client(
            server.url("/graphql"),
            mutation=PASSKEY,
            warmup_bodies=sign_ins.files["warmup"],
            bodies=sign_ins.files["measured"],
            load=load,
            server_pid=server.pid,
            log_path=bench.logs / "passkey-client-strawgate.txt",
        )
        if server.process.returncode is not None:
            raise BenchError(f"{server.name} exited during the run:\n{server.log_tail()}")
    except BenchError as exc:
        relative.notes.append(f"strawgate: {exc}")
        relative.row = Row("strawgate", error=str(exc).splitlines()[0])
        return relative
    relative.row = load_row("strawgate", result, rss.peak_mib)
    relative.raw["strawgate"] = {
        **result.as_json(),
        "load": (
            f"bench/otp_client.py --mutation {PASSKEY}, {load.connections} users,"
            " one pre-made body (ceremony + assertion) a request"
        ),
        "latency_of": "AuthSession answers, from request sent to answer",
        "ran_out": record.get("ran_out"),
        "bodies_seeded": record.get("pairs_seeded"),
        "bodies_used": record.get("pairs_used"),
        "warmup_bodies_seeded": record.get("warmup_pairs_seeded"),
        "warmup_bodies_used": record.get("warmup_pairs_used"),
        "warmup_ran_out": record.get("warmup_ran_out"),
        "rss_at_start_mib": rss.start_mib,
        "peak_rss_mib": rss.peak_mib,
    }
    relative.raw["seeding"] = {
        "users_s": users.seconds,
        "ceremonies_start_s": sign_ins.start_seconds,
        "assertions_s": sign_ins.sign_seconds,
        "counts": counts,
    }
    others_n = sum(n for name, n in result.outcomes.items() if name != "ok")
    used = {key: int(record.get(key) or 0) for key in PAIR_COUNTS}
    relative.notes.append(
        f"answers: AuthSession {result.ok:,}, other {others_n:,}; p50/p99 are of the"
        f" AuthSession answers; bodies used: {used['pairs_used']:,} of"
        f" {used['pairs_seeded']:,} measured, {used['warmup_pairs_used']:,} of"
        f" {used['warmup_pairs_seeded']:,} in the warm-up"
    )
    if record.get("ran_out"):
        relative.notes.append(
            f"the measured bodies RAN OUT after {result.seconds:.1f} s of {load.duration:g} s:"
            " ok/s is over that shorter window; prepare more (raise --passkey-rate)"
        )
    if record.get("warmup_ran_out"):
        relative.notes.append(
            "the warm-up's bodies ran out before the warm-up ended (raise --passkey-rate)"
        )
    relative.notes.extend(describe("strawgate", result))
    relative.notes.extend(PASSKEY_WORK)
    return relative


# What Strawgate does for one signInWithIdToken of a linked identity
# (db/services/signin/identity.py IdentitySignIns.sign_in_with_id_token and _decide), so
# that its number can be read.
ID_TOKEN_WORK = [
    "server work per signInWithIdToken (an identity already linked), no password hash and"
    " no call to the provider (discovery and keys cached): the login_ip limit; the JWS"
    " header read, the key by kid from the cached JWKS,",
    "  one RSA-2048 signature check (RS256), iss/aud/exp/iat/sub and the nonce's SHA-256"
    " checked; the token spent (INSERT spent_id_tokens, a statement committing by itself);"
    " the identity's login_account limit;",
    "  then one transaction: SELECT the identity by (provider, sub), lock the user, UPDATE"
    " the identity (last used, address, name), the user read, the session (one statement:"
    " INSERT sessions, INSERT refresh_tokens,",
    "  the device history and the live-session count), LOGIN_SUCCEEDED; then a signed access JWT",
]


async def scenario_id_token(
    bench: Bench,
    provider: LocalProvider,
    login: Scenario | None,
    passkey: Relative | None,
) -> Relative:
    """signInWithIdToken with a fresh ID token a request (RS256, minted by the loopback
    provider right before, unmeasured), each the sign-in of an identity signed in once
    before (unmeasured), from bench/otp_client.py with pre-made bodies. Its target: a
    multiple of login's Strawgate ok/s in this run."""
    load = bench.load
    users = bench.options.id_token_users
    title = (
        f"signInWithIdToken mutation (a native app's provider ID token), {load.connections}"
        " clients, a fresh RS256 token per request, each of an identity already linked:"
        " cached JWKS, signature + claims check, token spent + new session (only AuthSession"
        " counts)"
    )
    others = {"login": login.strawgate.ok_rps if login is not None else None}
    relative = Relative(ID_TOKEN, title, Row("strawgate"), others=others)
    server = bench.strawgate
    sets = id_token_sets(bench.options)
    try:
        progress(f"signInWithIdToken: first sign-ins of {users:,} provider accounts over HTTP")
        first = await first_sign_ins(
            server.url("/graphql"), bench.env["DATABASE_URL"], provider, users
        )
        progress(f"signInWithIdToken: minting {sum(sets.values()):,} ID tokens")
        bodies = write_bodies(provider, first.subjects, sets, work=bench.work)
        relative.notes.append(
            f"token mix: {users:,} distinct provider accounts, each signed in once before"
            f" (unmeasured: {users:,} first sign-ins over HTTP from 16 connections, each"
            f" creating its account and identity, in {first.seconds:.1f} s); then"
            f" {sets['warmup']:,} warm-up and {sets['measured']:,} measured tokens (RS256,"
            f" a nonce each, minted in {bodies.seconds:.1f} s; --id-token-rate"
            f" {bench.options.id_token_rate:g}/s) cycling over the same accounts in one"
            " shuffled order: every measured request signs in an existing identity"
        )
        result, rss, record = await run_bodies_client(
            server.url("/graphql"),
            mutation=ID_TOKEN,
            warmup_bodies=bodies.files["warmup"],
            bodies=bodies.files["measured"],
            load=load,
            server_pid=server.pid,
            log_path=bench.logs / "id-token-client-strawgate.txt",
        )
        if server.process.returncode is not None:
            raise BenchError(f"{server.name} exited during the run:\n{server.log_tail()}")
    except BenchError as exc:
        relative.notes.append(f"strawgate: {exc}")
        relative.row = Row("strawgate", error=str(exc).splitlines()[0])
        return relative
    relative.row = load_row("strawgate", result, rss.peak_mib)
    fetches = {
        "discovery_before_load": first.discovery_fetches,
        "jwks_before_load": first.jwks_fetches,
        "discovery_during_load": provider.discovery_fetches - first.discovery_fetches,
        "jwks_during_load": provider.jwks_fetches - first.jwks_fetches,
    }
    relative.raw["strawgate"] = {
        **result.as_json(),
        "load": (
            f"bench/otp_client.py --mutation {ID_TOKEN}, {load.connections} users,"
            " one pre-made body (a fresh ID token) a request"
        ),
        "latency_of": "AuthSession answers, from request sent to answer",
        "ran_out": record.get("ran_out"),
        "bodies_seeded": record.get("pairs_seeded"),
        "bodies_used": record.get("pairs_used"),
        "warmup_bodies_seeded": record.get("warmup_pairs_seeded"),
        "warmup_bodies_used": record.get("warmup_pairs_used"),
        "warmup_ran_out": record.get("warmup_ran_out"),
        "rss_at_start_mib": rss.start_mib,
        "peak_rss_mib": rss.peak_mib,
    }
    relative.raw["seeding"] = {
        "distinct_accounts": users,
        "first_sign_ins_s": first.seconds,
        "minting_s": bodies.seconds,
        "counts": bodies.counts,
        "provider_fetches": fetches,
    }
    relative.notes.append(
        f"requests to the provider: discovery {fetches['discovery_before_load']}, JWKS"
        f" {fetches['jwks_before_load']} before the load (cache filled by the first"
        f" sign-ins); during the warm-up and the measured run: discovery"
        f" {fetches['discovery_during_load']}, JWKS {fetches['jwks_during_load']}"
    )
    passkey_ok = passkey.row.ok_rps if passkey is not None else None
    if passkey_ok:
        relative.notes.append(
            f"ok/s = {result.ok_rps / passkey_ok:.2f} x finishPasskeyLogin's"
            f" ({passkey_ok:,.1f} ok/s) in this run (reported only)"
        )
    others_n = sum(n for name, n in result.outcomes.items() if name != "ok")
    used = {key: int(record.get(key) or 0) for key in PAIR_COUNTS}
    relative.notes.append(
        f"answers: AuthSession {result.ok:,}, other {others_n:,}; p50/p99 are of the"
        f" AuthSession answers; bodies used: {used['pairs_used']:,} of"
        f" {used['pairs_seeded']:,} measured, {used['warmup_pairs_used']:,} of"
        f" {used['warmup_pairs_seeded']:,} in the warm-up"
    )
    if record.get("ran_out"):
        relative.notes.append(
            f"the measured bodies RAN OUT after {result.seconds:.1f} s of {load.duration:g} s:"
            " ok/s is over that shorter window; mint more (raise --id-token-rate)"
        )
    if record.get("warmup_ran_out"):
        relative.notes.append(
            "the warm-up's bodies ran out before the warm-up ended (raise --id-token-rate)"
        )
    relative.notes.extend(describe("strawgate", result))
    relative.notes.extend(ID_TOKEN_WORK)
    return relative


# What the rate limiter costs: the same server with counting off, on memory, on Redis.
LIMITER_STORES: tuple[tuple[str, dict[str, str]], ...] = (
    ("off", {"RATE_LIMITING": "false"}),
    ("memory", {}),
    ("redis", {"REDIS_URL": "redis://127.0.0.1:6379/0"}),
)


async def scenario_limiter(bench: Bench, seeds: Seeds) -> Reported:
    """me and login on a fresh server process per store, one after another in one run:
    ok/s with the limiter off, counting in memory, and counting in Redis."""
    reported = Reported(
        "limiter",
        "rate limiter cost: me and login with counting off, in memory and in Redis"
        " (a fresh server process each, one after another; login: 32 clients honouring"
        " retryAfter)",
        Row("strawgate"),
        beside="login",
    )
    figures: dict[str, dict[str, float]] = {}
    for store, extra in LIMITER_STORES:
        if store == "redis" and not redis_reachable():
            reported.notes.append("redis: not measured (no Redis at 127.0.0.1:6379)")
            continue
        env = {**bench.env, **extra, "REDIS_KEY_PREFIX": f"strawgate-bench-{secrets.token_hex(4)}"}
        progress(f"limiter cost: {store}")
        server = await start_server(
            f"strawgate-limiter-{store}",
            "graph.app:app",
            env=env,
            cwd=bench.work,
            log_dir=bench.logs,
            core=SERVER_CORE,
        )
        try:
            variant = dataclasses.replace(bench, strawgate=server)
            me, _rss = await measure(
                variant,
                server,
                "/graphql",
                name=f"me-limiter-{store}",
                script="me.lua",
                args=[ME_BODY, seeds.access_token],
            )
            scratch = new_scenario(f"login-limiter-{store}", "")
            login = await login_clients(variant, scratch)
        finally:
            await stop_server(server)
        figures[store] = {"me": me.ok_rps, "login": login.ok_rps or 0.0}
    reported.raw["ok_per_s"] = figures
    base = figures.get("off")
    for store, seen in figures.items():
        line = f"{store:>6}: me {seen['me']:,.0f} ok/s, login {seen['login']:,.1f} ok/s"
        if base and store != "off":
            line += (
                f" (x{seen['me'] / base['me']:.2f} and x{seen['login'] / base['login']:.2f}"
                " of counting off)"
            )
        reported.notes.append(line)
    if "memory" in figures:
        reported.row = Row("strawgate", ok_rps=figures["memory"]["login"])
    return reported


async def scenario_refresh(bench: Bench, seeds: Seeds) -> Scenario:
    scenario = new_scenario(
        "refresh",
        f"refresh mutation, {bench.options.sessions} sessions:"
        " every connection on its own token chain",
    )
    threads = str(bench.load.threads)

    def chains(name: str) -> list[str]:
        return [REFRESH_TEMPLATE, str(seeds.token_files[name]), threads]

    def side(label: str, server: Server, path: str) -> Side:
        rounds = [chains(f"{label}-round{i}") for i in range(1, bench.options.rounds + 1)]
        return Side(label, server, path, chains(f"{label}-warmup"), rounds)

    await interleaved(
        bench,
        scenario,
        "refresh.lua",
        side("strawgate", bench.strawgate, "/graphql"),
        side("reference", bench.reference, "/refresh"),
    )
    raw = scenario.raw.get("strawgate")
    if isinstance(raw, dict):
        outcomes = raw["outcomes"]
        scenario.raw["strawgate_failed_answers"] = sum(
            n for name, n in outcomes.items() if name != "ok"
        )
    return scenario


# -- profiling --------------------------------------------------------------------------------


async def profile_me(bench: Bench, seeds: Seeds) -> str:
    """A profile of Strawgate under the `me` load (not measured): pyinstrument if the venv
    has it, else py-spy attached to the running server. Returns what was done."""
    args = [ME_BODY, seeds.access_token]
    seconds = bench.load.duration
    if find_spec("pyinstrument") is not None:
        out = bench.results / "profile-me.html"
        server = await start_server(
            "strawgate-pyinstrument",
            "graph.app:app",
            env=bench.env,
            cwd=bench.work,
            log_dir=bench.logs,
            core=SERVER_CORE,
            launcher=[sys.executable, "-m", "pyinstrument", "-r", "html", "-o", str(out), "-m"],
        )
        try:
            await run_wrk(
                server.url("/graphql"),
                "me.lua",
                args,
                load=bench.load,
                seconds=seconds,
                log_path=bench.logs / "wrk-me-profile.txt",
            )
        finally:
            # uvicorn re-raises the signal once shut down: as KeyboardInterrupt, SIGINT
            # lets pyinstrument write its report; SIGTERM would end the process first.
            await stop_server(server, signal.SIGINT)
        written = out.exists() and out.stat().st_size > 0
        return f"pyinstrument profile: {out}" if written else "pyinstrument wrote no profile"
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return "profile skipped: neither pyinstrument (in this venv) nor py-spy is installed"
    out = bench.results / "profile-me.svg"
    record = asyncio.create_task(
        run_command(
            [
                py_spy,
                "record",
                "--pid",
                str(bench.strawgate.pid),
                "--duration",
                str(round(seconds)),
                "--output",
                str(out),
            ],
            env=bench.env,
            cwd=bench.work,
            time_limit=seconds + 60,
        )
    )
    await asyncio.sleep(0.5)  # let py-spy attach
    await run_wrk(
        bench.strawgate.url("/graphql"),
        "me.lua",
        args,
        load=bench.load,
        seconds=seconds,
        log_path=bench.logs / "wrk-me-profile.txt",
    )
    try:
        await record
    except BenchError as exc:
        return f"py-spy failed: {str(exc).splitlines()[-1]}"
    return f"py-spy profile: {out}"


# -- the run ----------------------------------------------------------------------------------


def git_commit() -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def server_env(
    pg_url: str, database: str, mailbox: SmtpSink, *, issuer: str | None = None
) -> dict[str, str]:
    """The servers' environment: production, fresh keys, the scratch database, mail to
    the bench's own SMTP server, every rate limit raised out of the way, passkeys on, and
    with `issuer`, the loopback OpenID Connect provider at that issuer as `acme`."""
    return {
        **os.environ,
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(36),  # 48 characters
        "ENCRYPTION_KEYS": Fernet.generate_key().decode("ascii"),
        "DATABASE_URL": with_database(pg_url, database, scheme="postgresql+asyncpg"),
        **{name.upper(): str(value) for name, value in mailbox.settings().items()},
        # The scenarios measure throughput, not the budgets: every limit is counted (its
        # cost is in the figures) but none binds. The limiter section compares with
        # counting off.
        **{f"RATE_LIMITS__{name.upper()}": "100000000/minute" for name in RateLimits.model_fields},
        # The seeded refresh chains and the login load are sessions of one user: the cap
        # on live sessions per user would end the ones measured (the cap's own cost, one
        # indexed SELECT per sign-in, is still paid).
        "MAX_SESSIONS_PER_USER": "10000",
        # Production refuses links in mails that lead back to this machine.
        "PRODUCT_URL": "https://auth.example.com",
        # Passkeys on (finishPasskeyLogin): the relying party the seeded passkeys are for.
        **server_settings(),
        # signInWithIdToken: the provider on loopback, plain HTTP allowed.
        **(id_token_settings(issuer) if issuer is not None else {}),
    }


async def run(options: Options) -> int:
    """The whole benchmark, with the identity provider (discovery and JWKS for
    signInWithIdToken) served on loopback from this process while it runs."""
    provider = LocalProvider().start()
    try:
        return await run_with(options, provider)
    finally:
        provider.stop()


async def run_with(options: Options, provider: LocalProvider) -> int:
    results = BENCH_DIR / "results"
    logs = results / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # logs and profiles are the latest run's
    logs.mkdir(parents=True)
    for stale in results.glob("profile-me.*"):
        stale.unlink()
    check_local(options.pg_url)
    database = f"strawgate_bench_{secrets.token_hex(4)}"
    mailbox = SmtpSink(port=free_port())  # started with the servers
    env = server_env(options.pg_url, database, mailbox, issuer=provider.issuer)
    load = options.load
    pg = urlsplit(options.pg_url)
    seeded_logins = len(chain_sets(options.rounds)) * options.sessions
    seeded_otp = sum(otp_sets(options).values())
    seeded_passkeys = sum(passkey_sets(options).values())
    id_tokens = sum(id_token_sets(options).values())
    budget = time_budget(options)
    started = datetime.now(UTC)
    has_taskset = shutil.which("taskset") is not None
    server_core = f"core {SERVER_CORE}" if has_taskset else "unpinned"
    load_core = f"core {LOAD_CORE}" if has_taskset else "unpinned"
    header = [
        f"Strawgate benchmark, {started:%Y-%m-%d %H:%M} UTC, commit {git_commit() or 'unknown'}",
        f"servers: uvicorn, 1 worker, {server_core};"
        f" load on {load_core}: wrk, {load.threads} threads, {load.connections} connections"
        f" (login: bench/login_client.py, {load.connections} users honouring retryAfter;"
        f" verifyOtp, finishPasskeyLogin, signInWithIdToken: bench/otp_client.py,"
        f" {load.connections} users)",
        f"me, refresh: {load.warmup:g} s warm-up of each side, then {options.rounds} rounds"
        f" of {round_seconds(options)} s per side, alternating which goes first;"
        f" login, verifyOtp, finishPasskeyLogin, signInWithIdToken: {load.duration:g} s after"
        f" {load.warmup:g} s warm-up",
        f"PostgreSQL {pg.hostname}:{pg.port or 5432}, scratch database {database};"
        f" reference app: bench/reference_app.py",
        f"identity provider (signInWithIdToken): tests/identity_provider.py LocalProvider at"
        f" {provider.issuer}, in this process",
    ]
    scenarios: list[Scenario] = []
    reported: list[Reported] = []
    relative: list[Relative] = []
    profile_note: str | None = None
    with tempfile.TemporaryDirectory(prefix="strawgate-bench-") as tmp:
        work = Path(tmp)  # the servers' cwd: no stray .env is read
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(budget):
                progress(f"creating database {database}")
                await create_database(options.pg_url, database)
                stack.push_async_callback(drop_database, options.pg_url, database)
                progress("migrating")
                await run_command(
                    [venv_tool("strawgate"), "migrate"], env=env, cwd=work, time_limit=120
                )
                progress("starting servers")
                mailbox.start()
                stack.callback(mailbox.stop)
                servers: dict[str, Server] = {}
                for name, app, extra in (
                    ("strawgate", "graph.app:app", []),
                    ("reference", "bench.reference_app:app", ["--app-dir", str(REPO_ROOT)]),
                ):
                    servers[name] = await start_server(
                        name, app, env=env, cwd=work, log_dir=logs, core=SERVER_CORE, extra=extra
                    )
                    stack.push_async_callback(stop_server, servers[name])
                bench = Bench(
                    options,
                    env,
                    work,
                    logs,
                    results,
                    servers["strawgate"],
                    servers["reference"],
                    mailbox,
                )
                progress(
                    f"seeding: signup, {seeded_logins} logins;"
                    f" {seeded_otp} two-factor users and {seeded_passkeys} passkey users in"
                    " the database"
                )
                seeds = await seed(bench)
                progress("scenario me")
                scenarios.append(await scenario_me(bench, seeds))
                progress("scenario login")
                scenarios.append(await scenario_login(bench))
                progress("scenario refresh")
                scenarios.append(await scenario_refresh(bench, seeds))
                progress("scenario verifyOtp (reported only)")
                login = next((s for s in scenarios if s.name == "login"), None)
                reported.append(await scenario_verify_otp(bench, seeds, login))
                progress("scenario finishPasskeyLogin")
                refresh = next((s for s in scenarios if s.name == "refresh"), None)
                passkey = await scenario_passkey(bench, seeds, login, refresh)
                relative.append(passkey)
                progress(
                    f"scenario signInWithIdToken ({options.id_token_users:,} accounts,"
                    f" {id_tokens:,} ID tokens)"
                )
                relative.append(await scenario_id_token(bench, provider, login, passkey))
                if bench.options.limiter:
                    progress("limiter cost (reported only)")
                    reported.append(await scenario_limiter(bench, seeds))
                if options.profile:
                    progress("profiling me")
                    try:
                        profile_note = await profile_me(bench, seeds)
                    except BenchError as exc:
                        profile_note = f"profile failed: {str(exc).splitlines()[0]}"
            progress("stopping servers, dropping the database")
    checks: list[Check] = [check for scenario in scenarios for check in checks_for(scenario)]
    checks.extend(check for r in relative for check in checks_for_relative(r))
    if profile_note:
        header.append(profile_note)
    print(format_report(header, scenarios, checks, reported, relative))
    record = {
        "started": started.isoformat(),
        "commit": git_commit(),
        "settings": {
            "duration_s": load.duration,
            "warmup_s": load.warmup,
            "rounds": options.rounds,
            "round_s": round_seconds(options),
            "connections": load.connections,
            "wrk_threads": load.threads,
            "sessions_per_chain_set": options.sessions,
            "otp_rate_per_s": options.otp_rate,
            "otp_users_seeded": otp_sets(options),
            "passkey_rate_per_s": options.passkey_rate,
            "passkey_sign_ins_prepared": passkey_sets(options),
            "id_token_rate_per_s": options.id_token_rate,
            "id_tokens_minted": id_token_sets(options),
            "id_token_accounts": options.id_token_users,
            "server_core": SERVER_CORE,
            "load_core": LOAD_CORE,
            "pinned": has_taskset,
        },
        "scenarios": {
            **{scenario.name: scenario_json(scenario) for scenario in scenarios},
            **{r.name: reported_json(r) for r in reported},
            **{r.name: relative_json(r) for r in relative},
        },
        "checks": [check.as_json() for check in checks],
        "passed": all(check.passed for check in checks),
        "profile": profile_note,
    }
    out = results / "latest.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults: {out.relative_to(REPO_ROOT)}; logs: {logs.relative_to(REPO_ROOT)}/")
    return 0 if record["passed"] else 1


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds per measured run; me and refresh share them out over the rounds",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of me and refresh (each side duration/rounds s a round)",
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--sessions",
        type=int,
        default=64,
        help="refresh-token chains per app's warm-up and per app's round",
    )
    parser.add_argument("--hash-samples", type=int, default=30, help="password verifies to time")
    parser.add_argument(
        "--otp-rate",
        type=float,
        default=2000.0,
        help="verifyOtp: two-factor users seeded per second of warm-up and of measured run",
    )
    parser.add_argument(
        "--passkey-rate",
        type=float,
        default=1000.0,
        help="finishPasskeyLogin: sign-ins prepared per second of warm-up and of measured run",
    )
    parser.add_argument(
        "--id-token-rate",
        type=float,
        default=1000.0,
        help="signInWithIdToken: ID tokens minted per second of warm-up and of measured run",
    )
    parser.add_argument(
        "--id-token-users",
        type=int,
        default=2000,
        help="signInWithIdToken: distinct provider accounts (each signed in once first)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile Strawgate under `me`")
    parser.add_argument(
        "--no-limiter",
        action="store_true",
        help="skip the rate limiter's cost (me and login with counting off, memory, Redis)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 s and --warmup not negative")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads < 1 or args.connections < args.threads:
        parser.error("need at least one wrk thread and one connection per thread")
    if args.sessions < args.connections:
        parser.error("--sessions must be at least --connections (one chain per connection)")
    if args.otp_rate <= 0 or args.passkey_rate <= 0 or args.id_token_rate <= 0:
        parser.error("--otp-rate, --passkey-rate and --id-token-rate must be positive")
    if args.id_token_users < 1:
        parser.error("--id-token-users must be at least 1")
    return Options(
        load=LoadSettings(
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            threads=args.threads,
            core=LOAD_CORE,
        ),
        rounds=args.rounds,
        sessions=args.sessions,
        hash_samples=max(1, args.hash_samples),
        otp_rate=args.otp_rate,
        passkey_rate=args.passkey_rate,
        id_token_rate=args.id_token_rate,
        id_token_users=args.id_token_users,
        profile=args.profile,
        pg_url=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        limiter=not args.no_limiter,
    )


def main(argv: list[str] | None = None) -> int:
    return run_main(
        run(parse_options(argv)), logs=BENCH_DIR / "results" / "logs", dropped="database dropped"
    )


if __name__ == "__main__":
    sys.exit(main())
