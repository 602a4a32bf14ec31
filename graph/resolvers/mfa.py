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


async def _signed_in(info: Info[Context, Any]) -> UserView:
    view = await info.context.user()
    if view is None:  # pragma: no cover - IsAuthenticated let the request through
        raise RuntimeError("no signed-in user")
    return view


async def _new_codes(
    info: Info[Context, Any],
    data: object,
    run: Callable[[TwoFactor, UserView], Awaitable[list[str]]],
) -> RecoveryCodesResult:
    """Checks the input, runs the service for the signed-in user, and answers the fresh
    recovery codes or the expected failure."""
    user = await _signed_in(info)
    try:
        reject_control_characters(info, data)
        codes = await run(info.context.services.auth.two_factor, user)
    except AuthFailure as failure:
        return AuthError.from_failure(failure)
    return RecoveryCodes(codes=codes)


@strawberry.type
class MfaMutation:
    @strawberry.mutation(
        description="Starts enrolment; two-factor stays off until confirmTotp.",
        permission_classes=[IsAuthenticated],
    )
    async def setup_totp(self, info: Info[Context, Any]) -> TotpSetupResult:
        user = await _signed_in(info)
        try:
            enrolment = await info.context.services.auth.two_factor.setup(
                user_id=user.id, email=user.email
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return TotpSetup.from_enrolment(enrolment)

    @strawberry.mutation(
        description="Turns two-factor on and returns fresh recovery codes.",
        permission_classes=[IsAuthenticated],
    )
    async def confirm_totp(
        self, info: Info[Context, Any], input: ConfirmTotpInput
    ) -> RecoveryCodesResult:
        return await _new_codes(
            info,
            input,
            lambda mfa, user: mfa.confirm(
                user_id=user.id, email=user.email, code=input.code, client=info.context.client
            ),
        )

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def disable_totp(self, info: Info[Context, Any], input: DisableTotpInput) -> UserResult:
        user = await _signed_in(info)
        try:
            reject_control_characters(info, input)
            await info.context.services.auth.two_factor.disable(
                user_id=user.id,
                email=user.email,
                password=input.password,
                code=input.code,
                client=info.context.client,
            )
        except AuthFailure as failure:
            return AuthError.from_failure(failure)
        return User.from_view(dataclasses.replace(user, otp_enabled=False))

    @strawberry.mutation(permission_classes=[IsAuthenticated])
    async def regenerate_recovery_codes(
        self, info: Info[Context, Any], input: RegenerateRecoveryCodesInput
    ) -> RecoveryCodesResult:
        return await _new_codes(
            info,
            input,
            lambda mfa, user: mfa.regenerate_recovery_codes(
                user_id=user.id, code=input.code, client=info.context.client
            ),
        )
