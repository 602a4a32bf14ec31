"""The `signInWithIdToken` scenario's provider and tokens: an OpenID Connect provider on
loopback (tests/identity_provider.py's `LocalProvider`, in a thread of the benchmark's
process) that serves discovery and its keys (JWKS) to the server, and ID tokens minted
with its RSA key (RS256), one a request: the server spends each token it takes, so no
token can be sent twice.

1. The provider starts before the servers, which are configured with it as `acme`
   (`server_settings`): a generic OpenID Connect provider found by discovery at its
   issuer (plain HTTP on 127.0.0.1: IDENTITY_PROVIDERS_ALLOW_INSECURE=true), whose
   `email_verified` is trusted, with a native client `ios-client` (the `aud` of the
   tokens: the native-app path that signInWithIdToken serves).
2. First sign-ins (`first_sign_ins`, right before the scenario, unmeasured): one ID token
   for each of `users` distinct subjects (`sub`, its own verified address
   `idtoken<i>@example.com`, a name), sent through signInWithIdToken over HTTP from a few
   keep-alive connections (bench/otp_client.py's `Connection`): the server creates each
   account (no password, address verified by the provider's word) and links the
   identity, as at a user's first sign-in. The first of them also fills the server's
   discovery and JWKS caches. Then `VACUUM ANALYZE` of the tables they wrote.
3. The load's bodies (`write_bodies`): for the warm-up and for the measured run (disjoint
   sets), one fresh token a request, the subjects taken in turn from a shuffled order of
   the seeded ones, so every request is the sign-in of an existing identity and requests
   in flight together are different users. Each token carries a nonce of its own: the
   body sends the raw nonce, the token its SHA-256 hex (as Sign in with Apple and apps
   that hash their nonce for Google do), so the server checks it and every token differs.
   A token lives an hour (`exp` = `iat` + 3600, as Google's); one JSON document a line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.harness import BenchError, asyncpg_dsn
from bench.otp_client import Connection, TransportError, classify
from tests.identity_provider import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, LocalProvider

PROVIDER_ID = "acme"
NATIVE_CLIENT = "ios-client"  # the app whose SDK hands the ID tokens over: their `aud`
PUBLIC_URL = "https://auth.example.com"  # required with any provider; https in production
TOKEN_LIFETIME = 3600  # seconds, as Google's ID tokens
SIGN_IN_CONNECTIONS = 16  # keep-alive connections for the first sign-ins
MUTATION = "signInWithIdToken"

SIGN_IN = (
    "mutation($i: SignInWithIdTokenInput!){ signInWithIdToken(input:$i){ __typename"
    " ... on AuthSession { accessToken refreshToken } ... on AuthError { code retryAfter } } }"
)


def server_settings(issuer: str) -> dict[str, str]:
    """The settings that configure `provider` as the servers' identity provider `acme`."""
    prefix = f"IDENTITY_PROVIDERS__{PROVIDER_ID.upper()}__"
    return {
        f"{prefix}ISSUER": issuer,
        f"{prefix}NAME": "Acme ID",
        f"{prefix}CLIENT_ID": DEFAULT_CLIENT_ID,
        f"{prefix}CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
        f"{prefix}NATIVE_CLIENT_IDS": NATIVE_CLIENT,
        f"{prefix}TRUST_EMAIL_VERIFIED": "true",
        "PUBLIC_URL": PUBLIC_URL,
        "IDENTITY_PROVIDERS_ALLOW_INSECURE": "true",
    }


@dataclass(frozen=True)
class Subject:
    sub: str
    email: str
    name: str


def subjects(count: int) -> list[Subject]:
    """`count` distinct provider accounts."""
    return [
        Subject(sub=f"1{index:020d}", email=f"idtoken{index}@example.com", name=f"Bench {index}")
        for index in range(1, count + 1)
    ]


def sign_in_body(provider: LocalProvider, subject: Subject) -> str:
    """A signInWithIdToken request body on one line: a fresh token for `subject`, with a
    nonce of its own (raw in the body, its SHA-256 hex in the token)."""
    nonce = secrets.token_urlsafe(24)
    token = provider.mint_id_token(
        {
            "sub": subject.sub,
            "email": subject.email,
            "email_verified": True,
            "name": subject.name,
        },
        client_id=NATIVE_CLIENT,
        lifetime=TOKEN_LIFETIME,
        nonce=hashlib.sha256(nonce.encode()).hexdigest(),
    )
    variables = {"i": {"provider": PROVIDER_ID, "idToken": token, "nonce": nonce}}
    return json.dumps({"query": SIGN_IN, "variables": variables})


@dataclass(frozen=True)
class FirstSignIns:
    subjects: list[Subject]
    seconds: float  # the sign-ins over HTTP (minting their tokens included)
    discovery_fetches: int  # the provider's counters right after them
    jwks_fetches: int


async def first_sign_ins(
    url: str,
    database_url: str,
    provider: LocalProvider,
    users: int,
    *,
    connections: int = SIGN_IN_CONNECTIONS,
) -> FirstSignIns:
    """The first sign-in of `users` distinct subjects through signInWithIdToken (each
    creates its account and identity); BenchError unless every one is an AuthSession."""
    made = subjects(users)
    started = time.perf_counter()
    queue = iter(made)

    async def signer() -> None:
        connection = Connection(url)
        try:
            for subject in queue:
                body = sign_in_body(provider, subject).encode()
                try:
                    answer = await connection.post_json(body)
                except TransportError as exc:
                    raise BenchError(f"{MUTATION} (first sign-in): {exc}") from exc
                if classify(answer.status, answer.body, MUTATION) != "ok":
                    raise BenchError(
                        f"{MUTATION} (first sign-in of {subject.email}): HTTP"
                        f" {answer.status}: {answer.text[:500]}"
                    )
        finally:
            connection.close()

    await asyncio.gather(*(signer() for _ in range(max(1, min(connections, users)))))
    seconds = time.perf_counter() - started
    # Thousands of accounts, identities, sessions and spent tokens were just written:
    # fresh statistics now, so that autovacuum has no reason to visit them mid-run.
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        await conn.execute(
            "VACUUM ANALYZE users, identities, sessions, refresh_tokens, spent_id_tokens",
            timeout=120,
        )
    finally:
        await conn.close()
    return FirstSignIns(made, seconds, provider.discovery_fetches, provider.jwks_fetches)


@dataclass(frozen=True)
class Bodies:
    files: dict[str, Path]  # a set's name -> its file of signInWithIdToken bodies
    counts: dict[str, int]
    seconds: float  # minting and writing them


def write_bodies(
    provider: LocalProvider, seeded: list[Subject], sets: Mapping[str, int], *, work: Path
) -> Bodies:
    """`sets[name]` bodies for every named set, each a fresh token of a seeded subject:
    the subjects in turn from one shuffled order, carried on from set to set."""
    started = time.perf_counter()
    order = list(seeded)
    random.shuffle(order)
    files: dict[str, Path] = {}
    taken = 0
    for name, count in sets.items():
        lines: list[str] = []
        for _ in range(count):
            lines.append(sign_in_body(provider, order[taken % len(order)]))
            taken += 1
        path = work / f"id-token-bodies-{name}.txt"
        path.write_text("\n".join(lines) + "\n" if lines else "")
        files[name] = path
    return Bodies(files, dict(sets), time.perf_counter() - started)
