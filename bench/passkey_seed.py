"""The `finishPasskeyLogin` scenario's seed: users with one passkey each, written straight
into the scratch database, and sign-in ceremonies started over HTTP and answered offline.

1. Users (`seed_passkey_users`, with the other seeding, unmeasured): one per planned
   sign-in, each with its own software authenticator (tests/webauthn_authenticator.py:
   a P-256 key made with `cryptography`, a 32-byte credential ID) and its passkeys row as
   finishPasskeyRegistration writes it (db/services/passkeys.py): the credential ID, the
   authenticator's COSE public key (`SoftAuthenticator.cose_public_key`), sign count 0
   (a synced passkey's: a count of 0 that stays 0 is accepted), the all-zero AAGUID,
   transports "hybrid internal", backup eligible and backed up, platform attachment,
   user verified, the default name; the user's 64-byte random WebAuthn user handle on
   the user, no password (a passkey-only account), address verified. Copied in with
   `copy_records_to_table` in one transaction, then `VACUUM ANALYZE`.
2. Ceremonies (`prepare_sign_ins`, right before the scenario, unmeasured: a ceremony
   lives five minutes): `startPasskeyLogin(input: {})` (a discoverable sign-in: any
   passkey) over HTTP, one ceremony per planned sign-in (each is single use), from a few
   keep-alive connections (bench/otp_client.py's `Connection`); each answered offline by
   its user's authenticator (`SoftAuthenticator.assertion(optionsJson, count=0)`:
   AuthenticationResponseJSON for the challenge derived from the ceremony's token, user
   present and verified, backed up) and written as a whole finishPasskeyLogin request
   body, one JSON document a line, to a file per set (the warm-up's, the measured run's:
   disjoint) for bench/otp_client.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import BenchError, asyncpg_dsn
from bench.otp_client import Connection, TransportError
from db.services.passkeys import DEFAULT_NAME
from tests.webauthn_authenticator import NO_AAGUID, SoftAuthenticator

# The relying party the bench server runs with (production demands https origins).
RP_ID = "example.com"
ORIGIN = "https://example.com"
USER_HANDLE_BYTES = 64  # as the server assigns at the first registration

START = (
    "mutation{ startPasskeyLogin(input: {}){ __typename"
    " ... on PasskeyCeremony { challengeToken optionsJson } ... on AuthError { code message } } }"
)
FINISH = (
    "mutation($i: FinishPasskeyLoginInput!){ finishPasskeyLogin(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code retryAfter } } }"
)
START_CONNECTIONS = 16  # keep-alive connections starting ceremonies

USER_COLUMNS = [
    "id",
    "email",
    "email_normalized",
    "password_hash",
    "is_active",
    "email_verified_at",
    "created_at",
    "updated_at",
    "webauthn_user_handle",
]
PASSKEY_COLUMNS = [
    "id",
    "user_id",
    "credential_id",
    "public_key",
    "sign_count",
    "aaguid",
    "transports",
    "backup_eligible",
    "backed_up",
    "attachment",
    "user_verified",
    "name",
    "created_at",
    "last_used_at",
]


def server_settings() -> dict[str, str]:
    """The settings that turn passkeys on in the bench servers."""
    return {"WEBAUTHN_RP_ID": RP_ID, "WEBAUTHN_ORIGINS": ORIGIN}


@dataclass(frozen=True)
class PasskeyUsers:
    authenticators: dict[str, list[SoftAuthenticator]]  # a set's name -> one per sign-in
    seconds: float  # time the seeding took

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(found) for name, found in self.authenticators.items()}


@dataclass(frozen=True)
class SignIns:
    files: dict[str, Path]  # a set's name -> its file of finishPasskeyLogin bodies
    counts: dict[str, int]
    start_seconds: float  # the startPasskeyLogin calls
    sign_seconds: float  # answering them offline


async def seed_passkey_users(database_url: str, sets: Mapping[str, int]) -> PasskeyUsers:
    """`sets[name]` users with one passkey each, for every named set."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    users: list[tuple[Any, ...]] = []
    passkeys: list[tuple[Any, ...]] = []
    authenticators: dict[str, list[SoftAuthenticator]] = {}
    index = 0
    for name, count in sets.items():
        made: list[SoftAuthenticator] = []
        for _ in range(count):
            index += 1
            user_id = uuid.uuid4()
            email = f"passkey{index}@example.com"
            handle = secrets.token_bytes(USER_HANDLE_BYTES)
            authenticator = SoftAuthenticator(rp_id=RP_ID, origin=ORIGIN, user_handle=handle)
            users.append((user_id, email, email, None, True, now, now, now, handle))
            passkeys.append(
                (
                    uuid.uuid4(),
                    user_id,
                    authenticator.credential_id,
                    authenticator.cose_public_key(),
                    authenticator.sign_count,
                    str(NO_AAGUID),
                    " ".join(sorted(authenticator.transports)),
                    authenticator.backup_eligible,
                    authenticator.backed_up,
                    authenticator.attachment,
                    authenticator.user_verified,
                    DEFAULT_NAME,
                    now,
                    None,
                )
            )
            made.append(authenticator)
        authenticators[name] = made
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("users", records=users, columns=USER_COLUMNS)
            await conn.copy_records_to_table("passkeys", records=passkeys, columns=PASSKEY_COLUMNS)
        await conn.execute("VACUUM ANALYZE users, passkeys", timeout=120)
    finally:
        await conn.close()
    return PasskeyUsers(authenticators, time.perf_counter() - started)


