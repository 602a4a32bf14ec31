"""The account's lifecycle: changeEmail, exportAccount, deleteAccount (the contract's
lifecycle.graphql)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.types import Info

from db.errors import AuthFailure
from graph.context import Context
from graph.inputs import ChangeEmailInput, DeleteAccountInput
from graph.permissions import IsAuthenticated
from graph.resolvers.account import challenge_result
from graph.resolvers.auth import reject_control_characters
from graph.types import (
    AccountExport,
    AuthError,
    ChallengeResult,
    DeleteAccountOutcome,
    DeleteAccountResult,
)


@strawberry.type
class LifecycleQuery:
    @strawberry.field(
        description=(
            "Everything the service holds about the signed-in user, as one JSON document."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def export_account(self, info: Info[Context, Any]) -> AccountExport:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            generated_at, document = await ctx.services.lifecycle.export(user=user, claims=claims)
        except AuthFailure as failure:
            # A query answers no union: the failure is a GraphQL error with its code.
            raise StrawberryGraphQLError(
                failure.message,
                extensions={"code": failure.code.value, "retryAfter": failure.retry_after},
            ) from None
        return AccountExport(generated_at=generated_at, json=document)


@strawberry.type
class LifecycleMutation:
    @strawberry.mutation(
        description="Mails a code to the new address; verifyOtp with it moves the account there.",
        permission_classes=[IsAuthenticated],
    )
    async def change_email(
        self, info: Info[Context, Any], input: ChangeEmailInput
    ) -> ChallengeResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        return await challenge_result(
            info,
            input,
            lambda: ctx.services.lifecycle.change_email(
                user=user,
                claims=claims,
                new_email=input.new_email,
                password=input.password,
                code=input.code,
                client=ctx.client,
            ),
        )

    @strawberry.mutation(
        description=(
            "Deletes the account: needs the password and, with two-factor on, a current or "
            "recovery code. Every session ends; a last notice goes to the address."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def delete_account(
        self, info: Info[Context, Any], input: DeleteAccountInput
    ) -> DeleteAccountOutcome:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            await ctx.services.lifecycle.delete(
                user=user,
                claims=claims,
                password=input.password,
                code=input.code,
                client=ctx.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        ctx.clear_refresh_cookie()
        return DeleteAccountResult(deleted=True)
