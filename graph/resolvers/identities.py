"""Signing in with another identity provider (the contract's identities.graphql):
identityProviders, signInWithIdToken, exchangeSignInCode, startIdentityLink, unlinkIdentity
(User.identities lists the linked ones). The redirect itself is graph/identity_routes.py."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.types import Info

from db.errors import AuthFailure
from db.security.access import AccessClaims
from graph.context import Context
from graph.inputs import (
    ExchangeSignInCodeInput,
    SignInWithIdTokenInput,
    StartIdentityLinkInput,
    UnlinkIdentityInput,
)
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import answer, reject_control_characters
from graph.types import (
    AuthError,
    AuthResult,
    IdentityLinkStart,
    IdentityLinkStartResult,
    IdentityProvider,
    User,
    UserResult,
)


@strawberry.type
class IdentityQuery:
    @strawberry.field(description="The providers users may sign in with, as configured.")
    def identity_providers(self, info: Info[Context, Any]) -> list[IdentityProvider]:
        return [
            IdentityProvider.from_view(view)
            for view in info.context.services.auth.identities.list_providers()
        ]


@strawberry.type
class IdentityMutation:
    @strawberry.mutation(
        description=(
            "Signs in (or signs up) with a provider's ID token. Answers an OtpChallenge where"
            " the account has two-factor on, as a password login does."
        )
    )
    async def sign_in_with_id_token(
        self, info: Info[Context, Any], input: SignInWithIdTokenInput
    ) -> AuthResult:
        ctx = info.context

        async def run() -> Any:
            return await ctx.services.auth.identities.sign_in_with_id_token(
                provider_id=input.provider,
                id_token=input.id_token,
                nonce=input.nonce or None,
                name=input.name or None,
                client=ctx.client_with(input.device_token or None),
            )

        return await answer(info, input, run)

    @strawberry.mutation(
        description=(
            "Completes a redirect sign-in. For a link started with startIdentityLink, send the"
            " session's bearer token too: the answer is that same session re-issued."
        )
    )
    async def exchange_sign_in_code(
        self, info: Info[Context, Any], input: ExchangeSignInCodeInput
    ) -> AuthResult:
        ctx = info.context

        async def run() -> Any:
            bearer: AccessClaims | None = None
            if ctx.bearer_token() is not None:
                try:
                    _user, bearer = await ctx.signed_in()
                except StrawberryGraphQLError:
                    bearer = None  # an ended session links nothing; a sign-in needs none
            return await ctx.services.auth.identity_redirects.exchange(
                code=input.code,
                code_verifier=input.code_verifier,
                client=ctx.client_with(input.device_token or None),
                bearer=bearer,
            )

        return await answer(info, input, run)

    @strawberry.mutation(
        description="Links another provider account to the signed-in user, by a redirect.",
        permission_classes=[IsAuthenticated],
    )
    async def start_identity_link(
        self, info: Info[Context, Any], input: StartIdentityLinkInput
    ) -> IdentityLinkStartResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            url = await ctx.services.auth.identity_redirects.start_link(
                user=user,
                claims=claims,
                provider_id=input.provider,
                redirect_to=input.redirect_to,
                code_challenge=input.code_challenge,
                client=ctx.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return IdentityLinkStart(authorize_url=url)

    @strawberry.mutation(
        description=(
            "Refused (INVALID_INPUT) where it would leave the account with no way to sign in;"
            " the emailed code counts as a way in where mail is on."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def unlink_identity(
        self, info: Info[Context, Any], input: UnlinkIdentityInput
    ) -> UserResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            view = await ctx.services.auth.identities.unlink(
                user=user, claims=claims, provider_id=input.provider, client=ctx.client
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return User.from_view(view)
