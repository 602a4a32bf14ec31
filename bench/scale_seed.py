"""A database at scale, written straight into PostgreSQL: by default 1 million users and
5 million sessions (with two refresh-token generations each), 5 security events per user,
challenges, outbox mail, sign-in throttles, two-factor credentials and recovery codes;
plus a housekeeping backlog (1 million sessions ended long ago, 1 million challenges
expired long ago, old events and mail, abandoned signups, quiet throttles).

    .venv/bin/python -m bench.scale_seed postgresql://postgres@127.0.0.1:5432/mydb
    .venv/bin/python -m bench.scale_seed URL --users 100000 --jobs 2

The database must be migrated (`strawgate migrate`) and its tables empty. Every row is
made by PostgreSQL itself (`INSERT ... SELECT ... FROM generate_series(...)`, one
statement per chunk of rows, `--jobs` connections at a time), shaped like the rows the
server writes (db/models.py, the migrations up to head): ids, timestamps in the past
relative to now, token digests (SHA-256), device families and networks, amr values,
revoke reasons, templates. Password hashes are a handful of real argon2id hashes made
with the server's own PasswordHasher (user i has the password SEED_PASSWORDS[i % 4],
users with i % 20 == 7 have none), not one per user. The constraints and indexes are
dropped before loading and rebuilt afterwards from their own definitions (what a bulk
load does; the result is the migrated schema, every foreign key validated), then
everything is VACUUM ANALYZEd.

Which rows are which (N users; `i`, `s`, ... are the generator's row numbers):

- users: N; 2% unverified (i % 50 == 0, created 0..13 days ago: those older than 7 days
  and without a session are abandoned signups, pruned), 0.2% disabled, 5% without a
  password, 5% with two-factor on (i % 20 == 1: a TOTP credential and 10 recovery codes).
- sessions: 6 per verified user on average (6N), in six kinds by s % 6: live (3 of 6),
  revoked within the retention, expired within the retention, and the backlog (s % 6 == 0:
  ended 31 to 90 days ago, past the 30-day session retention). So 5N are kept and N are
  the backlog. Each has 2 refresh-token generations (the first rotated).
- security_events: 5N, one every few seconds over the last 400 days (those older than
  365 days, about 9%, are the backlog).
- challenges: N expired 2 to 30 days ago (the backlog: retention 1 day), N/10 expired
  within the last day, N/100 live; purposes and methods as the server makes them.
- outbox: N mails over the last 12 days, sent (98%) or given up; those older than the
  7-day retention (about 5/12) are the backlog; 1% still hold sealed secrets, expired.
- login_throttles: N/20 password, code and per-account keys, half quiet for days (pruned).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.harness import asyncpg_dsn
from db.devices import device_family
from db.security.passwords import PasswordHasher

SEED_PASSWORDS = tuple(f"scale seed password {k}" for k in range(4))
RECOVERY_CODE = "seeded-recovery-code"

# The tables loaded, in the order their rows are made (no foreign keys while loading).
TABLES = (
    "users",
    "totp_credentials",
    "recovery_codes",
    "sessions",
    "refresh_tokens",
    "security_events",
    "challenges",
    "outbox",
    "login_throttles",
)
CHUNK_ROWS = 500_000  # generator rows per INSERT statement
BIGGEST_FIRST = ("refresh_tokens", "sessions", "security_events", "challenges", "outbox", "users")

USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML,"
    " like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
)
DEVICES = tuple(device_family(agent) for agent in USER_AGENTS)


@dataclass(frozen=True)
class Shape:
    """How many rows of each kind, for `users` users."""

    users: int

    @property
    def sessions(self) -> int:  # 5 kept per user and 1 of the backlog
        return 6 * self.users

    @property
    def events(self) -> int:
        return 5 * self.users

    @property
    def challenges(self) -> int:
        return self.users + self.users // 10 + max(1, self.users // 100)

    @property
    def outbox(self) -> int:
        return self.users

    @property
    def throttles(self) -> int:
        return max(1, self.users // 20)


@dataclass
class SeedReport:
    users: int
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows after seeding
    backlog: dict[str, int] = field(default_factory=dict)  # what housekeeping may remove
    database_bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "seconds": round(self.seconds, 1),
            "steps_s": {name: round(s, 1) for name, s in self.steps.items()},
            "rows": self.rows,
            "backlog": self.backlog,
            "database_bytes": self.database_bytes,
        }


# -- the generators -------------------------------------------------------------------------
# $1 now, $2 and $3 the chunk's first and last row number, $4 the number of users; users
# are md5('user:' || i)::uuid and sessions md5('session:' || s)::uuid, so that rows can
# name each other without a join. h(x) below are cheap deterministic scatterings.

# (Spans in seconds: 86400 a day.)

_USERS = """
INSERT INTO users (id, email, email_normalized, password_hash, password_changed_at,
                   is_active, email_verified_at, created_at, updated_at, device_epoch)
