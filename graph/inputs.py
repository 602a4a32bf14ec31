"""GraphQL input types of the client contract."""

from __future__ import annotations

import strawberry


@strawberry.input
class SignupInput:
    email: str
    password: str


@strawberry.input
class LoginInput:
    email: str
    password: str
    device_token: str | None = strawberry.UNSET


@strawberry.input
class VerifyOtpInput:
    challenge_token: str
    code: str
    device_token: str | None = strawberry.UNSET


@strawberry.input
class RefreshInput:
    refresh_token: str | None = strawberry.field(
        default=strawberry.UNSET,
        description="Omit where the refresh token travels in an httpOnly cookie.",
    )


@strawberry.input
class LogoutInput:
    refresh_token: str | None = strawberry.field(
        default=strawberry.UNSET,
        description="Omit where the refresh token travels in an httpOnly cookie.",
    )
    everywhere: bool = strawberry.field(
        default=False, description="End every session of the user, not only this one."
    )


@strawberry.input
class ConfirmTotpInput:
    code: str = strawberry.field(
        description="A current code from the authenticator, proving the enrolment worked."
    )


@strawberry.input
class DisableTotpInput:
    password: str
    code: str = strawberry.field(description="A current TOTP code or an unused recovery code.")


@strawberry.input
class ChangeEmailInput:
    new_email: str
    password: str
    code: str | None = strawberry.field(
        default=None,
        description=(
            "A current TOTP code or an unused recovery code: needed where two-factor is on"
            " and this session signed in without it."
        ),
    )


@strawberry.input
class DeleteAccountInput:
    password: str
    code: str | None = strawberry.field(
        default=None,
        description="A current TOTP code or an unused recovery code, where two-factor is on.",
    )


@strawberry.input
class RegenerateRecoveryCodesInput:
    code: str = strawberry.field(description="A current TOTP code.")


@strawberry.input
class EmailInput:
    email: str


@strawberry.input
class ResendOtpInput:
    challenge_token: str


@strawberry.input
class ResetPasswordInput:
    challenge_token: str
    code: str
    new_password: str


@strawberry.input
class ChangePasswordInput:
    current_password: str
    new_password: str


@strawberry.input
class RevokeSessionInput:
    id: strawberry.ID
