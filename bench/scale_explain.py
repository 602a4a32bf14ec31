"""EXPLAIN ANALYZE of the request path's statements, as the server runs them, on one or
more databases side by side (a seeded one and an empty one, say): does any of them cost
more as the data grows?

    .venv/bin/python -m bench.scale_explain URL [URL ...]

Each statement is the server's own (the module constants of db/services/*, compiled
exactly as Statements compiles them) with parameters picked from the database: a live
session and its user, the session's newest refresh token, a pending challenge, a
two-factor user. Writes run too (EXPLAIN ANALYZE executes them), each in a transaction
that is rolled back. Every statement is timed `--repeat` times after one unmeasured
run; the median execution time is printed with the buffers it touched, and any
sequential scan in its plan is named (on a big table, that is the query that grows).
bench/scale.py runs this on both of its databases and keeps the result.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql import Executable

from bench.harness import asyncpg_dsn
from db.services import challenges, device_trust, events, lockout, mfa, sessions
from db.services.signin import conclusion, password, signup
from db.session import Statements

Sample = dict[str, Any]
Params = Callable[[Sample], Mapping[str, Any]]


@dataclass(frozen=True)
class Probe:
    operation: str  # the request it belongs to
    name: str
    statement: Executable
    params: Params


def _now(_s: Sample) -> datetime:
    return datetime.now(UTC)


# What each operation runs (db/services/sessions.py, db/services/signin/ and the modules
# they call), in order.
PROBES: tuple[Probe, ...] = (
    Probe(
        "me",
        "sessions._CURRENT_USER",
        sessions._CURRENT_USER,
        lambda s: {"sid": s["session_id"], "uid": s["user_id"], "now": _now(s)},
    ),
    Probe(
        "refresh",
        "sessions._ROTATION_STATE",
        sessions._ROTATION_STATE,
        lambda s: {"digest": s["digest"]},
    ),
    Probe(
        "refresh",
        "sessions._NEWEST_GENERATION",
        sessions._NEWEST_GENERATION,
        lambda s: {"session_id": s["session_id"]},
    ),
    Probe(
        "refresh",
        "sessions._MARK_ROTATED",
        sessions._MARK_ROTATED,
        lambda s: {"token_id": s["token_id"], "now": _now(s)},
    ),
    Probe(
        "refresh",
        "sessions._ADD_GENERATION",
        sessions._ADD_GENERATION,
        lambda s: {
            "session_id": s["session_id"],
            "generation": s["generation"] + 1,
            "token_hash": hashlib.sha256(uuid.uuid4().bytes).digest(),
            "now": _now(s),
        },
    ),
    Probe(
        "refresh",
        "sessions._TOUCH_SESSION",
        sessions._TOUCH_SESSION,
        lambda s: {
            "session_id": s["session_id"],
            "now": _now(s),
            "expires_at": _now(s) + timedelta(days=14),
        },
    ),
    Probe(
        "login", "password._USER_BY_EMAIL", password._USER_BY_EMAIL, lambda s: {"email": s["email"]}
    ),
    Probe("login", "lockout._LOCK_ROW", lockout._LOCK_ROW, lambda s: {"address": s["email"]}),
    Probe("login", "sessions._SHARE_USER", sessions._SHARE_USER, lambda s: {"uid": s["user_id"]}),
    Probe(
        "login",
        "sessions._SESSION_CONTEXT",
        sessions._SESSION_CONTEXT,
        lambda s: {
            "uid": s["user_id"],
            "network": s["network"],
            "device": s["device"],
            "since": _now(s) - timedelta(days=90),
            "now": _now(s),
        },
    ),
    Probe(
        "login",
        "device_trust._KNOWN_NETWORK",
        device_trust._KNOWN_NETWORK,
        lambda s: {
            "uid": s["user_id"],
            "network": s["network"],
            "since": _now(s) - timedelta(days=90),
        },
    ),
    Probe(
        "login",
        "sessions._ADD_SESSION",
        sessions._ADD_SESSION,
        lambda s: {
            "session_id": uuid.uuid4(),
            "user_id": s["user_id"],
            "now": _now(s),
            "expires_at": _now(s) + timedelta(days=14),
            "absolute_expires_at": _now(s) + timedelta(days=30),
            "user_agent": "bench",
            "ip": "192.0.2.1",
            "amr": "pwd",
            "device": s["device"],
            "network": s["network"],
        },
    ),
    Probe(
        "login",
        "sessions._SESSIONS_OVER_CAP",
        sessions._SESSIONS_OVER_CAP,
        lambda s: {"uid": s["user_id"], "new_id": s["session_id"], "now": _now(s), "keep": 49},
    ),
    Probe(
        "login",
        "events._RECORD",
        events._RECORD,
        lambda s: {
            "at": _now(s),
            "kind": "LOGIN_SUCCEEDED",
            "user_id": s["user_id"],
            "session_id": s["session_id"],
            "ip": "192.0.2.1",
            "user_agent": "bench",
            "email": None,
            "details": None,
        },
    ),
    Probe("login", "lockout._CLEAR", lockout._CLEAR, lambda s: {"address": s["email"]}),
    Probe(
        "verifyOtp",
        "challenges.TAKE_FOR_VERIFY_OTP",
        challenges.TAKE_FOR_VERIFY_OTP,
        lambda s: {"digest": s["challenge_digest"], "now": _now(s)},
    ),
    Probe("verifyOtp", "mfa._CREDENTIAL", mfa._CREDENTIAL, lambda s: {"uid": s["totp_user_id"]}),
    Probe(
        "verifyOtp",
        "mfa._ACCEPT_STEP",
        mfa._ACCEPT_STEP,
        lambda s: {"uid": s["totp_user_id"], "sealed": s["totp_sealed"], "step": 2**40},
    ),
    Probe(
        "verifyOtp",
        "challenges.CONSUME",
        challenges.CONSUME,
        lambda s: {"challenge_id": s["challenge_id"], "now": _now(s)},
    ),
    Probe(
        "verifyOtp",
        "conclusion.USER_BY_ID",
        conclusion.USER_BY_ID,
        lambda s: {"user_id": s["user_id"]},
    ),
    Probe(
        "signup", "signup.ADDRESS_HOLDER", signup.ADDRESS_HOLDER, lambda s: {"email": s["email"]}
    ),
)


async def pick_sample(conn: asyncpg.Connection) -> Sample:
    """A live session (the first one at or after a fixed point of the id space), its user
    and newest token; the newest unused challenge (live or not: the look-up is the same);
    a two-factor user."""
    point = uuid.UUID(hashlib.md5(b"scale_explain").hexdigest())  # noqa: S324 - a fixed point
    session = await conn.fetchrow(
        "SELECT s.id, s.user_id, s.network, s.device, u.email_normalized FROM sessions s"
        " JOIN users u ON u.id = s.user_id WHERE s.revoked_at IS NULL AND s.expires_at > now()"
        " AND s.id >= $1 ORDER BY s.id LIMIT 1",
        point,
    ) or await conn.fetchrow(
        "SELECT s.id, s.user_id, s.network, s.device, u.email_normalized FROM sessions s"
        " JOIN users u ON u.id = s.user_id WHERE s.revoked_at IS NULL AND s.expires_at > now()"
        " ORDER BY s.id LIMIT 1"
    )
    if session is None:
        raise SystemExit("no live session in the database: nothing to explain")
    token = await conn.fetchrow(
        "SELECT id, token_hash, generation FROM refresh_tokens WHERE session_id = $1"
        " ORDER BY generation DESC LIMIT 1",
        session["id"],
    )
    challenge = await conn.fetchrow(
        "SELECT id, token_hash FROM challenges WHERE consumed_at IS NULL"
        " ORDER BY expires_at DESC LIMIT 1"
    )
    totp = await conn.fetchrow(
        "SELECT user_id, secret_sealed FROM totp_credentials ORDER BY user_id LIMIT 1"
    )
    if token is None or challenge is None or totp is None:
        raise SystemExit("the database needs a refresh token, a challenge and a TOTP user")
    return {
        "session_id": session["id"],
        "user_id": session["user_id"],
        "network": session["network"],
        "device": session["device"],
        "email": session["email_normalized"],
        "token_id": token["id"],
        "digest": token["token_hash"],
        "generation": token["generation"],
        "challenge_id": challenge["id"],
        "challenge_digest": challenge["token_hash"],
        "totp_user_id": totp["user_id"],
        "totp_sealed": totp["secret_sealed"],
    }


@dataclass
class Explained:
    operation: str
    name: str
    ms: float  # median execution time
    buffers: int  # shared buffers hit + read, one execution
    read: int  # of which read from outside shared buffers
    seq_scans: list[str] = field(default_factory=list)  # relations scanned sequentially
    nodes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "statement": self.name,
            "median_ms": round(self.ms, 4),
            "shared_buffers": self.buffers,
            "read": self.read,
            "seq_scans": self.seq_scans,
            "nodes": self.nodes,
        }


def _walk(plan: Mapping[str, Any], nodes: list[str], seq: list[str]) -> None:
    kind = str(plan.get("Node Type"))
    relation = plan.get("Relation Name")
    nodes.append(f"{kind} on {relation}" if relation else kind)
    if kind == "Seq Scan" and relation:
        seq.append(str(relation))
    for child in plan.get("Plans", []):
        _walk(child, nodes, seq)


async def explain(database_url: str, *, repeat: int = 5) -> list[Explained]:
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    compiler = Statements(engine)  # compiles only: its pool is never opened
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=30)
    found: list[Explained] = []
    try:
        sample = await pick_sample(conn)
        for probe in PROBES:
            sql, args = compiler.bind(probe.statement, probe.params(sample))
            times: list[float] = []
            plan: Mapping[str, Any] = {}
            for _ in range(repeat + 1):
                tx = conn.transaction()
                await tx.start()
                try:
                    raw = await conn.fetchval(
                        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args
                    )
                finally:
                    await tx.rollback()
                document = json.loads(raw) if isinstance(raw, str) else raw
                plan = document[0]
                times.append(float(plan["Execution Time"]))
            top = plan["Plan"]
            nodes: list[str] = []
            seq: list[str] = []
            _walk(top, nodes, seq)
            hit = int(top.get("Shared Hit Blocks", 0))
            read = int(top.get("Shared Read Blocks", 0))
            found.append(
                Explained(
                    probe.operation,
                    probe.name,
                    statistics.median(times[1:]),
                    hit + read,
                    read,
                    seq,
                    nodes,
                )
            )
    finally:
        await conn.close()
        await engine.dispose()
    return found


def format_table(labels: list[str], results: list[list[Explained]]) -> str:
    head = f"  {'operation':<10}{'statement':<34}" + "".join(
        f"{label + ' ms':>14}{'buffers':>9}" for label in labels
    )
    lines = [head]
    for row in zip(*results, strict=True):
        first = row[0]
        cells = "".join(f"{r.ms:>14.3f}{r.buffers:>9}" for r in row)
        seq = sorted({name for r in row for name in r.seq_scans})
        note = f"  SEQ SCAN: {', '.join(seq)}" if seq else ""
        lines.append(f"  {first.operation:<10}{first.name:<34}{cells}{note}")
    return "\n".join(lines)


async def _main(urls: list[str], repeat: int) -> None:
    results = [await explain(url, repeat=repeat) for url in urls]
    labels = [url.rsplit("/", 1)[-1][-12:] for url in urls]
    print(format_table(labels, results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale_explain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("urls", nargs="+", help="PostgreSQL URLs (postgresql://...)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.urls, max(1, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