SELECT md5('user:' || i)::uuid, x.email, x.email,
       CASE WHEN i % 20 = 7 THEN NULL ELSE ($5::text[])[1 + i % cardinality($5::text[])] END,
       CASE WHEN i % 10 = 3 THEN x.created + interval '3 days' END,
       i % 500 <> 11,
       CASE WHEN i % 50 = 0 THEN NULL ELSE x.created + interval '5 minutes' END,
       x.created, x.created, (i % 7 = 0)::int
FROM generate_series($2::bigint, $3::bigint) AS i
CROSS JOIN LATERAL (SELECT
    'user' || i || '@example.com' AS email,
    CASE WHEN i % 50 = 0
         THEN $1::timestamptz - ((i / 50) % 14) * interval '1 day' - interval '1 hour'
         ELSE $1::timestamptz - interval '130 days'
              - ((i * 2654435761) % 60480000) * interval '1 second'
    END AS created) AS x
WHERE $4::bigint > 0
"""

# Two-factor users: i % 20 == 1 (never an unverified one: i % 50 == 0 excludes none of
# them, as 20 and 50 share 10 only for i % 10 == 0).
_TOTP = """
INSERT INTO totp_credentials (user_id, secret_sealed, confirmed_at, last_step, created_at)
SELECT md5('user:' || i)::uuid, 'seeded: not a sealed secret, never decrypted',
       $1::timestamptz - interval '100 days', 56000000 + i % 100000,
       $1::timestamptz - interval '100 days'
FROM generate_series($2::bigint, $3::bigint) AS i
WHERE i % 20 = 1 AND $4::bigint > 0
"""

_RECOVERY = """
INSERT INTO recovery_codes (user_id, lookup, code_hash, used_at, created_at)
SELECT md5('user:' || i)::uuid, ((i * 10 + j) * 40503) % 65536, $5::text,
       CASE WHEN j < 2 THEN $1::timestamptz - interval '20 days' END,
       $1::timestamptz - interval '100 days'
