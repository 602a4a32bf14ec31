"""Users with two-factor on and a pending login challenge each, written straight into the
scratch database: the `verifyOtp` scenario's seed.

Through the API every such user would cost a signup, a login and a confirmTotp (argon2
hashes at tens of milliseconds each, and recovery codes hashed too); thousands of them
are needed (each user's TOTP time step is accepted once, so every successful verifyOtp
needs its own user), so the rows are copied in directly, as the server itself writes them:

- users: a placeholder password hash (never checked: verifyOtp does not hash), active,
  no wrong codes counted;
- totp_credentials: a secret of its own from `db.security.totp.new_secret`, sealed with
  `db.security.box.SecretBox` under the server's ENCRYPTION_KEYS, confirmed, no step
  accepted yet;
- challenges: a LOGIN/TOTP challenge after the password ("pwd"), unused, no attempts,
  whose token is 32 random bytes like the server's and stored as its SHA-256.

Each set of pairs (the warm-up's, the measured run's) is written to a file, one
"<challengeToken> <TOTP secret>" a line, for bench/otp_client.py; the sets are disjoint.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import asyncpg_dsn
from db.security.box import SecretBox
from db.security.totp import new_secret
from db.settings import parse_fernet_keys

PLACEHOLDER_HASH = "not-a-hash: seeded by bench/otp_seed.py, never verified"

USER_COLUMNS = [
    "id",
    "email",
    "email_normalized",
    "password_hash",
    "is_active",
    "email_verified_at",
    "created_at",
    "updated_at",
]
CREDENTIAL_COLUMNS = ["user_id", "secret_sealed", "confirmed_at", "last_step", "created_at"]
CHALLENGE_COLUMNS = [
    "id",
    "token_hash",
    "user_id",
    "purpose",
    "method",
    "attempts",
    "amr",
    "user_agent",
    "ip",
    "created_at",
    "expires_at",
    "consumed_at",
]


@dataclass(frozen=True)
class OtpSeeds:
    files: dict[str, Path]  # a set's name -> its "<token> <secret>" file
    counts: dict[str, int]
    seconds: float  # time the seeding took


async def seed_otp_users(
    database_url: str,
    encryption_keys: str,
    sets: Mapping[str, int],
    *,
    work: Path,
    challenge_lifetime: timedelta,
) -> OtpSeeds:
    """`sets[name]` users with two-factor on and one pending login challenge each, for
    every named set; returns the files of (challenge token, secret) pairs."""
    started = datetime.now(UTC)
    box = SecretBox(parse_fernet_keys(encryption_keys))
    now = datetime.now(UTC)
    expires_at = now + challenge_lifetime
    users: list[tuple[Any, ...]] = []
    credentials: list[tuple[Any, ...]] = []
    challenges: list[tuple[Any, ...]] = []
    files: dict[str, Path] = {}
    index = 0
    for name, count in sets.items():
        lines: list[str] = []
        for _ in range(count):
            index += 1
            user_id = uuid.uuid4()
            email = f"otp{index}@example.com"
            secret = new_secret()
            token = secrets.token_urlsafe(32)
            users.append((user_id, email, email, PLACEHOLDER_HASH, True, now, now, now))
            credentials.append((user_id, box.seal(secret), now, None, now))
            challenges.append(
                (
                    uuid.uuid4(),
                    hashlib.sha256(token.encode()).digest(),
                    user_id,
                    "LOGIN",
                    "TOTP",
                    0,
                    "pwd",
                    None,
                    None,
                    now,
                    expires_at,
                    None,
                )
            )
            lines.append(f"{token} {secret}")
        path = work / f"otp-pairs-{name}.txt"
        path.write_text("\n".join(lines) + "\n" if lines else "")
        files[name] = path
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("users", records=users, columns=USER_COLUMNS)
            await conn.copy_records_to_table(
                "totp_credentials", records=credentials, columns=CREDENTIAL_COLUMNS
            )
            await conn.copy_records_to_table(
                "challenges", records=challenges, columns=CHALLENGE_COLUMNS
            )
        # Fresh statistics and visibility map now, so that autovacuum has no reason to
        # visit these tables during a measured run.
        await conn.execute("VACUUM ANALYZE users, totp_credentials, challenges", timeout=120)
    finally:
        await conn.close()
    return OtpSeeds(
        files=files,
        counts=dict(sets),
        seconds=(datetime.now(UTC) - started).total_seconds(),
    )
