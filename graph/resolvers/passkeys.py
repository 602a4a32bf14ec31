"""Passkeys of the signed-in user: startPasskeyRegistration, finishPasskeyRegistration,
renamePasskey, deletePasskey (User.passkeys lists them); and signing in with one:
startPasskeyLogin, finishPasskeyLogin."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.types import Info

from db.errors import AuthFailure, invalid_input
from db.security.access import AccessClaims
from db.validation import has_control_characters
from graph.context import Context
from graph.inputs import (
    DeletePasskeyInput,
    FinishPasskeyLoginInput,
    FinishPasskeyRegistrationInput,
    RenamePasskeyInput,
    StartPasskeyLoginInput,
    StartPasskeyRegistrationInput,
)
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import answer, reject_control_characters
from graph.types import (
    AuthError,
    AuthResult,
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

    # Signing in needs no signed-in user: the Authorization header is read only for a
    # step-up's challenge (see `bearer`), so an expired access token never blocks a sign-in.
    @strawberry.mutation(description="Starts a passkey sign-in; needs no signed-in user.")
    async def start_passkey_login(
        self, info: Info[Context, Any], input: StartPasskeyLoginInput
    ) -> PasskeyCeremonyResult:
        ctx = info.context
        try:
            reject_control_characters(info, input)
            issued = await ctx.services.auth.start_passkey_login(
                email=input.email or None, client=ctx.client
            )
        except AuthFailure as failure:
            ctx.services.metrics.operation(info.field_name, failure.code.value)
            return AuthError.from_failure(failure)
        ctx.services.metrics.operation(info.field_name, "PasskeyCeremony")
        return PasskeyCeremony.from_issued(issued)

    @strawberry.mutation(
        description=(
            "Signs in with a passkey (verified by the user: a PIN or biometrics), completes"
            " the second step of a password login with one, or a step-up. Never followed by"
            " another step. Every refused passkey answers the same INVALID_CREDENTIALS."
        )
    )
    async def finish_passkey_login(
        self, info: Info[Context, Any], input: FinishPasskeyLoginInput
    ) -> AuthResult:
        ctx = info.context

        async def bearer() -> AccessClaims | None:
            # Read for a step-up only: the session it renews must be the caller's.
            if ctx.bearer_token() is None:
                return None
            try:
                _user, claims = await ctx.signed_in()
            except StrawberryGraphQLError:
                return None  # a bad or ended bearer token proves no session
            return claims

        async def run() -> Any:
            # Not reject_control_characters on the whole input: JSON text may be
            # pretty-printed (newlines). The token is checked by its digest, the device
            # token by its MAC; neither may hold a control character.
            for name, value in (
                ("challengeToken", input.challenge_token),
                ("deviceToken", input.device_token or None),
            ):
                if value is not None and has_control_characters(value):
                    raise invalid_input(f"{name} must not contain control characters.", name)
            return await ctx.services.auth.finish_passkey_login(
                challenge_token=input.challenge_token,
                credential_json=input.credential_json,
                client=ctx.client_with(input.device_token or None),
                bearer=bearer,
            )

        return await answer(info, input, run, check_input=False)

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