FROM generate_series($2::bigint, $3::bigint) AS i, generate_series(0, 9) AS j
WHERE i % 20 = 1 AND $4::bigint > 0
"""

# Sessions and their two generations in one statement. Kinds by s % 6: 1, 2, 5 live;
# 3 revoked within the retention; 4 expired (idle) within it; 0 the backlog, ended 31 to
# 90 days ago (half revoked, half expired). The user: a verified one, scattered.
_SESSIONS = """
WITH made AS (
  SELECT s, k, u, ended, revoked,
         CASE WHEN k IN (1, 2, 5) THEN live_created
              WHEN revoked THEN ended - h2 * interval '1 second'
              ELSE ended - interval '14 days' - h2 * interval '1 second' END AS created,
         CASE WHEN k IN (1, 2, 5) THEN greatest(live_created, $1::timestamptz
                                               - (h2 % 1123200) * interval '1 second')
              WHEN revoked THEN ended - (h2 % 3600) * interval '1 second'
              ELSE ended - interval '14 days' END AS last_used
  FROM generate_series($2::bigint, $3::bigint) AS s
  CROSS JOIN LATERAL (SELECT s % 6 AS k,
                             (s * 2654435761) % 2505600 AS h1,
                             (s * 40503 + 7) % 864000 AS h2,
                             (s * 2654435761) % 5097600 AS hb,
                             1 + (s * 48271) % $4::bigint AS u0) AS h
  CROSS JOIN LATERAL (SELECT
      CASE WHEN u0 % 50 = 0 THEN u0 - 1 ELSE u0 END AS u,
      $1::timestamptz - h1 * interval '1 second' AS live_created,
      CASE WHEN k = 0 THEN $1::timestamptz - interval '31 days' - hb * interval '1 second'
           ELSE $1::timestamptz - h1 * interval '1 second' END AS ended,
      k = 3 OR (k = 0 AND s % 12 = 0) AS revoked) AS e
), ins AS (
  INSERT INTO sessions (id, user_id, created_at, last_used_at, expires_at,
                        absolute_expires_at, auth_time, revoked_at, revoke_reason,
                        user_agent, ip, amr, device, network)
  SELECT md5('session:' || s)::uuid, md5('user:' || u)::uuid, created, last_used,
         CASE WHEN k IN (1, 2, 5) OR revoked
              THEN least(last_used + interval '14 days', created + interval '30 days')
              ELSE ended END,
         created + interval '30 days', created,
         CASE WHEN revoked THEN ended END,
         CASE WHEN revoked THEN (ARRAY['logout', 'session_limit', 'revoked_by_user',
                                       'refresh_token_reused'])[1 + (s / 6) % 4] END,
         ($5::text[])[1 + (u + s % 2) % 6],
         n.a || '.' || n.b || '.' || n.c || '.' || (1 + s % 250),
         CASE WHEN u % 20 = 1 THEN 'pwd otp' WHEN u % 20 = 7 THEN 'email' ELSE 'pwd' END,
         ($6::text[])[1 + (u + s % 2) % 6],
         n.a || '.' || n.b || '.' || n.c || '.0/24'
  FROM made
  CROSS JOIN LATERAL (SELECT 20 + (u * 7 + s % 3) % 200 AS a, (u * 13) % 256 AS b,
                             (u * 17 + s % 3) % 256 AS c) AS n
  RETURNING id, created_at, last_used_at
)
INSERT INTO refresh_tokens (session_id, generation, token_hash, created_at, rotated_at)
SELECT id, g, sha256(convert_to(id::text || ':' || g, 'UTF8')),
       CASE WHEN g = 0 THEN created_at ELSE last_used_at END,
       CASE WHEN g = 0 THEN last_used_at END
FROM ins CROSS JOIN generate_series(0, 1) AS g
"""

# One every few seconds over the last 400 days, oldest first (ids grow with time).
_EVENTS = """
INSERT INTO security_events (at, kind, user_id, session_id, ip, user_agent, email, details)
SELECT $1::timestamptz - interval '400 days'
           + (e::float8 * 34560000 / $5::bigint) * interval '1 second',
       kind, md5('user:' || u)::uuid,
       CASE WHEN kind IN ('LOGIN_SUCCEEDED', 'LOGOUT')
            THEN md5('session:' || (1 + (e * 7) % (6 * $4::bigint)))::uuid END,
       (20 + (u * 7) % 200) || '.' || ((u * 13) % 256) || '.' || ((u * 17) % 256) || '.'
           || (1 + e % 250),
       ($6::text[])[1 + (u + e % 2) % 6],
       CASE WHEN kind = 'LOGIN_FAILED' THEN 'user' || u || '@example.com' END,
       CASE WHEN kind = 'LOGIN_FAILED' THEN '{"reason":"wrong_password"}'
            WHEN kind = 'SESSION_REVOKED' THEN '{"reason":"revoked_by_user"}' END
