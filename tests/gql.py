"""Helpers to speak GraphQL to the app the way a client does."""

from __future__ import annotations

from typing import Any

import httpx

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
