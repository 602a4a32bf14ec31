"""Input rules: email normalization and syntax, password policy, control characters."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

import orjson
from email_validator import EmailNotValidError, validate_email

from db.errors import AuthFailure, ErrorCode, invalid_input
from db.models import USER_AGENT_MAX

EMAIL_MAX_LENGTH = 254
PASSWORD_MAX_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Email:
    address: str  # as given: trimmed, NFC; where mail goes
    normalized: str  # what uniqueness and look-ups use


# Unicode's control characters (general category Cc): C0, DEL and C1, exactly these.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def has_control_characters(value: str) -> bool:
    return _CONTROL_CHARACTER.search(value) is not None


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


PROFILE_MAX_BYTES = 4096
PROFILE_MAX_DEPTH = 32  # objects and arrays within each other
# A BCP 47 tag as users' locales take it: a language, and optionally a script and a region.
_LANGUAGE_TAG = re.compile(r"([A-Za-z]{2,3})(?:-([A-Za-z]{4}))?(?:-([A-Za-z]{2}|[0-9]{3}))?")


def parse_profile(text: str) -> str:
    """A profile as stored: the compact JSON of an object (at most PROFILE_MAX_BYTES) whose
    keys and strings hold no control characters; INVALID_INPUT (field profileJson)
    otherwise."""
    if len(text) > 4 * PROFILE_MAX_BYTES:  # however it is spaced, too big: not even parsed
        raise invalid_input(
            f"profileJson must be at most {PROFILE_MAX_BYTES} bytes (as compact JSON).",
            "profileJson",
        )
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise invalid_input("profileJson must be JSON text.", "profileJson") from None
    if not isinstance(value, dict):
        raise invalid_input("profileJson must be a JSON object.", "profileJson")
    if _depth(value) > PROFILE_MAX_DEPTH:
        raise invalid_input(
            f"profileJson must not nest objects and arrays more than {PROFILE_MAX_DEPTH} deep.",
            "profileJson",
        )
    if _holds_control_characters(value):
        raise invalid_input(
            "profileJson must not contain control characters in its keys or strings.",
            "profileJson",
        )
    stored = orjson.dumps(value).decode("utf-8")
    if len(stored.encode("utf-8")) > PROFILE_MAX_BYTES:
        raise invalid_input(
            f"profileJson must be at most {PROFILE_MAX_BYTES} bytes (as compact JSON).",
            "profileJson",
        )
    return stored


def _depth(value: object) -> int:
    """How deep objects and arrays nest in `value` (walked without recursion)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= PROFILE_MAX_DEPTH:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _holds_control_characters(value: object) -> bool:
    if isinstance(value, str):
        return has_control_characters(value)
    if isinstance(value, dict):
        return any(
            _holds_control_characters(key) or _holds_control_characters(item)
            for key, item in value.items()
        )
    if isinstance(value, list):
        return any(_holds_control_characters(item) for item in value)
    return False


def parse_locale(tag: str, languages: tuple[str, ...]) -> str:
    """`tag` as stored (language lowercase, Script titlecase, REGION uppercase) where its
    language is one of `languages`; INVALID_INPUT (field locale) otherwise."""
    found = _LANGUAGE_TAG.fullmatch(tag.strip())
    if found is None or found.group(1).lower() not in languages:
        raise invalid_input(
            "locale must be a language tag of one of the server's languages: "
            + ", ".join(languages)
            + ".",
            "locale",
        )
    language, script, region = found.groups()
    parts = [language.lower()]
    if script:
        parts.append(script.title())
    if region:
        parts.append(region.upper())
    return "-".join(parts)