FROM generate_series($2::bigint, $3::bigint) AS e
CROSS JOIN LATERAL (SELECT 1 + (e * 16807) % $4::bigint AS u,
    (ARRAY['LOGIN_SUCCEEDED', 'LOGIN_SUCCEEDED', 'LOGIN_SUCCEEDED', 'LOGIN_SUCCEEDED',
           'LOGIN_SUCCEEDED', 'LOGIN_FAILED', 'LOGIN_FAILED', 'LOGOUT', 'PASSWORD_CHANGED',
           'SESSION_REVOKED'])[1 + e % 10] AS kind) AS x
"""

# Oldest first: c <= $4 the backlog (expired 30..2 days ago), then $4/10 expired within
# the last day, then the live ones ($5 = $4 + $4/10: where the live ones start).
_CHALLENGES = """
INSERT INTO challenges (id, token_hash, user_id, purpose, method, attempts, amr,
                        user_agent, ip, created_at, expires_at, consumed_at, code_hash,
                        resends, sent_at, new_email, session_id, email, owner_client)
SELECT md5('challenge:' || c)::uuid, sha256(convert_to('challenge:' || c, 'UTF8')),
       CASE WHEN known THEN md5('user:' || u)::uuid END,
       p.purpose, p.method, c % 4, 'pwd',
       ($6::text[])[1 + (u + c % 2) % 6],
       (20 + (u * 7) % 200) || '.' || ((u * 13) % 256) || '.' || ((u * 17) % 256) || '.'
           || (1 + c % 250),
       t.expires - interval '10 minutes', t.expires,
       CASE WHEN c % 3 = 0 AND c <= $5::bigint THEN t.expires - interval '9 minutes' END,
       CASE WHEN p.method = 'EMAIL' THEN sha256(convert_to('code:' || c, 'UTF8')) END,
       0,
       CASE WHEN p.method = 'EMAIL' THEN t.expires - interval '10 minutes' END,
       CASE WHEN p.purpose = 'CHANGE_EMAIL' THEN 'new' || u || '@example.com' END,
       CASE WHEN p.purpose = 'CHANGE_EMAIL'
            THEN md5('session:' || (1 + (c * 7) % (6 * $7::bigint)))::uuid END,
       CASE WHEN p.method = 'EMAIL'
            THEN CASE WHEN known THEN 'user' || u ELSE 'nobody' || c END || '@example.com'
       END,
       c % 5 = 0
FROM generate_series($2::bigint, $3::bigint) AS c
CROSS JOIN LATERAL (SELECT 1 + (c * 69621) % $7::bigint AS u,
                           (c % 17 <> 0 OR c % 10 < 4) AS known) AS x
CROSS JOIN LATERAL (SELECT
    CASE WHEN c % 10 < 4 THEN 'LOGIN' WHEN c % 10 < 6 THEN 'LOGIN'
         WHEN c % 10 = 6 THEN 'VERIFY_EMAIL' WHEN c % 10 < 9 THEN 'RESET_PASSWORD'
         ELSE 'CHANGE_EMAIL' END AS purpose,
    CASE WHEN c % 10 < 4 THEN 'TOTP' ELSE 'EMAIL' END AS method) AS p
CROSS JOIN LATERAL (SELECT CASE
    WHEN c <= $4::bigint
        THEN $1::timestamptz - interval '30 days'
             + (c::float8 * 2419200 / $4::bigint) * interval '1 second'
    WHEN c <= $5::bigint
        THEN $1::timestamptz - interval '23 hours'
             + ((c - $4::bigint)::float8 * 79200 / ($5::bigint - $4::bigint + 1))
               * interval '1 second'
    ELSE $1::timestamptz + interval '5 minutes' + (c % 300) * interval '1 second'
    END AS expires) AS t
"""

# Over the last 12 days, oldest first: sent 2 s after being written, or (1 in 50) given
# up after an hour, and 1 in 100 of those still holds sealed secrets, expired.
_OUTBOX = """
INSERT INTO outbox (id, user_id, recipient, template, context, secrets_sealed,
                    secrets_expire_at, created_at, next_attempt_at, attempts, claimed_until,
                    claim_id, sent_at, failed_at, last_error)
