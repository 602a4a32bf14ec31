"""The benchmark's baseline: Strawgate's two hot paths, `me` and `refresh`, written as
plainly as possible. Plain Starlette, one asyncpg pool, no ORM, no GraphQL; the same
token check (python-jose) and the same reads and writes as Strawgate, a statement each.

Run the way the benchmark runs Strawgate, with the same SECRET_KEY and DATABASE_URL:

    uvicorn bench.reference_app:app --workers 1

POST /me       GraphQL-shaped body, `Authorization: Bearer <accessToken>`; answers like
               `{ me { id email } }`.
POST /refresh  body {"variables": {"i": {"refreshToken": "..."}}}; rotates the token like
               Strawgate's refresh mutation and answers with the successor.

Not a server to deploy: it skips what the benchmark never reaches (input limits, request
ids, logging) and exists only to be measured against.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jose import jwt
from jose.exceptions import JOSEError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

# The values Strawgate uses by default (db/settings.py, db/security/*.py).
ALGORITHM = "HS256"
ISSUER = "strawgate"
AUDIENCE = "strawgate"
ACCESS_TOKEN_TYPE = "at+jwt"
ACCESS_LIFETIME = timedelta(minutes=15)
REUSE_INTERVAL = timedelta(seconds=10)
IAT_LEEWAY_SECONDS = 60
MAX_ACCESS_TOKEN_LENGTH = 4096
MAX_OPAQUE_TOKEN_LENGTH = 128
DECODE_OPTIONS = {
    "require_exp": True,
    "require_aud": True,
    "require_iat": True,
    "require_iss": True,
    "require_sub": True,
    "require_jti": True,
    "leeway": 0,
}

CURRENT_USER = """
SELECT users.id, users.email, users.email_verified_at, users.created_at
FROM users JOIN sessions ON sessions.user_id = users.id
WHERE sessions.id = $1 AND sessions.user_id = $2 AND sessions.revoked_at IS NULL
  AND sessions.expires_at > $3 AND users.is_active
"""


def _database_dsn() -> str:
    """DATABASE_URL as asyncpg takes it (without SQLAlchemy's "+asyncpg")."""
    url = os.environ["DATABASE_URL"]
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def _derive_key(secret: str, purpose: str) -> bytes:
    """HKDF-SHA-256 of SECRET_KEY, as db/security/tokens.py derives the refresh key."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"strawgate:{purpose}".encode()
    ).derive(secret.encode("utf-8"))


SECRET_KEY = os.environ["SECRET_KEY"]
REFRESH_KEY = _derive_key(SECRET_KEY, "refresh-successor")


# -- tokens -----------------------------------------------------------------------------


def decode_access_token(token: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(user id, session id) of a valid access token, else None."""
    if not token or len(token) > MAX_ACCESS_TOKEN_LENGTH:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            SECRET_KEY,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options=DECODE_OPTIONS,
        )
        header = jwt.get_unverified_header(token)
    except (JOSEError, ValueError, TypeError):
        return None
    if header.get("typ") != ACCESS_TOKEN_TYPE:
        return None
    now = datetime.now(UTC).timestamp()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int) or exp <= now:
        return None
    if not isinstance(iat, int) or iat > now + IAT_LEEWAY_SECONDS:
        return None
    try:
        return uuid.UUID(str(claims["sub"])), uuid.UUID(str(claims["sid"]))
    except (KeyError, ValueError):
        return None


