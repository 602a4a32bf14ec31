"""Helpers to speak GraphQL to the app the way a client does."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, cast

import httpx
from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from db.models import User
from tests.smtp import SmtpSink

PASSWORD = "correct horse battery staple"

SESSION_FIELDS = """
    __typename
    ... on AuthSession { accessToken refreshToken tokenType expiresIn
                         user { id email emailVerified otpEnabled createdAt } }
    ... on OtpChallenge { challengeToken method purpose expiresIn }
    ... on AuthError { code message field retryAfter }
"""

SIGNUP = f"mutation($i: SignupInput!) {{ signup(input: $i) {{ {SESSION_FIELDS} }} }}"
LOGIN = f"mutation($i: LoginInput!) {{ login(input: $i) {{ {SESSION_FIELDS} }} }}"
REFRESH = f"mutation($i: RefreshInput!) {{ refresh(input: $i) {{ {SESSION_FIELDS} }} }}"
VERIFY_OTP = f"mutation($i: VerifyOtpInput!) {{ verifyOtp(input: $i) {{ {SESSION_FIELDS} }} }}"
LOGOUT = "mutation($i: LogoutInput!) { logout(input: $i) { revoked } }"
ME = "{ me { id email emailVerified otpEnabled createdAt } }"

CHALLENGE_FIELDS = """
    __typename
    ... on OtpChallenge { challengeToken method purpose expiresIn }
    ... on AuthError { code message field retryAfter }
"""
REQUEST_LOGIN_CODE = (
    f"mutation($i: EmailInput!) {{ requestLoginCode(input: $i) {{ {CHALLENGE_FIELDS} }} }}"
)
REQUEST_PASSWORD_RESET = (
    f"mutation($i: EmailInput!) {{ requestPasswordReset(input: $i) {{ {CHALLENGE_FIELDS} }} }}"
)
REQUEST_EMAIL_VERIFICATION = f"mutation {{ requestEmailVerification {{ {CHALLENGE_FIELDS} }} }}"
RESEND_OTP = f"mutation($i: ResendOtpInput!) {{ resendOtp(input: $i) {{ {CHALLENGE_FIELDS} }} }}"
RESET_PASSWORD = (
    f"mutation($i: ResetPasswordInput!) {{ resetPassword(input: $i) {{ {SESSION_FIELDS} }} }}"
)
CHANGE_PASSWORD = (
    f"mutation($i: ChangePasswordInput!) {{ changePassword(input: $i) {{ {SESSION_FIELDS} }} }}"
)
SESSIONS = "{ sessions { id createdAt lastUsedAt userAgent ipAddress current } }"
REVOKE_SESSION = "mutation($i: RevokeSessionInput!) { revokeSession(input: $i) { revoked } }"


async def post(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /graphql as a client does, with a bearer token where one is given."""
    sent = dict(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    return await client.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=sent
    )


async def gql(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The body of an answer that must be a 200."""
    response = await post(client, query, variables, token=token, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def signup(client: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    body = await gql(client, SIGNUP, {"i": {"email": email, "password": password}})
    result: dict[str, Any] = body["data"]["signup"]
    return result


async def login(client: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    body = await gql(client, LOGIN, {"i": {"email": email, "password": password}})
    result: dict[str, Any] = body["data"]["login"]
    return result


async def refresh(client: httpx.AsyncClient, token: str | None) -> dict[str, Any]:
    body = await gql(client, REFRESH, {"i": {"refreshToken": token}})
    result: dict[str, Any] = body["data"]["refresh"]
    return result


async def logout(client: httpx.AsyncClient, token: str | None, everywhere: bool = False) -> int:
    body = await gql(client, LOGOUT, {"i": {"refreshToken": token, "everywhere": everywhere}})
    return int(body["data"]["logout"]["revoked"])


async def verify_otp(client: httpx.AsyncClient, challenge_token: str, code: str) -> dict[str, Any]:
    body = await gql(client, VERIFY_OTP, {"i": {"challengeToken": challenge_token, "code": code}})
    result: dict[str, Any] = body["data"]["verifyOtp"]
    return result


async def mutate(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """The one field a mutation document answers."""
    body = await gql(client, query, variables, token=token)
    assert "errors" not in body, body
    (result,) = body["data"].values()
    assert isinstance(result, dict)
    return result


async def signed_up(
    client: httpx.AsyncClient, smtp: SmtpSink, email: str | None = None
) -> tuple[str, dict[str, Any]]:
    """A new account, its address proven with the mailed code: (email, first session)."""
    email = email or f"user-{secrets.token_hex(4)}@example.com"
    challenge = await signup(client, email, PASSWORD)
    assert challenge["__typename"] == "OtpChallenge", challenge
    mail = await smtp.wait_for(email)
    session = await verify_otp(client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession", session
    return email, session


async def signed_in(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, Any]:
    """A password sign-in that must answer the session."""
    session = await login(client, email, password)
    assert session["__typename"] == "AuthSession", session
    return session


_PROVE_ADDRESS = (
    update(User)
    .where(User.email_normalized == bindparam("address"), User.email_verified_at.is_(None))
    .values(email_verified_at=bindparam("now"))
)


async def prove_address(client: httpx.AsyncClient, email: str) -> None:
    """Test set-up for apps without a mail sink: the address counts as proven, as the
    code mailed to it would make it (the mail flows themselves are tested with a real
    SMTP server). Two-factor can only be turned on for a proven address."""
    app = cast(Starlette, cast(Any, client._transport).app)
    services = app.state.services
    async with services.auth.statements.transaction() as tx:
        now = services.auth.clock.now()
        await tx.execute(_PROVE_ADDRESS, {"address": email.lower(), "now": now})


async def prove_address_in(database_url: str, email: str) -> None:
    """prove_address for a server in another process, through its database."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(_PROVE_ADDRESS, {"address": email.lower(), "now": datetime.now(UTC)})
    finally:
        await engine.dispose()


async def signed_up_and_proven(client: httpx.AsyncClient, email: str) -> dict[str, Any]:
    """A signup (straight into a session: verification off) whose address is proven."""
    session = await signup(client, email, PASSWORD)
    assert session["__typename"] == "AuthSession", session
    await prove_address(client, email)
    return session
