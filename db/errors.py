"""Expected failures of the domain. The GraphQL edge maps them to `AuthError`."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_INPUT = "INVALID_INPUT"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    WEAK_PASSWORD = "WEAK_PASSWORD"  # noqa: S105 - an error code
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"
    INVALID_OTP = "INVALID_OTP"
    INVALID_TOKEN = "INVALID_TOKEN"  # noqa: S105 - an error code
    TOKEN_REUSED = "TOKEN_REUSED"  # noqa: S105 - an error code
    RATE_LIMITED = "RATE_LIMITED"
    # Step-up: prove a credential on this session again (reauthenticate), then repeat.
    REAUTHENTICATION_REQUIRED = "REAUTHENTICATION_REQUIRED"
    # Identity providers: the provider failed, refused, or answered what could not be
    # verified; that provider account is linked to another user.
    PROVIDER_ERROR = "PROVIDER_ERROR"
    IDENTITY_ALREADY_LINKED = "IDENTITY_ALREADY_LINKED"


class AuthFailure(Exception):
    """An expected failure: a code, a message safe to show, the input field at fault."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


def invalid_challenge() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_TOKEN,
        "This challenge is invalid or has expired.",
        field="challengeToken",
    )


def invalid_otp() -> AuthFailure:
    return AuthFailure(
        ErrorCode.INVALID_OTP, "The code is incorrect or was already used.", field="code"
    )


def reauthentication_required() -> AuthFailure:
    return AuthFailure(
        ErrorCode.REAUTHENTICATION_REQUIRED,
        "Confirm it is you: sign in again on this session (reauthenticate), then repeat this.",
    )


def invalid_input(message: str, field: str | None = None) -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_INPUT, message, field=field)


def account_disabled() -> AuthFailure:
    return AuthFailure(ErrorCode.ACCOUNT_DISABLED, "This account is disabled.")


def email_taken() -> AuthFailure:
    return AuthFailure(
        ErrorCode.EMAIL_TAKEN, "An account with this email address already exists.", field="email"
    )


class UniqueViolation(Exception):
    """A write hit a unique constraint (a concurrent writer got there first)."""
