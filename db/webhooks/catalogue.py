"""The webhook event types, as receivers see them (`type` of the payload)."""

from __future__ import annotations

from typing import Final

USER_CREATED: Final = "user.created"
USER_EMAIL_VERIFIED: Final = "user.email_verified"
USER_EMAIL_CHANGED: Final = "user.email_changed"
USER_PASSWORD_CHANGED: Final = "user.password_changed"  # noqa: S105 - an event type
USER_TWO_FACTOR_ENABLED: Final = "user.two_factor_enabled"
USER_TWO_FACTOR_DISABLED: Final = "user.two_factor_disabled"
USER_PASSKEY_ADDED: Final = "user.passkey_added"
USER_PASSKEY_REMOVED: Final = "user.passkey_removed"
USER_IDENTITY_LINKED: Final = "user.identity_linked"
USER_IDENTITY_UNLINKED: Final = "user.identity_unlinked"
USER_ROLES_CHANGED: Final = "user.roles_changed"
USER_DISABLED: Final = "user.disabled"
USER_ENABLED: Final = "user.enabled"
USER_DELETED: Final = "user.deleted"
SESSION_CREATED: Final = "session.created"
SESSION_REVOKED: Final = "session.revoked"

EVENT_TYPES: Final[tuple[str, ...]] = (
    USER_CREATED,
    USER_EMAIL_VERIFIED,
    USER_EMAIL_CHANGED,
    USER_PASSWORD_CHANGED,
    USER_TWO_FACTOR_ENABLED,
    USER_TWO_FACTOR_DISABLED,
    USER_PASSKEY_ADDED,
    USER_PASSKEY_REMOVED,
    USER_IDENTITY_LINKED,
    USER_IDENTITY_UNLINKED,
    USER_ROLES_CHANGED,
    USER_DISABLED,
    USER_ENABLED,
    USER_DELETED,
    SESSION_CREATED,
    SESSION_REVOKED,
)
