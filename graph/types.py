"""GraphQL object types and enums of the client contract."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any

import strawberry
from strawberry.types import Info

from db.errors import AuthFailure, ErrorCode
from db.services.mfa import TotpEnrolment
from db.services.passkey_options import IssuedCeremony
from db.services.passkeys import PasskeyView
from db.services.signin.identity import LinkedIdentityView, ProviderView
from db.services.types import IssuedChallenge, IssuedSession, SessionView, UserView
from graph.context import Context

AuthErrorCode = strawberry.enum(ErrorCode, name="AuthErrorCode")
# The contract's descriptions of single values (db/ knows nothing of Strawberry).
_CODE_DESCRIPTIONS = {
    ErrorCode.PROVIDER_ERROR.name: (
        "The provider failed, refused, or answered something that could not be verified."
    ),
    ErrorCode.IDENTITY_ALREADY_LINKED.name: "That provider account is linked to another user.",
}
for _value in AuthErrorCode.__strawberry_definition__.values:  # type: ignore[attr-defined]
    _value.description = _CODE_DESCRIPTIONS.get(_value.name, _value.description)


@strawberry.enum
class OtpMethod(Enum):
    TOTP = "TOTP"
    EMAIL = "EMAIL"


@strawberry.enum
class OtpPurpose(Enum):
    LOGIN = "LOGIN"
    VERIFY_EMAIL = "VERIFY_EMAIL"
    RESET_PASSWORD = "RESET_PASSWORD"  # noqa: S105 - a purpose
    CHANGE_EMAIL = "CHANGE_EMAIL"
    REAUTHENTICATE = "REAUTHENTICATE"


async def _own_passkeys(root: User, info: Info[Context, Any]) -> list[Passkey]:
    # Only ever the signed-in user's own (a User is never anyone else's here, but a list
    # of credentials is not what a slip should show).
    viewer = await info.context.user()
    if viewer is None or str(viewer.id) != str(root.id):
        return []
    return [
        Passkey.from_view(view) for view in await info.context.services.passkeys.list(viewer.id)
    ]


async def _own_identities(root: User, info: Info[Context, Any]) -> list[LinkedIdentity]:
    viewer = await info.context.user()
    if viewer is None or str(viewer.id) != str(root.id):
        return []
    views = await info.context.services.auth.identities.identities_of(viewer.id)
    return [LinkedIdentity.from_view(view) for view in views]


async def _own_profile(root: User, info: Info[Context, Any]) -> tuple[str, str | None]:
    ctx = info.context
    viewer = await ctx.user()
    if viewer is None or str(viewer.id) != str(root.id):
        return "{}", None
    if ctx.profile is None:
        ctx.profile = await ctx.services.account.profile(viewer.id)
    return ctx.profile


async def _own_profile_json(root: User, info: Info[Context, Any]) -> str:
    return (await _own_profile(root, info))[0]


async def _own_locale(root: User, info: Info[Context, Any]) -> str | None:
    return (await _own_profile(root, info))[1]


async def _own_roles(root: User, info: Info[Context, Any]) -> list[str]:
    viewer = await info.context.user()
    if viewer is None or str(viewer.id) != str(root.id):
        return []
    return await info.context.services.account.roles(viewer.id)


@strawberry.type(description="A registered account.")
class User:
    id: strawberry.ID
    email: str
    email_verified: bool
    otp_enabled: bool
    created_at: datetime
    has_password: bool = strawberry.field(
        description=(
            "False for an account that signs in only by emailed code (or passkeys, or another"
            " provider)."
        )
    )

    passkeys: list[Passkey] = strawberry.field(
        resolver=_own_passkeys, description="Newest first. Empty for a user without passkeys."
    )
    identities: list[LinkedIdentity] = strawberry.field(
        resolver=_own_identities, description="The provider accounts linked, oldest first."
    )
    profile_json: str = strawberry.field(
        resolver=_own_profile_json,
        description='The user\'s own profile, a JSON object as text ("{}" when empty).',
    )
    locale: str | None = strawberry.field(
        resolver=_own_locale,
        description=(
            "BCP 47 language tag of the user's mails, e.g. \"de\"; null: the server's default."
        ),
    )
    roles: list[str] = strawberry.field(
        resolver=_own_roles,
        description='Set by operators; carried in access tokens as the "roles" claim. Sorted.',
    )

    @classmethod
    def from_view(cls, view: UserView) -> User:
        return cls(
            id=strawberry.ID(str(view.id)),
            email=view.email,
            email_verified=view.email_verified,
            otp_enabled=view.otp_enabled,
            created_at=view.created_at,
            has_password=view.has_password,
        )


@strawberry.type(
    description="A provider this server signs in with; for the buttons of a sign-in page."
)
class IdentityProvider:
    id: str = strawberry.field(
        description='As in /auth/{id}/authorize and signInWithIdToken, e.g. "google".'
    )
    name: str = strawberry.field(description='For display, e.g. "Google".')
    supports_id_token: bool = strawberry.field(
        description="Whether signInWithIdToken takes this provider's ID tokens (false for GitHub)."
    )

    @classmethod
    def from_view(cls, view: ProviderView) -> IdentityProvider:
        return cls(id=view.id, name=view.name, supports_id_token=view.supports_id_token)


@strawberry.type(description="A provider account linked to the signed-in user.")
class LinkedIdentity:
    provider: str
    email: str | None = strawberry.field(description="The address the provider gave, if any.")
    name: str | None = strawberry.field(
        description="The name the provider gave at the first consent, if any."
    )
    linked_at: datetime
    last_used_at: datetime | None

    @classmethod
    def from_view(cls, view: LinkedIdentityView) -> LinkedIdentity:
        return cls(
            provider=view.provider,
            email=view.email,
            name=view.name,
            linked_at=view.linked_at,
            last_used_at=view.last_used_at,
        )


@strawberry.type
class IdentityLinkStart:
    authorize_url: str = strawberry.field(
        description="Send the user's browser here; the provider comes back to the redirect URL."
    )


@strawberry.type(description="A passkey registered to the signed-in user.")
class Passkey:
    id: strawberry.ID
    name: str = strawberry.field(
        description=(
            'Given by the user, else the authenticator\'s make (from its AAGUID), else "Passkey".'
        )
    )
    created_at: datetime
    last_used_at: datetime | None
    backed_up: bool = strawberry.field(
        description="Synced across the user's devices (the WebAuthn backup state)."
    )

    @classmethod
    def from_view(cls, view: PasskeyView) -> Passkey:
        return cls(
            id=strawberry.ID(str(view.id)),
            name=view.name,
            created_at=view.created_at,
            last_used_at=view.last_used_at,
            backed_up=view.backed_up,
        )


@strawberry.type(description="A WebAuthn ceremony to hand to the authenticator.")
class PasskeyCeremony:
    challenge_token: str = strawberry.field(
        description="Send back with the authenticator's answer; single use."
    )
    options_json: str = strawberry.field(description="The WebAuthn options, as JSON text.")
    expires_in: int = strawberry.field(description="Seconds until challengeToken expires.")

    @classmethod
    def from_issued(cls, issued: IssuedCeremony) -> PasskeyCeremony:
        return cls(
            challenge_token=issued.challenge_token,
            options_json=issued.options_json,
            expires_in=issued.expires_in,
        )


@strawberry.enum
class PasskeyAttachment(Enum):
    PLATFORM = strawberry.enum_value(
        "platform",
        description=(
            "On this device: Touch ID, Windows Hello, Android screen lock, a password manager."
        ),
    )
    CROSS_PLATFORM = strawberry.enum_value(
        "cross-platform", description="A security key or a phone used from another device."
    )


@strawberry.type(
    description="A signed-in session: send accessToken as `Authorization: Bearer <token>`."
)
class AuthSession:
    access_token: str
    refresh_token: str | None = strawberry.field(
        description="Null only where the refresh token travels in an httpOnly cookie instead."
    )
    token_type: str = strawberry.field(description='Always "Bearer".')
    expires_in: int = strawberry.field(description="Seconds until accessToken expires.")
    user: User
    device_token: str | None = strawberry.field(
        description=(
            "Proof that this client has signed in to this account; send it with later "
            "logins and code checks. Null where it travels as an HttpOnly cookie instead."
        )
    )

    @classmethod
    def from_issued(
        cls,
        issued: IssuedSession,
        *,
        device_token_in_body: bool = True,
        refresh_token_in_body: bool = True,
    ) -> AuthSession:
        return cls(
            access_token=issued.access_token,
            refresh_token=issued.refresh_token if refresh_token_in_body else None,
            token_type="Bearer",  # noqa: S106 - the scheme, not a secret
            expires_in=issued.expires_in,
            user=User.from_view(issued.user),
            device_token=issued.device_token if device_token_in_body else None,
        )


@strawberry.type(description="A second step is needed: send the code with verifyOtp.")
class OtpChallenge:
    challenge_token: str
    method: OtpMethod
    purpose: OtpPurpose
    expires_in: int = strawberry.field(description="Seconds until challengeToken expires.")
    passkey_options_json: str | None = strawberry.field(
        default=None,
        description=(
            "Set where the user may answer this challenge with a passkey: the TOTP step of a"
            " password login or of a provider sign-in, and a REAUTHENTICATE challenge, of a"
            " user who has passkeys."
            " Request options as JSON text, for finishPasskeyLogin with this challengeToken."
            " Null otherwise, always for emailed-code LOGIN challenges (they must not tell"
            " whether an address is registered or has passkeys)."
        ),
    )

    @classmethod
    def from_issued(cls, issued: IssuedChallenge) -> OtpChallenge:
        return cls(
            challenge_token=issued.challenge_token,
            method=OtpMethod(issued.method),
            purpose=OtpPurpose(issued.purpose),
            expires_in=issued.expires_in,
            passkey_options_json=issued.passkey_options_json,
        )


@strawberry.type(
    description="What an authenticator app needs to enrol: scan qrCodeSvg or type secret."
)
class TotpSetup:
    secret: str = strawberry.field(description="Base32 secret, for typing in by hand.")
    otpauth_uri: str = strawberry.field(
        description="otpauth://totp/... URI, with the issuer and the user's email as label."
    )
    qr_code_svg: str = strawberry.field(
        description="The URI as a QR code, an SVG document ready to show."
    )

    @classmethod
    def from_enrolment(cls, enrolment: TotpEnrolment) -> TotpSetup:
        return cls(
            secret=enrolment.secret,
            otpauth_uri=enrolment.otpauth_uri,
            qr_code_svg=enrolment.qr_code_svg,
        )


@strawberry.type(
    description="Single-use codes for when the authenticator is lost; shown once, stored hashed."
)
class RecoveryCodes:
    codes: list[str]


@strawberry.type(
    description="An expected failure, returned as data rather than as a GraphQL error."
)
class AuthError:
    code: AuthErrorCode  # type: ignore[valid-type]
    message: str = strawberry.field(
        description=(
            "Human-readable, safe to show; never reveals whether an email is registered on login."
        )
    )
    field: str | None = strawberry.field(
        description='The input field at fault, where there is one (e.g. "password").'
    )
    retry_after: int | None = strawberry.field(
        description="Seconds to wait before trying again; set with RATE_LIMITED."
    )

    @classmethod
    def from_failure(cls, failure: AuthFailure) -> AuthError:
        return cls(
            code=failure.code,
            message=failure.message,
            field=failure.field,
            retry_after=failure.retry_after,
        )


AuthResult = Annotated[AuthSession | OtpChallenge | AuthError, strawberry.union("AuthResult")]


TotpSetupResult = Annotated[TotpSetup | AuthError, strawberry.union("TotpSetupResult")]
RecoveryCodesResult = Annotated[RecoveryCodes | AuthError, strawberry.union("RecoveryCodesResult")]
UserResult = Annotated[User | AuthError, strawberry.union("UserResult")]
IdentityLinkStartResult = Annotated[
    IdentityLinkStart | AuthError, strawberry.union("IdentityLinkStartResult")
]
ChallengeResult = Annotated[OtpChallenge | AuthError, strawberry.union("ChallengeResult")]
PasskeyCeremonyResult = Annotated[
    PasskeyCeremony | AuthError, strawberry.union("PasskeyCeremonyResult")
]
PasskeyResult = Annotated[Passkey | AuthError, strawberry.union("PasskeyResult")]


@strawberry.type(
    description="Everything the service holds about the signed-in user, as one JSON document."
)
class AccountExport:
    generated_at: datetime
    json: str = strawberry.field(
        description="JSON: profile, sessions, security events; never a secret or a hash."
    )


@strawberry.type
class DeleteAccountResult:
    deleted: bool


DeleteAccountOutcome = Annotated[
    DeleteAccountResult | AuthError, strawberry.union("DeleteAccountOutcome")
]


@strawberry.type(description="One signed-in device or browser of the user.")
class Session:
    id: strawberry.ID
    created_at: datetime
    last_used_at: datetime
    user_agent: str | None
    ip_address: str | None
    current: bool = strawberry.field(description="True for the session that made this request.")

    @classmethod
    def from_view(cls, view: SessionView) -> Session:
        return cls(
            id=strawberry.ID(str(view.id)),
            created_at=view.created_at,
            last_used_at=view.last_used_at,
            user_agent=view.user_agent,
            ip_address=view.ip,
            current=view.current,
        )


@strawberry.type
class LogoutResult:
    revoked: int = strawberry.field(description="How many sessions were ended.")