SELECT md5('mail:' || m)::uuid, md5('user:' || u)::uuid, 'user' || u || '@example.com',
       (ARRAY['verify_email', 'login_code', 'password_reset_code', 'new_device',
              'change_email_code'])[1 + m % 5],
       '{"email":"user' || u || '@example.com"}',
       CASE WHEN m % 100 = 0 THEN 'gAAAAA-seeded-placeholder' END,
       CASE WHEN m % 5 <> 3 THEN t.created + interval '10 minutes' END,
       t.created, NULL, CASE WHEN m % 50 = 0 THEN 5 ELSE 1 END, NULL, NULL,
       CASE WHEN m % 50 <> 0 THEN t.created + interval '2 seconds' END,
       CASE WHEN m % 50 = 0 THEN t.created + interval '1 hour' END,
       CASE WHEN m % 50 = 0 THEN 'unavailable' END
FROM generate_series($2::bigint, $3::bigint) AS m
CROSS JOIN LATERAL (SELECT 1 + (m * 16807) % $4::bigint AS u,
    $1::timestamptz - interval '12 days' + (m::float8 * 1036800 / $5::bigint)
        * interval '1 second' AS created) AS t
"""

# Password-lockout keys (addresses), code-lockout keys and per-account code checks;
# even t quiet for 2 to 29 days, odd t failed within the last half hour.
_THROTTLES = """
INSERT INTO login_throttles (email, failures, last_failure_at, locked_until, in_flight,
                             in_flight_at)
SELECT CASE t % 3
         WHEN 0 THEN 'user' || u || '.' || t || '@example.com'
         WHEN 1 THEN 'code:' || substr(md5('code:' || t), 1, 32)
         ELSE 'otp:' || md5('user:' || u)::uuid || ':' || t END,
       1 + t % 4,
       CASE WHEN t % 2 = 0 THEN $1::timestamptz - interval '2 days' - (t % 27) * interval '1 day'
            ELSE $1::timestamptz - (t % 1800) * interval '1 second' END,
       NULL, 0, NULL
