"""signup, login, verifyOtp, refresh, logout and me."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import strawberry
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.types import Info

from db.errors import AuthFailure, ErrorCode, invalid_input
from db.services.types import IssuedChallenge, IssuedSession
from db.validation import has_control_characters
from graph.context import Context
from graph.inputs import LoginInput, LogoutInput, RefreshInput, SignupInput, VerifyOtpInput
from graph.permissions import BearerTokenValid
from graph.types import AuthError, AuthResult, AuthSession, LogoutResult, OtpChallenge, User


def reject_control_characters(info: Info[Context, Any], data: object) -> None:
    """Every string input is refused when it holds a NUL or another control character."""
    converter = info.schema.config.name_converter
    for field in data.__strawberry_definition__.fields:  # type: ignore[attr-defined]
        value = getattr(data, field.python_name)
        if isinstance(value, str) and has_control_characters(value):
            name = converter.get_graphql_name(field)
            raise invalid_input(f"{name} must not contain control characters.", name)


def refuse_as_graphql_error(info: Info[Context, Any], data: object) -> None:
    """For results without an error member (LogoutResult): bad input is refused with a
    GraphQL error instead."""
    try:
        reject_control_characters(info, data)
    except AuthFailure as failure:
        raise StrawberryGraphQLError(
            failure.message, extensions={"code": failure.code.value, "field": failure.field}
        ) from None


async def answer(
    info: Info[Context, Any],
    data: object,
    run: Callable[[], Awaitable[IssuedSession | IssuedChallenge]],
    *,
    check_input: bool = True,
) -> AuthResult:
    """Checks the input (unless `check_input` is false: the caller checks what it holds),
    runs the service, and maps an expected failure to AuthError."""
    ctx = info.context
    try:
        if check_input:
            reject_control_characters(info, data)
        issued = await run()
    except AuthFailure as failure:
        if failure.code is ErrorCode.TOKEN_REUSED:
            ctx.clear_refresh_cookie()  # its session has ended
        ctx.services.metrics.operation(info.field_name, failure.code.value)
        return AuthError.from_failure(failure)
    if isinstance(issued, IssuedChallenge):
        ctx.services.metrics.operation(info.field_name, "OtpChallenge")
        return OtpChallenge.from_issued(issued)
    ctx.services.metrics.operation(info.field_name, "AuthSession")
    return AuthSession.from_issued(
        issued,
        device_token_in_body=ctx.hand_out_device_token(issued.device_token),
        refresh_token_in_body=ctx.hand_out_refresh_token(issued.refresh_token),
    )


@strawberry.type
class AuthQuery:
    @strawberry.field(
        description=(
            "The signed-in user; null when the request carries no bearer token. A bearer token "
            "that fails verification, or whose session has ended, gives a GraphQL error with "
            'extensions.code "UNAUTHENTICATED".'
        ),
        permission_classes=[BearerTokenValid],
    )
    async def me(self, info: Info[Context, Any]) -> User | None:
        view = await info.context.user()
        return User.from_view(view) if view is not None else None


# Operations that need no signed-in user never read the Authorization header: a client
# holding an expired access token can still sign in, refresh and log out.
@strawberry.type
class AuthMutation:
    @strawberry.mutation
    async def signup(self, info: Info[Context, Any], input: SignupInput) -> AuthResult:
        ctx = info.context
        return await answer(
            info,
            input,
            lambda: ctx.services.auth.signup(
                email=input.email, password=input.password, client=ctx.client
            ),
        )

    @strawberry.mutation
    async def login(self, info: Info[Context, Any], input: LoginInput) -> AuthResult:
        ctx = info.context
        return await answer(
            info,
            input,
            lambda: ctx.services.auth.login(
                email=input.email,
                password=input.password,
                client=ctx.client_with(input.device_token or None),
            ),
        )

    @strawberry.mutation
    async def verify_otp(self, info: Info[Context, Any], input: VerifyOtpInput) -> AuthResult:
        ctx = info.context
        return await answer(
            info,
            input,
            lambda: ctx.services.auth.verify_otp(
                challenge_token=input.challenge_token,
                code=input.code,
                client=ctx.client_with(input.device_token or None),
            ),
        )

    @strawberry.mutation
    async def refresh(self, info: Info[Context, Any], input: RefreshInput) -> AuthResult:
        auth = info.context.services.auth
        return await answer(
            info,
            input,
            lambda: auth.refresh(
                refresh_token=info.context.refresh_token(input.refresh_token or None),
                client=info.context.client,
            ),
        )

    @strawberry.mutation(
        description="Ends sessions; an unknown or missing refresh token ends none (revoked: 0)."
    )
    async def logout(self, info: Info[Context, Any], input: LogoutInput) -> LogoutResult:
        refuse_as_graphql_error(info, input)
        revoked = await info.context.services.auth.logout(
            refresh_token=info.context.refresh_token(input.refresh_token or None),
            everywhere=input.everywhere,
            client=info.context.client,
        )
        info.context.clear_refresh_cookie()
        return LogoutResult(revoked=revoked)