def issue_access_token(user_id: uuid.UUID, session_id: uuid.UUID, amr: list[str]) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "sid": str(session_id),
        "jti": uuid.uuid4().hex,
        "iat": int(now.timestamp()),
        "exp": int((now + ACCESS_LIFETIME).timestamp()),
        "iss": ISSUER,
        "aud": AUDIENCE,
        "amr": list(amr),
    }
    return str(jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM, headers={"typ": "at+jwt"}))


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def successor_token(token: str) -> str:
    mac = hmac.new(REFRESH_KEY, token.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


# -- endpoints --------------------------------------------------------------------------


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


def _unauthenticated() -> JSONResponse:
    return JSONResponse(
        {
            "data": {"me": None},
            "errors": [
                {
                    "message": "The access token is invalid or its session has ended.",
                    "extensions": {"code": "UNAUTHENTICATED"},
                }
            ],
        }
    )


async def me(request: Request) -> JSONResponse:
    await request.json()  # read and parse the body, as a GraphQL server must
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ids = decode_access_token(token.strip()) if scheme.lower() == "bearer" else None
    if ids is None:
        return _unauthenticated()
    user_id, session_id = ids
    row = await _pool(request).fetchrow(CURRENT_USER, session_id, user_id, datetime.now(UTC))
    if row is None:
        return _unauthenticated()
    return JSONResponse({"data": {"me": {"id": str(row["id"]), "email": row["email"]}}})


def _auth_error(code: str) -> JSONResponse:
    return JSONResponse({"data": {"refresh": {"__typename": "AuthError", "code": code}}})


def _presented_refresh_token(body: object) -> str | None:
    if not isinstance(body, dict):
        return None
    variables = body.get("variables")
    given = variables.get("i") if isinstance(variables, dict) else None
    token = given.get("refreshToken") if isinstance(given, dict) else None
    return token if isinstance(token, str) else None


async def refresh(request: Request) -> JSONResponse:
    """db/services/sessions.py Sessions.refresh, its reads and writes one statement (and
    one round trip) each, as a plain implementation writes them: Strawgate joins the reads
    into one and sends the writes as one statement on PostgreSQL."""
    token = _presented_refresh_token(await request.json())
    if not token or len(token) > MAX_OPAQUE_TOKEN_LENGTH or not token.isascii():
        return _auth_error("INVALID_TOKEN")
    digest = token_digest(token)
    now = datetime.now(UTC)
    async with _pool(request).acquire() as conn, conn.transaction():
        session_id = await conn.fetchval(
            "SELECT session_id FROM refresh_tokens WHERE token_hash = $1", digest
        )
        if session_id is None:
            return _auth_error("INVALID_TOKEN")
        session = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1 FOR UPDATE", session_id)
        presented = await conn.fetchrow(
            "SELECT * FROM refresh_tokens WHERE token_hash = $1", digest
        )
        if (
            session is None
            or presented is None
            or session["revoked_at"] is not None
            or session["expires_at"] <= now
        ):
            return _auth_error("INVALID_TOKEN")
        user = await conn.fetchrow("SELECT * FROM users WHERE id = $1", session["user_id"])
        if user is None:
            return _auth_error("INVALID_TOKEN")
        if not user["is_active"]:
            return _auth_error("ACCOUNT_DISABLED")
        successor = successor_token(token)
        if presented["rotated_at"] is None:
            await conn.execute(
                "UPDATE refresh_tokens SET rotated_at = $1 WHERE id = $2", now, presented["id"]
            )
            await conn.execute(
                "INSERT INTO refresh_tokens (session_id, generation, token_hash, created_at)"
                " VALUES ($1, $2, $3, $4)",
                session_id,
                presented["generation"] + 1,
                token_digest(successor),
                now,
            )
        elif not await _is_retry(conn, presented, successor, now):
            await conn.execute(
                "UPDATE sessions SET revoked_at = $1, revoke_reason = 'refresh_token_reused'"
                " WHERE id = $2",
                now,
                session_id,
            )
            return _auth_error("TOKEN_REUSED")
        await conn.execute("UPDATE sessions SET last_used_at = $1 WHERE id = $2", now, session_id)
        access = issue_access_token(user["id"], session_id, str(session["amr"]).split())
    return JSONResponse(
        {
            "data": {
                "refresh": {
                    "__typename": "AuthSession",
                    "accessToken": access,
                    "refreshToken": successor,
                }
            }
        }
    )


async def _is_retry(
    conn: PoolConnectionProxy[asyncpg.Record],
    presented: asyncpg.Record,
    successor: str,
    now: datetime,
) -> bool:
    """A spent token presented again within the reuse interval whose successor is still
    the newest generation (never reached by the benchmark, kept for fidelity)."""
    if now - presented["rotated_at"] > REUSE_INTERVAL:
        return False
    newest = await conn.fetchrow(
        "SELECT * FROM refresh_tokens WHERE session_id = $1 ORDER BY generation DESC LIMIT 1",
        presented["session_id"],
    )
    return (
        newest is not None
        and newest["generation"] == presented["generation"] + 1
        and hmac.compare_digest(newest["token_hash"], token_digest(successor))
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(_database_dsn(), min_size=10, max_size=20)
    try:
        yield
    finally:
        await app.state.pool.close()


app = Starlette(
    routes=[
        Route("/me", me, methods=["POST"]),
        Route("/refresh", refresh, methods=["POST"]),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