FROM generate_series($2::bigint, $3::bigint) AS t
CROSS JOIN LATERAL (SELECT 1 + (t * 48271) % $4::bigint AS u) AS x
"""


@dataclass(frozen=True)
class Chunk:
    table: str
    sql: str
    first: int
    last: int
    args: tuple[Any, ...]


def chunks(shape: Shape, now: datetime, hashes: Sequence[str], recovery_hash: str) -> list[Chunk]:
    """Every INSERT to run, biggest first (they run `--jobs` at a time)."""
    n = shape.users
    agents, devices = list(USER_AGENTS), list(DEVICES)

    def split(table: str, sql: str, total: int, *extra: Any, rows: int = CHUNK_ROWS) -> list[Chunk]:
        return [
            Chunk(table, sql, first, min(total, first + rows - 1), (n, *extra))
            for first in range(1, total + 1, rows)
        ]

    work = [
        *split("sessions", _SESSIONS, shape.sessions, agents, devices),
        *split("security_events", _EVENTS, shape.events, shape.events, agents),
        *split(
            "challenges",
            _CHALLENGES,
            shape.challenges,
            n + n // 10,
            agents,
            n,
        ),
        *split("outbox", _OUTBOX, shape.outbox, shape.outbox),
        *split("users", _USERS, n, list(hashes)),
        *split("recovery_codes", _RECOVERY, n, recovery_hash),
        *split("totp_credentials", _TOTP, n),
        *split("login_throttles", _THROTTLES, shape.throttles),
    ]
    return [Chunk(c.table, c.sql, c.first, c.last, (now, c.first, c.last, *c.args)) for c in work]


# -- constraints and indexes ----------------------------------------------------------------


@dataclass(frozen=True)
class Definitions:
    """What is dropped before loading and made again afterwards, in order."""

    keys: list[tuple[str, str, str]]  # (table, name, definition): primary keys, uniques
    indexes: list[tuple[str, str, str]]  # (table, name, CREATE INDEX ...): the others
    foreign_keys: list[tuple[str, str, str]]


async def read_definitions(conn: asyncpg.Connection) -> Definitions:
    rows = await conn.fetch(
        """
        SELECT c.conrelid::regclass::text AS tbl, c.conname, c.contype::text AS contype,
               pg_get_constraintdef(c.oid) AS def
        FROM pg_constraint c
        WHERE c.conrelid::regclass::text = ANY($1::text[]) AND c.contype IN ('p', 'u', 'f')
        ORDER BY c.contype DESC, c.conname
        """,
        list(TABLES),
    )
    keys = [(r["tbl"], r["conname"], r["def"]) for r in rows if r["contype"] in ("p", "u")]
    foreign = [(r["tbl"], r["conname"], r["def"]) for r in rows if r["contype"] == "f"]
    index_rows = await conn.fetch(
        """
        SELECT i.indrelid::regclass::text AS tbl, i.indexrelid::regclass::text AS name,
               pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i
        WHERE i.indrelid::regclass::text = ANY($1::text[])
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        ORDER BY 1
        """,
        list(TABLES),
    )
    indexes = [(r["tbl"], r["name"], r["def"]) for r in index_rows]
    return Definitions(keys=keys, indexes=indexes, foreign_keys=foreign)


async def drop_definitions(conn: asyncpg.Connection, found: Definitions) -> None:
    async with conn.transaction():
        for table, name, _ in found.foreign_keys:
            await conn.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"')
        for _, name, _ in found.indexes:
            await conn.execute(f'DROP INDEX "{name}"')
        for table, name, _ in found.keys:
            await conn.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"')


# -- running --------------------------------------------------------------------------------


Progress = Callable[[str], None]


async def _pool_run(
    dsn: str, jobs: int, work: Sequence[Callable[[asyncpg.Connection], Awaitable[None]]]
) -> None:
    """Each item of `work` on one of `jobs` connections, in order, as connections free up."""
    queue: asyncio.Queue[Callable[[asyncpg.Connection], Awaitable[None]]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def worker() -> None:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            await conn.execute(
                "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 0;"
                " SET work_mem = '64MB'; SET synchronous_commit = off"
            )
            while not queue.empty():
                item = queue.get_nowait()
                await item(conn)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(max(1, min(jobs, len(work))))))


def _insert(chunk: Chunk) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    async def run(conn: asyncpg.Connection) -> None:
        await conn.execute(chunk.sql, *chunk.args, timeout=3600)

    return run


def _statement(sql: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    async def run(conn: asyncpg.Connection) -> None:
        await conn.execute(sql, timeout=3600)

    return run


def make_hashes() -> tuple[list[str], str]:
    """The seeded users' password hashes (one per SEED_PASSWORDS) and the recovery codes'
    hash: the server's own hasher with its default cost."""
    context = PasswordHasher().context
    return [context.hash(p) for p in SEED_PASSWORDS], context.hash(RECOVERY_CODE)


async def count_backlog(conn: asyncpg.Connection, now: datetime) -> dict[str, int]:
    """What housekeeping with the default retentions may remove at `now`."""
    day = timedelta(days=1)
    queries = {  # (the count, its cutoff: the default retention before now)
        "sessions": (
            "SELECT count(*) FROM sessions WHERE revoked_at < $1 OR expires_at < $1",
            30 * day,
        ),
        "challenges": ("SELECT count(*) FROM challenges WHERE expires_at < $1", day),
        "security_events": ("SELECT count(*) FROM security_events WHERE at < $1", 365 * day),
        "outbox": (
            "SELECT count(*) FROM outbox WHERE next_attempt_at IS NULL"
            " AND (sent_at < $1 OR failed_at < $1)",
            7 * day,
        ),
        "users": (
            "SELECT count(*) FROM users u WHERE email_verified_at IS NULL AND created_at < $1"
            " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = u.id)",
            7 * day,
        ),
        "login_throttles": ("SELECT count(*) FROM login_throttles WHERE last_failure_at < $1", day),
    }
    counted = {
        name: int(await conn.fetchval(sql, now - retention))
        for name, (sql, retention) in queries.items()
    }
    # Every session has two generations, which go with it.
    counted["refresh_tokens"] = 2 * counted["sessions"]
    return counted


