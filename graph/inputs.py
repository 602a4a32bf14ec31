"""GraphQL input types of the client contract."""

from __future__ import annotations

import strawberry

from graph.types import PasskeyAttachment


@strawberry.input
class SignupInput:
    email: str
    password: str | None = strawberry.field(
        default=None,
        description=(
            "Omit for an account without a password: it proves its address by the emailed"
            " code and signs in by emailed code. See the reauthenticate mutation."
        ),
    )


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
    password: str | None = strawberry.field(
        default=None,
        description=(
            "The current password. May be omitted where this session signed in recently"
            " (see the reauthenticate mutation)."
        ),
    )
    code: str = strawberry.field(description="A current TOTP code or an unused recovery code.")


@strawberry.input
class ChangeEmailInput:
    new_email: str
    password: str | None = strawberry.field(
        default=None,
        description=(
            "The current password. May be omitted where this session signed in recently"
            " (see the reauthenticate mutation)."
        ),
    )
    code: str | None = strawberry.field(
        default=None,
        description=(
            "A current TOTP code or an unused recovery code: needed where two-factor is on"
            " and this session signed in without it."
        ),
    )


@strawberry.input
class DeleteAccountInput:
    password: str | None = strawberry.field(
        default=None,
        description=(
            "The current password. May be omitted where this session signed in recently"
            " (see the reauthenticate mutation)."
        ),
    )
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
    current_password: str | None = strawberry.field(
        default=None,
        description=(
            "The current password. May be omitted where this session signed in recently"
            " (see the reauthenticate mutation): that is how an account without a password"
            " sets one."
        ),
    )
    new_password: str


@strawberry.input
class ReauthenticateInput:
    password: str | None = strawberry.field(
        default=None,
        description=(
            "The current password. Omitted: the answer is an OtpChallenge (REAUTHENTICATE)"
            " whose code is mailed to the account's address; where the user has passkeys it"
            " also carries passkeyOptionsJson (passkeys.graphql), and with emailCode false"
            " nothing is mailed."
        ),
    )
    email_code: bool = strawberry.field(
        default=True, description="Where the password is omitted: mail a code (default true)."
    )


@strawberry.input
class RevokeSessionInput:
    id: strawberry.ID


@strawberry.input
class StartPasskeyRegistrationInput:
    attachment: PasskeyAttachment | None = strawberry.field(
        default=strawberry.UNSET,
        description="Where the authenticator may keep it; omit for either.",
    )


@strawberry.input
class FinishPasskeyRegistrationInput:
    challenge_token: str
    credential_json: str = strawberry.field(
        description="The authenticator's answer: RegistrationResponseJSON as text."
    )
    name: str | None = strawberry.field(
        default=strawberry.UNSET,
        description="A name to tell this passkey apart; defaults to the authenticator's make.",
    )


@strawberry.input
class StartPasskeyLoginInput:
    email: str | None = strawberry.field(
        default=strawberry.UNSET,
        description=(
            "Optional. Without it the options allow any discoverable passkey (browser"
            ' autofill, "Sign in with a passkey" buttons); with it they list that account\'s'
            " passkeys, and the answer looks the same whether or not the email is registered"
            " or has passkeys."
        ),
    )


@strawberry.input
class FinishPasskeyLoginInput:
    challenge_token: str = strawberry.field(
        description=(
            "From startPasskeyLogin, or from an OtpChallenge whose passkeyOptionsJson is set."
            " For a REAUTHENTICATE challenge, send the session's bearer token too: the answer"
            " is that same session re-issued."
        )
    )
    credential_json: str = strawberry.field(
        description="The authenticator's answer: AuthenticationResponseJSON as text."
    )
    device_token: str | None = strawberry.field(default=strawberry.UNSET)


@strawberry.input
class RenamePasskeyInput:
    id: strawberry.ID
    name: str


@strawberry.input
class DeletePasskeyInput:
    id: strawberry.ID


@strawberry.input
class UpdateProfileInput:
    profile_json: str | None = strawberry.field(
        default=None,
        description=(
            "Replaces the profile: a JSON object as text, at most 4 KiB; null leaves it as it is."
        ),
    )
    locale: str | None = strawberry.field(
        default=None,
        description='A language tag among the server\'s; null leaves it as it is, "" clears it.',
    )


@strawberry.input
class SignInWithIdTokenInput:
    provider: str
    id_token: str = strawberry.field(
        description=(
            "The ID token the provider's SDK gave the app (Sign in with Apple, Google Sign-In,"
            " ...)."
        )
    )
    nonce: str | None = strawberry.field(
        default=None,
        description=(
            "The raw nonce the app generated, where it sent one (hashed or not) to the provider."
        ),
    )
    name: str | None = strawberry.field(
        default=None,
        description=(
            "The user's name where the SDK gave it to the app (Sign in with Apple does, once)."
        ),
    )
    device_token: str | None = None


@strawberry.input
class ExchangeSignInCodeInput:
    code: str = strawberry.field(description="The one-time code the redirect came back with.")
    code_verifier: str = strawberry.field(
        description="The PKCE verifier whose S256 hash went to /auth/{provider}/authorize."
    )
    device_token: str | None = None


@strawberry.input
class StartIdentityLinkInput:
    provider: str
    redirect_to: str = strawberry.field(
        description=(
            "One of the configured redirect URLs; gets ?code=... back, for exchangeSignInCode."
        )
    )
    code_challenge: str


@strawberry.input
class UnlinkIdentityInput:
    provider: str
