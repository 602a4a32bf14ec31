"""Two-factor: setupTotp, confirmTotp, disableTotp, regenerateRecoveryCodes."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import strawberry
from strawberry.types import Info

from db.errors import AuthFailure
from db.services.mfa import TwoFactor
from db.services.types import UserView
from graph.context import Context
from graph.inputs import ConfirmTotpInput, DisableTotpInput, RegenerateRecoveryCodesInput
from graph.permissions import IsAuthenticated
from graph.resolvers.auth import reject_control_characters
from graph.types import (
    AuthError,
    RecoveryCodes,
    RecoveryCodesResult,
    TotpSetup,
    TotpSetupResult,
    User,
    UserResult,
)


async def _new_codes(
    info: Info[Context, Any],
    data: object,
    run: Callable[[TwoFactor, UserView, str], Awaitable[list[str]]],
) -> RecoveryCodesResult:
    """Checks the input and that the session signed in recently, runs the service for
    the signed-in user (with its wrong-code budget), and answers the fresh recovery codes
    or the expected failure."""
    ctx = info.context
    user, claims = await ctx.signed_in()
    auth = ctx.services.auth
    try:
        reject_control_characters(info, data)
        auth.require_recent(claims)
        # The session's own device token proves nothing beyond the session.
        budget = await auth.trust.budget_of(ctx.client, user.id, not_session=claims.session_id)
        codes = await run(auth.two_factor, user, budget)
    except AuthFailure as failure:
        return AuthError.from_failure(failure)
    return RecoveryCodes(codes=codes)


@strawberry.type
class MfaMutation:
    @strawberry.mutation(
        description=(
            "Starts enrolment; two-factor stays off until confirmTotp. Needs a verified"
            " address and a recent sign-in (else REAUTHENTICATION_REQUIRED)."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def setup_totp(self, info: Info[Context, Any]) -> TotpSetupResult:
        user, claims = await info.context.signed_in()
        auth = info.context.services.auth
        try:
            auth.require_recent(claims)
            enrolment = await auth.two_factor.setup(user=user)
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return TotpSetup.from_enrolment(enrolment)

    @strawberry.mutation(
        description=(
            "Turns two-factor on and returns fresh recovery codes. Needs a recent sign-in"
            " (else REAUTHENTICATION_REQUIRED)."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def confirm_totp(
        self, info: Info[Context, Any], input: ConfirmTotpInput
    ) -> RecoveryCodesResult:
        return await _new_codes(
            info,
            input,
            lambda mfa, user, budget: mfa.confirm(
                user=user, code=input.code, client=info.context.client, budget=budget
            ),
        )

    @strawberry.mutation(
        description=(
            "Turns two-factor off: a current or recovery code, and the password (or a recent"
            " sign-in)."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def disable_totp(self, info: Info[Context, Any], input: DisableTotpInput) -> UserResult:
        ctx = info.context
        user, claims = await ctx.signed_in()
        try:
            reject_control_characters(info, input)
            await ctx.services.account.disable_totp(
                user=user,
                claims=claims,
                password=input.password,
                code=input.code,
                client=ctx.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return User.from_view(dataclasses.replace(user, otp_enabled=False))

    @strawberry.mutation(
        description=(
            "Replaces every recovery code; needs a current TOTP code and a recent sign-in"
            " (else REAUTHENTICATION_REQUIRED)."
        ),
        permission_classes=[IsAuthenticated],
    )
    async def regenerate_recovery_codes(
        self, info: Info[Context, Any], input: RegenerateRecoveryCodesInput
    ) -> RecoveryCodesResult:
        return await _new_codes(
            info,
            input,
            lambda mfa, user, budget: mfa.regenerate_recovery_codes(
                user_id=user.id, code=input.code, client=info.context.client, budget=budget
            ),
        )
