"""Login load from clients that honour retryAfter: the `login` scenario's measured load.

`--users` concurrent users (32 by default) share one httpx.AsyncClient with a limit of as
many connections (HTTP/1.1 keep-alive). Each user loops: POST the login mutation; an
AuthSession is a success, timed from the request being sent to the answer being read; a
RATE_LIMITED AuthError makes the user sleep its `retryAfter` seconds (1 when absent) before
the next try; every answer is counted by kind: "ok", the AuthErrorCode, "http_<status>",
"graphql_error" or "transport_<Exception>".

The load runs `--warmup` seconds, unmeasured, then `--duration` seconds measured, without
a pause between them. The client prints "MEASURING" when the measured part starts (the
benchmark samples the server's RSS from then on) and "BENCH_RESULT {json}" when it ends.
Only answers that arrive within the measured part are counted; requests still in flight
at its end are abandoned. The benchmark runs it pinned to the load core:

    taskset -c 1 python bench/login_client.py --url http://127.0.0.1:8000/graphql \\
        --body '{"query": "mutation($i: LoginInput!){ login(input:$i){ ... } }", ...}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

RESULT_MARKER = "BENCH_RESULT "
MEASURING_MARKER = "MEASURING"
DEFAULT_RETRY_AFTER = 1.0  # seconds, when a RATE_LIMITED answer carries no retryAfter
TRANSPORT_ERROR_PAUSE = 0.1  # seconds before a user tries again after a transport error
MAX_SAMPLES = 3  # unexpected answer bodies kept for the report


@dataclass
class Tally:
    """What the users saw; only answers in the measured window are counted."""

    measuring: bool = False
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)  # seconds
    retry_sleeps: float = 0.0  # seconds slept on retryAfter, summed over users
    missing_retry_after: int = 0  # RATE_LIMITED answers without a retryAfter
    samples: list[str] = field(default_factory=list)  # unexpected answers' bodies

    def count(self, outcome: str, body: str | None = None) -> None:
        if not self.measuring:
            return
        self.outcomes[outcome] += 1
        expected = outcome in ("ok", "RATE_LIMITED")
        if not expected and body is not None and len(self.samples) < MAX_SAMPLES:
            self.samples.append(body[:500])


def classify(status: int, body: bytes) -> tuple[str, float | None]:
    """(outcome, seconds to wait before the next try or None) of one answer. A RATE_LIMITED
    answer without a usable retryAfter gives a wait of None: the caller waits 1 s."""
    if status != 200:
        return f"http_{status}", None
    try:
        login = json.loads(body)["data"]["login"]
        typename = login["__typename"]
    except (ValueError, KeyError, TypeError):
        return "graphql_error", None
    if typename == "AuthSession":
        return "ok", None
    code = str(login.get("code") or typename)
    if code != "RATE_LIMITED":
        return code, None
    retry_after = login.get("retryAfter")
    if isinstance(retry_after, int | float) and retry_after >= 0:
        return code, float(retry_after)
    return code, None


async def user(client: httpx.AsyncClient, url: str, body: bytes, tally: Tally) -> None:
    headers = {"Content-Type": "application/json"}
    while True:
        sent = time.perf_counter()
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            tally.count(f"transport_{type(exc).__name__}", repr(exc))
            await asyncio.sleep(TRANSPORT_ERROR_PAUSE)
            continue
        elapsed = time.perf_counter() - sent
        outcome, wait = classify(response.status_code, response.content)
        if outcome == "ok":
            if tally.measuring:
                tally.ok_latencies.append(elapsed)
            tally.count(outcome)
        else:
            tally.count(outcome, response.text)
        if outcome == "RATE_LIMITED" and wait is None:
            wait = DEFAULT_RETRY_AFTER
            if tally.measuring:
                tally.missing_retry_after += 1
        if wait is not None:
            if tally.measuring:
                tally.retry_sleeps += wait
            await asyncio.sleep(wait)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank, as bench/hash_probe.py takes it."""
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run(url: str, body: bytes, users: int, warmup: float, duration: float) -> dict[str, Any]:
    tally = Tally()
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
        tasks = [asyncio.create_task(user(client, url, body, tally)) for _ in range(users)]
        try:
            await asyncio.sleep(warmup)
            print(MEASURING_MARKER, flush=True)
            tally.measuring = True
            started = time.perf_counter()
            await asyncio.sleep(duration)
            tally.measuring = False
            seconds = time.perf_counter() - started
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(tally.ok_latencies)
    ok = tally.outcomes["ok"]
    return {
        "users": users,
        "requests": sum(tally.outcomes.values()),
        "seconds": seconds,
        "ok": ok,
        "ok_per_s": ok / seconds,
        "p50_ms": 1000 * percentile(ordered, 0.5) if ordered else None,
        "p99_ms": 1000 * percentile(ordered, 0.99) if ordered else None,
        "mean_ms": 1000 * statistics.fmean(ordered) if ordered else None,
        "max_ms": 1000 * ordered[-1] if ordered else None,
        "retry_sleep_s": tally.retry_sleeps,
        "rate_limited_without_retry_after": tally.missing_retry_after,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "samples": tally.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the GraphQL endpoint")
    parser.add_argument("--body", required=True, help="the login request's JSON body")
    parser.add_argument("--users", type=int, default=32, help="concurrent users (connections)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    args = parser.parse_args()
    if args.users < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need at least one user, a positive --duration and --warmup >= 0")
    result = asyncio.run(run(args.url, args.body.encode(), args.users, args.warmup, args.duration))
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
