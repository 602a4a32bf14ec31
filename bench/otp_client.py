"""Single-use load: the measured load of the `verifyOtp`, `finishPasskeyLogin` and
`signInWithIdToken` scenarios, where every request spends something seeded for it and is
never sent twice.

- verifyOtp (two-factor login, step two; the default `--mutation`): every successful
  verifyOtp spends a challenge, and each user's TOTP time step is accepted once, so every
  request takes a (challenge token, TOTP secret) pair of its own, seeded by
  bench/otp_seed.py: files of "<challengeToken> <secret>" lines (`--warmup-pairs`,
  `--pairs`). The body is made at send time: the 6-digit code is computed from the secret
  then (pyotp), as it must be current.
- Any other mutation (`--mutation finishPasskeyLogin`): pre-made request bodies, one JSON
  document a line (`--warmup-bodies`, `--bodies`), each sent as it is, once; for
  finishPasskeyLogin, a ceremony of its own and the assertion signed for it
  (bench/passkey_seed.py); for `--mutation signInWithIdToken`, an ID token of its own
  (bench/id_token_seed.py).

In both cases the warm-up's and the measured run's sets are disjoint, and an answer
counts as a success when `data.<mutation>` is an AuthSession with both tokens.

`--users` concurrent users (32 by default), each on a keep-alive HTTP/1.1 connection of
its own (32 connections), spoken with asyncio streams rather than httpx: at this rate
httpx is what limits the load (one AsyncClient shared by 32 users spends its time in its
connection pool's per-request scan of every connection: ~100 verifyOtp/s with a p99 of
over a second on an idle server core; one AsyncClient a user, ~185/s; plain streams,
~245/s with the server's core busy). Each user loops: take the next unused pair (or
body), POST the mutation; an AuthSession (with both tokens) is a success, timed from the
request being sent to the answer being read; every answer is counted by kind: "ok", the
AuthErrorCode, "http_<status>", "graphql_error" or "transport_<Exception>" (the
connection is then opened anew). A pair or body is never sent twice, whatever the answer.

The load runs `--warmup` seconds on the warm-up set, unmeasured (a user whose set ran
out waits for the measured part), then `--duration` seconds measured on the measured
set, without a pause between them. The measured part ends early when its set runs out
(reported as "ran_out": seed more). The client prints "MEASURING" when the measured part
starts (the benchmark samples the server's RSS from then on) and "BENCH_RESULT {json}"
when it ends (its counts keep the names "pairs_*" for bodies too). Only answers that
arrive within the measured part are counted; requests still in flight at its end are
abandoned. The benchmark runs it pinned to the load core:

    taskset -c 1 python bench/otp_client.py --url http://127.0.0.1:8000/graphql \\
        --warmup-pairs otp-pairs-warmup.txt --pairs otp-pairs-measured.txt
    taskset -c 1 python bench/otp_client.py --url http://127.0.0.1:8000/graphql \\
        --mutation finishPasskeyLogin \\
        --warmup-bodies passkey-bodies-warmup.txt --bodies passkey-bodies-measured.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import pyotp

RESULT_MARKER = "BENCH_RESULT "
MEASURING_MARKER = "MEASURING"
TRANSPORT_ERROR_PAUSE = 0.1  # seconds before a user goes on after a transport error
REQUEST_TIMEOUT = 10.0  # seconds for one request, connecting included
MAX_SAMPLES = 3  # unexpected answer bodies kept for the report

VERIFY_OTP = (
    "mutation($i: VerifyOtpInput!){ verifyOtp(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code retryAfter } } }"
)

DEFAULT_MUTATION = "verifyOtp"

Pair = tuple[str, str]  # (challenge token, TOTP secret)
Item = TypeVar("Item")
# What a user sends for an item: the body, and a note kept with an unexpected answer.
Request = tuple[bytes, str]


def read_pairs(path: Path) -> list[Pair]:
    pairs: list[Pair] = []
    for line in path.read_text().splitlines():
        if line.strip():
            token, secret = line.split()
            pairs.append((token, secret))
    return pairs


def read_bodies(path: Path) -> list[bytes]:
    """Pre-made request bodies, one JSON document a line."""
    return [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]


def otp_request(pair: Pair) -> Request:
    """verifyOtp for a seeded pair, with the code current at send time."""
    token, secret = pair
    code = pyotp.TOTP(secret).now()
    body = json.dumps(
        {"query": VERIFY_OTP, "variables": {"i": {"challengeToken": token, "code": code}}}
    ).encode()
    return body, f"code {code}: "


def premade_request(body: bytes) -> Request:
    return body, ""


@dataclass
class Tally:
    """What the users saw; only answers in the measured window are counted."""

    measuring: bool = False
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)  # seconds
    samples: list[str] = field(default_factory=list)  # unexpected answers' bodies

    def count(self, outcome: str, body: str | None = None) -> None:
        if not self.measuring:
            return
        self.outcomes[outcome] += 1
        if outcome != "ok" and body is not None and len(self.samples) < MAX_SAMPLES:
            self.samples.append(body[:500])


class Pairs(Generic[Item]):
    """The warm-up's pairs (or bodies) until the measured part starts, then the measured
    ones; each handed out once."""

    def __init__(self, warmup: list[Item], measured: list[Item]) -> None:
        self._warmup: Iterator[Item] = iter(warmup)
        self._measured: Iterator[Item] = iter(measured)
        self.measuring = asyncio.Event()
        self.warmup_total = len(warmup)
        self.measured_total = len(measured)
        self.warmup_used = 0
        self.measured_used = 0
        self.warmup_ran_out = False

    async def take(self) -> Item | None:
        """The next unused pair; None once the measured ones are all taken."""
        if not self.measuring.is_set():
            pair = next(self._warmup, None)
            if pair is not None:
                self.warmup_used += 1
                return pair
            self.warmup_ran_out = True
            await self.measuring.wait()
        pair = next(self._measured, None)
        if pair is not None:
            self.measured_used += 1
        return pair


def classify(status: int, body: bytes, mutation: str = DEFAULT_MUTATION) -> str:
    if status != 200:
        return f"http_{status}"
    try:
        answer = json.loads(body)["data"][mutation]
        typename = answer["__typename"]
    except (ValueError, KeyError, TypeError):
        return "graphql_error"
    if typename == "AuthSession":
        if answer.get("accessToken") and answer.get("refreshToken"):
            return "ok"
        return "session_without_tokens"
    return str(answer.get("code") or typename)


class TransportError(Exception):
    """The connection failed or the answer was not HTTP/1.1 as expected."""


@dataclass
class Answer:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Connection:
    """One keep-alive HTTP/1.1 connection to `url`, opened on first use and again after
    an error or a "Connection: close"; one request at a time."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"an http:// URL is needed, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post_json(self, body: bytes) -> Answer:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(body)
        except (
            OSError,
            EOFError,
            ValueError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            self.close()
            raise TransportError(repr(exc)) from exc
        except BaseException:
            self.close()
            raise

    async def _exchange(self, body: bytes) -> Answer:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            content = await _read_chunked(reader)
        elif "content-length" in headers:
            content = await reader.readexactly(int(headers["content-length"]))
        else:
            raise ValueError("an answer with neither Content-Length nor chunks")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(int(status), content)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent: the closing CRLF
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def user(
    url: str,
    pairs: Pairs[Item],
    tally: Tally,
    request: Callable[[Item], Request],
    mutation: str,
) -> None:
    connection = Connection(url)
    try:
        while (item := await pairs.take()) is not None:
            body, note = request(item)
            sent = time.perf_counter()
            try:
                answer = await connection.post_json(body)
            except TransportError as exc:
                cause = exc.__cause__
                tally.count(f"transport_{type(cause).__name__}", str(exc))
                await asyncio.sleep(TRANSPORT_ERROR_PAUSE)
                continue
            elapsed = time.perf_counter() - sent
            outcome = classify(answer.status, answer.body, mutation)
            if outcome == "ok":
                if tally.measuring:
                    tally.ok_latencies.append(elapsed)
                tally.count(outcome)
            else:
                tally.count(outcome, note + answer.text)
    finally:
        connection.close()


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank, as bench/hash_probe.py takes it."""
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run(
    url: str,
    pairs: Pairs[Item],
    users: int,
    warmup: float,
    duration: float,
    *,
    request: Callable[[Item], Request],
    mutation: str = DEFAULT_MUTATION,
) -> dict[str, Any]:
    tally = Tally()
    tasks = [asyncio.create_task(user(url, pairs, tally, request, mutation)) for _ in range(users)]
    try:
        await asyncio.sleep(warmup)
        print(MEASURING_MARKER, flush=True)
        tally.measuring = True
        pairs.measuring.set()
        started = time.perf_counter()
        # The users end by themselves when the measured pairs run out.
        done, pending = await asyncio.wait(tasks, timeout=duration)
        tally.measuring = False
        seconds = time.perf_counter() - started
        for task in done:  # a user ends early only when the pairs run out
            if (exc := task.exception()) is not None:
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(tally.ok_latencies)
    ok = tally.outcomes["ok"]
    return {
        "mutation": mutation,
        "users": users,
        "requests": sum(tally.outcomes.values()),
        "seconds": seconds,
        "ok": ok,
        "ok_per_s": ok / seconds if seconds else 0.0,
        "p50_ms": 1000 * percentile(ordered, 0.5) if ordered else None,
        "p99_ms": 1000 * percentile(ordered, 0.99) if ordered else None,
        "mean_ms": 1000 * statistics.fmean(ordered) if ordered else None,
        "max_ms": 1000 * ordered[-1] if ordered else None,
        "ran_out": not pending,
        "pairs_seeded": pairs.measured_total,
        "pairs_used": pairs.measured_used,
        "warmup_pairs_seeded": pairs.warmup_total,
        "warmup_pairs_used": pairs.warmup_used,
        "warmup_ran_out": pairs.warmup_ran_out,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "samples": tally.samples,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.bodies is not None:
        bodies = Pairs(read_bodies(args.warmup_bodies), read_bodies(args.bodies))
        return await run(
            args.url,
            bodies,
            args.users,
            args.warmup,
            args.duration,
            request=premade_request,
            mutation=args.mutation,
        )
    pairs = Pairs(read_pairs(args.warmup_pairs), read_pairs(args.pairs))
    return await run(args.url, pairs, args.users, args.warmup, args.duration, request=otp_request)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the GraphQL endpoint")
    parser.add_argument(
        "--mutation",
        default=DEFAULT_MUTATION,
        help="the mutation whose answer is checked (verifyOtp: bodies made from pairs)",
    )
    parser.add_argument("--warmup-pairs", type=Path, help="verifyOtp: the warm-up's pairs")
    parser.add_argument("--pairs", type=Path, help="verifyOtp: the measured run's pairs")
    parser.add_argument("--warmup-bodies", type=Path, help="the warm-up's bodies, one a line")
    parser.add_argument("--bodies", type=Path, help="the measured run's bodies, one a line")
    parser.add_argument("--users", type=int, default=32, help="concurrent users (connections)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    args = parser.parse_args()
    if args.users < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need at least one user, a positive --duration and --warmup >= 0")
    if args.mutation == DEFAULT_MUTATION:
        if args.pairs is None or args.warmup_pairs is None or args.bodies is not None:
            parser.error("verifyOtp needs --warmup-pairs and --pairs (and no bodies)")
    elif args.bodies is None or args.warmup_bodies is None or args.pairs is not None:
        parser.error(f"{args.mutation} needs --warmup-bodies and --bodies (and no pairs)")
    result = asyncio.run(main_async(args))
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
