"""Input rules: email normalization and syntax, password policy, control characters."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

from email_validator import EmailNotValidError, validate_email

from db.errors import AuthFailure, ErrorCode, invalid_input
from db.models import USER_AGENT_MAX

EMAIL_MAX_LENGTH = 254
PASSWORD_MAX_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Email:
    address: str  # as given: trimmed, NFC; where mail goes
    normalized: str  # what uniqueness and look-ups use


def has_control_characters(value: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in value)


def parse_email(raw: str) -> Email:
    """Check an address offline and normalize it, or raise INVALID_INPUT (field "email").

    The syntax rules are email-validator's defaults without the DNS check, which is what
    fastapi-mail applies to recipients, so every accepted address can be mailed.
    Normalized: NFC, trimmed, domain IDNA-decoded and lowercased, local part casefolded.
    No provider rules (dots, +tags).
    """
    address = unicodedata.normalize("NFC", raw.strip())
    if not address:
        raise invalid_input("Enter an email address.", "email")
    if len(address) > EMAIL_MAX_LENGTH:
        raise invalid_input(f"An email address has at most {EMAIL_MAX_LENGTH} characters.", "email")
    try:
        result = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise invalid_input(f"This email address is not valid: {_reason(exc)}", "email") from None
    local = unicodedata.normalize("NFC", result.local_part.casefold())
    normalized = f"{local}@{result.domain.lower()}"
    if len(normalized) > EMAIL_MAX_LENGTH:
        raise invalid_input(f"An email address has at most {EMAIL_MAX_LENGTH} characters.", "email")
    return Email(address=address, normalized=normalized)


def _reason(error: EmailNotValidError) -> str:
    """email-validator's reason, where it names no part of the value: people type
    passwords into email fields, and answers end up in client logs."""
    reason = str(error).split(":")[0].rstrip(".")
    if any(mark in reason for mark in "'\"()`"):
        return "check what comes before and after the @-sign."
    return reason[:1].lower() + reason[1:] + "."


def normalize_password(raw: str) -> str:
    """NFKC first, so that every later rule and the hash see one form of the password."""
    return unicodedata.normalize("NFKC", raw)


@cache
def common_passwords() -> frozenset[str]:
    """zxcvbn's list of the 30,000 most common passwords, shipped with the package."""
    text = resources.files("db.data").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip().casefold() for line in text.splitlines() if line and not line.startswith("#")
    )


def could_be_a_password(password: str) -> bool:
    """Whether an (NFKC-normalized) password is one any account could have: nothing else
    is ever hashed, so an over-long input costs no argon2 time."""
    return 0 < len(password) <= PASSWORD_MAX_LENGTH


def check_new_password(password: str, *, min_length: int, field: str = "password") -> None:
    """NIST SP 800-63B: length bounds and a blocklist, no composition rules.
    `password` is already NFKC-normalized."""
    if len(password) < min_length:
        raise AuthFailure(
            ErrorCode.WEAK_PASSWORD,
            f"Use at least {min_length} characters.",
            field=field,
        )
    if len(password) > PASSWORD_MAX_LENGTH:
        raise AuthFailure(
            ErrorCode.WEAK_PASSWORD,
            f"Use at most {PASSWORD_MAX_LENGTH} characters.",
            field=field,
        )
    if password.casefold() in common_passwords():
        raise AuthFailure(
            ErrorCode.WEAK_PASSWORD,
            "This password is one of the most commonly used passwords; choose another.",
            field=field,
        )


def clean_user_agent(value: str | None) -> str | None:
    """User agents are stored for the user to see: control characters dropped, length capped."""
    if not value:
        return None
    cleaned = "".join(ch for ch in value if unicodedata.category(ch) != "Cc")
    return cleaned[:USER_AGENT_MAX] or None
