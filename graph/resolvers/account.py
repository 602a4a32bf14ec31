"""Emailed codes, password reset and change, and the signed-in user's sessions."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import strawberry
from strawberry.types import Info

from db.errors import AuthFailure, invalid_input
from db.services import challenges as ch
from db.services.types import IssuedChallenge
from db.validation import has_control_characters
from graph.context import Context
from graph.inputs import (
    ChangePasswordInput,
    EmailInput,
    ResendOtpInput,
    ResetPasswordInput,
    RevokeSessionInput,
    UpdateProfileInput,
)
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import answer, refuse_as_graphql_error, reject_control_characters
from graph.types import (
    AuthError,
    AuthResult,
    ChallengeResult,
    LogoutResult,
    OtpChallenge,
    Session,
    User,
    UserResult,
)


async def challenge_result(
    info: Info[Context, Any], data: object | None, run: Callable[[], Awaitable[IssuedChallenge]]
) -> ChallengeResult:
    try:
        if data is not None:
            reject_control_characters(info, data)
        issued = await run()
    except AuthFailure as failure:
        return AuthError.from_failure(failure)
    return OtpChallenge.from_issued(issued)


@strawberry.type
class AccountQuery:
    @strawberry.field(
        description="The signed-in user's live sessions, newest first.",
        permission_classes=[IsAuthenticated],
    )
    async def sessions(self, info: Info[Context, Any]) -> list[Session]:
        user, claims = await info.context.signed_in()
        views = await info.context.services.account.sessions(user=user, claims=claims)
        return [Session.from_view(view) for view in views]


@strawberry.type
class AccountMutation:
    @strawberry.mutation(
        description=("Replaces the signed-in user's profile and sets the language of their mails."),
        permission_classes=[IsAuthenticated],
    )
    async def update_profile(
        self, info: Info[Context, Any], input: UpdateProfileInput
    ) -> UserResult:
        ctx = info.context
        user, _claims = await ctx.signed_in()
        try:
            # Not reject_control_characters on the whole input: JSON text may be
            # pretty-printed (newlines); the profile's own strings are checked parsed.
            if input.locale is not None and has_control_characters(input.locale):
                raise invalid_input("locale must not contain control characters.", "locale")
            await ctx.services.account.update_profile(
                user=user, profile_json=input.profile_json, locale=input.locale
            )
            ctx.profile = None  # read again for this answer's fields
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return User.from_view(user)

    @strawberry.mutation(
        description="Mails a code to the signed-in user's address; answered with its challenge.",
        permission_classes=[IsAuthenticated],
    )
    async def request_email_verification(self, info: Info[Context, Any]) -> ChallengeResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        return await challenge_result(
            info,
            None,
            lambda: ctx.services.account.request_email_verification(
                user=user, claims=claims, client=ctx.client
            ),
        )

    @strawberry.mutation(
        description=(
            "Mails a sign-in code; the answer looks the same whether or not the email is "
            "registered."
        )
    )
    async def request_login_code(
        self, info: Info[Context, Any], input: EmailInput
    ) -> ChallengeResult:
        ctx = info.context
        return await challenge_result(
            info,
            input,
            lambda: ctx.services.account.request_code(
                email=input.email, purpose=ch.LOGIN, client=ctx.client
            ),
        )

    @strawberry.mutation(
        description=(
            "Mails a reset code; the answer looks the same whether or not the email is registered."
        )
    )
    async def request_password_reset(
        self, info: Info[Context, Any], input: EmailInput
    ) -> ChallengeResult:
        ctx = info.context
        return await challenge_result(
            info,
            input,
            lambda: ctx.services.account.request_code(
                email=input.email, purpose=ch.RESET_PASSWORD, client=ctx.client
            ),
        )

    @strawberry.mutation(description="Mails a new code for an emailed challenge.")
    async def resend_otp(self, info: Info[Context, Any], input: ResendOtpInput) -> ChallengeResult:
        account = info.context.services.account
        return await challenge_result(
            info,
            input,
            lambda: account.resend(
                challenge_token=input.challenge_token, client=info.context.client
            ),
        )

    @strawberry.mutation(
        description="Sets a new password with an emailed code; ends every other session."
    )
    async def reset_password(
        self, info: Info[Context, Any], input: ResetPasswordInput
    ) -> AuthResult:
        ctx = info.context
        return await answer(
            info,
            input,
            lambda: ctx.services.account.reset_password(
                challenge_token=input.challenge_token,
                code=input.code,
                new_password=input.new_password,
                client=ctx.client,
            ),
        )

    @strawberry.mutation(
        description=(
            "Needs the current password, or a recent sign-in (how an account without one"
            " sets its first); ends every other session."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def change_password(
        self, info: Info[Context, Any], input: ChangePasswordInput
    ) -> AuthResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        return await answer(
            info,
            input,
            lambda: ctx.services.account.change_password(
                user=user,
                claims=claims,
                current_password=input.current_password,
                new_password=input.new_password,
                client=ctx.client,
            ),
        )

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def revoke_session(
        self, info: Info[Context, Any], input: RevokeSessionInput
    ) -> LogoutResult:
        user, claims = await info.context.signed_in()
        refuse_as_graphql_error(info, input)
        revoked = await info.context.services.account.revoke_session(
            user=user, session_id=str(input.id), client=info.context.client
        )
        if revoked and _same_session(str(input.id), claims.session_id):
            info.context.clear_refresh_cookie()  # this very session ended
        return LogoutResult(revoked=revoked)


def _same_session(given: str, current: uuid.UUID) -> bool:
    try:
        return uuid.UUID(given) == current
    except ValueError:
        return False
