"""Step-up: reauthenticate (the contract's stepup.graphql)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.types import Info

from graph.context import Context
from graph.inputs import ReauthenticateInput
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import answer
from graph.types import AuthResult


@strawberry.type
class StepUpMutation:
    @strawberry.mutation(
        description=(
            "Proves that the signed-in user is present. Answers this same session re-issued"
            " with a fresh sign-in time (same session, new tokens), or an OtpChallenge"
            " (purpose REAUTHENTICATE: the TOTP step after a right password where two-factor"
            " is on, or the emailed code where the password is omitted) that verifyOtp"
            " completes with that answer. Wrong attempts count as a login's do."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def reauthenticate(
        self, info: Info[Context, Any], input: ReauthenticateInput
    ) -> AuthResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        return await answer(
            info,
            input,
            lambda: ctx.services.auth.reauthenticate(
                user=user,
                claims=claims,
                password=input.password,
                email_code=input.email_code,
                client=ctx.client,
            ),
        )
