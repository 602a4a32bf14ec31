"""What the services answer, and what they are told about the client."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# What proving each factor adds to a session's `amr` (RFC 8176). An emailed code is
# "otp" (as Microsoft's identity platform documents it); "mfa" needs a second factor of
# the user's own: an authenticator code or a recovery code.
AMR_PASSWORD = ["pwd"]
AMR_EMAIL_CODE = ["otp"]
AMR_TOTP = ["otp", "mfa"]
AMR_RECOVERY_CODE = ["mfa"]
# A passkey verified by its user (PIN, biometrics) is something held and something known
# or are: multi-factor alone. "hwk" where the key cannot leave its device (not backup
# eligible), "swk" for a synced one.
AMR_PASSKEY_DEVICE_BOUND = ["hwk", "user", "mfa"]
AMR_PASSKEY_SYNCED = ["swk", "user", "mfa"]


@dataclass(frozen=True, slots=True)
class UserView:
    id: uuid.UUID
    email: str
    email_verified: bool
    otp_enabled: bool
    created_at: datetime
    # False for an account that signs in only by emailed code (no password set).
    has_password: bool = True
    # What device tokens of the account carry (see db/security/device.py).
    device_epoch: int = 0
    # Granted by operators, sorted: the access token's "roles" claim (read where tokens are
    # issued: a sign-in, a refresh, a step-up; not on every request).
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedSession:
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserView
    # Proof this client signed in to the account (its own brute-force budget later).
    device_token: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    """A further step is needed: the challenge token goes back with the code."""

    challenge_token: str
    method: str  # "TOTP" or "EMAIL"
    purpose: str  # "LOGIN", "VERIFY_EMAIL", "RESET_PASSWORD", "CHANGE_EMAIL", "REAUTHENTICATE"
    expires_in: int
    # Request options for answering it with a passkey instead (finishPasskeyLogin): only
    # on a step of a proven party (a TOTP step, a step-up) whose user has passkeys.
    passkey_options_json: str | None = None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    ip: str | None = None
    user_agent: str | None = None
    # A device token the client presented (body or cookie), unchecked.
    device_token: str | None = None
    # The request's Accept-Language, bounded (db/mail/languages.py): a signup keeps the
    # mail language it asks for.
    accept_language: str | None = None


@dataclass(frozen=True, slots=True)
class SessionView:
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    user_agent: str | None
    ip: str | None
    current: bool


def user_view(row: Mapping[str, Any], id_key: str = "id") -> UserView:
    return UserView(
        id=row[id_key],
        email=row["email"],
        email_verified=row["email_verified_at"] is not None,
        otp_enabled=row.get("otp_confirmed_at") is not None,
        created_at=row["created_at"],
        has_password=bool(row["has_password"]),
        device_epoch=row.get("device_epoch") or 0,
        roles=tuple(sorted((row.get("roles") or "").split())),
    )


def merge_amr(*parts: list[str] | tuple[str, ...]) -> list[str]:
    """RFC 8176 methods, in the order first proven, each once."""
    merged: list[str] = []
    for part in parts:
        for method in part:
            if method and method not in merged:
                merged.append(method)
    return merged
