"""Passkeys of the signed-in user: startPasskeyRegistration, finishPasskeyRegistration,
renamePasskey, deletePasskey (User.passkeys lists them)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.types import Info

from db.errors import AuthFailure
from graph.context import Context
from graph.inputs import (
    DeletePasskeyInput,
    FinishPasskeyRegistrationInput,
    RenamePasskeyInput,
    StartPasskeyRegistrationInput,
)
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import reject_control_characters
from graph.types import (
    AuthError,
    Passkey,
    PasskeyCeremony,
    PasskeyCeremonyResult,
    PasskeyResult,
    User,
    UserResult,
)


@strawberry.type
class PasskeyMutation:
    @strawberry.mutation(
        description=(
            "Starts registering a passkey for the signed-in user (needs a recent sign-in)."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def start_passkey_registration(
        self, info: Info[Context, Any], input: StartPasskeyRegistrationInput
    ) -> PasskeyCeremonyResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            issued = await ctx.services.passkeys.start_registration(
                user=user,
                claims=claims,
                attachment=str(input.attachment.value) if input.attachment else None,
                client=ctx.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return PasskeyCeremony.from_issued(issued)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def finish_passkey_registration(
        self, info: Info[Context, Any], input: FinishPasskeyRegistrationInput
    ) -> PasskeyResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            # Not reject_control_characters: JSON text may be pretty-printed (newlines);
            # the name is checked as every passkey name is, the token by its digest.
            view = await ctx.services.passkeys.finish_registration(
                user=user,
                claims=claims,
                challenge_token=input.challenge_token,
                credential_json=input.credential_json,
                name=input.name or None,
                client=ctx.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return Passkey.from_view(view)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def rename_passkey(
        self, info: Info[Context, Any], input: RenamePasskeyInput
    ) -> PasskeyResult:
        ctx = info.context
        user, _claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            view = await ctx.services.passkeys.rename(
                user=user, passkey_id=str(input.id), name=input.name
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return Passkey.from_view(view)

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def delete_passkey(
        self, info: Info[Context, Any], input: DeletePasskeyInput
    ) -> UserResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            await ctx.services.passkeys.delete(
                user=user, claims=claims, passkey_id=str(input.id), client=ctx.client
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return User.from_view(user)