async def start_ceremonies(
    url: str, count: int, *, connections: int = START_CONNECTIONS
) -> list[tuple[str, str]]:
    """`count` discoverable sign-in ceremonies: (challengeToken, optionsJson) each."""
    body = json.dumps({"query": START}).encode()
    left = count
    found: list[tuple[str, str]] = []

    async def starter() -> None:
        nonlocal left
        connection = Connection(url)
        try:
            while left > 0:
                left -= 1
                try:
                    answer = await connection.post_json(body)
                except TransportError as exc:
                    raise BenchError(f"startPasskeyLogin: {exc}") from exc
                try:
                    ceremony = json.loads(answer.body)["data"]["startPasskeyLogin"]
                    found.append((ceremony["challengeToken"], ceremony["optionsJson"]))
                except (ValueError, KeyError, TypeError):
                    raise BenchError(
                        f"startPasskeyLogin: HTTP {answer.status}: {answer.text[:500]}"
                    ) from None
        finally:
            connection.close()

    await asyncio.gather(*(starter() for _ in range(max(1, min(connections, count)))))
    return found


def finish_body(token: str, credential_json: str) -> str:
    """A finishPasskeyLogin request body on one line."""
    variables = {"i": {"challengeToken": token, "credentialJson": credential_json}}
    return json.dumps({"query": FINISH, "variables": variables})


async def prepare_sign_ins(
    url: str, database_url: str, users: PasskeyUsers, *, work: Path
) -> SignIns:
    """A ceremony per seeded user, started over HTTP and answered by that user's
    authenticator; the bodies of each set to a file."""
    counts = users.counts
    started = time.perf_counter()
    ceremonies = await start_ceremonies(url, sum(counts.values()))
    # Thousands of challenges were just written: fresh statistics now, so that autovacuum
    # has no reason to visit the table during the measured run.
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        await conn.execute("VACUUM ANALYZE challenges", timeout=120)
    finally:
        await conn.close()
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    files: dict[str, Path] = {}
    taken = iter(ceremonies)
    for name, authenticators in users.authenticators.items():
        lines = []
        for authenticator, (token, options_json) in zip(authenticators, taken, strict=False):
            # A synced passkey's count: 0, and 0 again (accepted, and the same every time).
            lines.append(finish_body(token, authenticator.assertion(options_json, count=0)))
        path = work / f"passkey-bodies-{name}.txt"
        path.write_text("\n".join(lines) + "\n" if lines else "")
        files[name] = path
    return SignIns(files, counts, start_seconds, time.perf_counter() - started)