async def seed_scale(
    database_url: str,
    users: int,
    *,
    jobs: int = 2,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> SeedReport:
    """Seeds `users` users and everything in proportion (see the module's docstring) into a
    migrated, empty database; returns what was made and how long each step took."""
    say = progress or (lambda _message: None)
    dsn = asyncpg_dsn(database_url)
    shape = Shape(users)
    report = SeedReport(users=users)
    started = time.perf_counter()
    now = now or datetime.now(UTC)

    def step(name: str, since: float) -> float:
        took = time.perf_counter() - since
        report.steps[name] = took
        say(f"seed: {name} took {took:.1f} s")
        return time.perf_counter()

    mark = time.perf_counter()
    say("seed: hashing the seed passwords (argon2id, the server's cost)")
    hashes, recovery_hash = await asyncio.to_thread(make_hashes)
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        if await conn.fetchval("SELECT count(*) FROM users") or await conn.fetchval(
            "SELECT count(*) FROM sessions"
        ):
            raise SystemExit("the database already has users or sessions: seed an empty one")
        found = await read_definitions(conn)
        await drop_definitions(conn, found)
    finally:
        await conn.close()
    mark = step("prepare", mark)

    work = chunks(shape, now, hashes, recovery_hash)
    say(
        f"seed: {len(work)} INSERT statements, {jobs} at a time: {users:,} users,"
        f" {shape.sessions:,} sessions ({2 * shape.sessions:,} refresh tokens),"
        f" {shape.events:,} events, {shape.challenges:,} challenges, {shape.outbox:,} mails"
    )
    await _pool_run(dsn, jobs, [_insert(chunk) for chunk in work])
    mark = step("insert", mark)

    # Keys and indexes, biggest tables first; then the foreign keys (each validated).
    def biggest_first(table: str) -> int:
        return BIGGEST_FIRST.index(table) if table in BIGGEST_FIRST else len(BIGGEST_FIRST)

    builds = sorted(
        [
            (table, f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
            for table, name, definition in found.keys
        ]
        + [(table, definition) for table, _, definition in found.indexes],
        key=lambda build: biggest_first(build[0]),
    )
    say(f"seed: building {len(builds)} keys and indexes")
    await _pool_run(dsn, jobs, [_statement(sql) for _, sql in builds])
    mark = step("indexes", mark)
    say(f"seed: validating {len(found.foreign_keys)} foreign keys")
    await _pool_run(
        dsn,
        jobs,
        [
            _statement(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
            for table, name, definition in found.foreign_keys
        ],
    )
    mark = step("foreign keys", mark)
    say("seed: VACUUM ANALYZE")
    tables = sorted(TABLES, key=biggest_first)
    await _pool_run(dsn, jobs, [_statement(f'VACUUM (ANALYZE) "{table}"') for table in tables])
    mark = step("vacuum analyze", mark)

    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        for table in TABLES:
            counted = await conn.fetchval(f'SELECT count(*) FROM "{table}"')  # noqa: S608
            report.rows[table] = int(counted)
        report.backlog = await count_backlog(conn, now)
        report.database_bytes = int(
            await conn.fetchval("SELECT pg_database_size(current_database())")
        )
    finally:
        await conn.close()
    step("count", mark)
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale_seed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("database_url", help="a migrated, empty PostgreSQL database")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=2, help="statements run at a time")
    args = parser.parse_args(argv)
    if args.users < 100:
        parser.error("--users must be at least 100")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = asyncio.run(seed_scale(args.database_url, args.users, jobs=args.jobs, progress=say))
    print(
        f"seeded {report.users:,} users in {report.seconds:.1f} s;"
        f" database {report.database_bytes / 2**30:.2f} GiB"
    )
    for table, rows in report.rows.items():
        print(f"  {table:<17}{rows:>13,}   backlog {report.backlog.get(table, 0):>11,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
