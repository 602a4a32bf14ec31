"""RFC 6238 TOTP as every authenticator app speaks it, and recovery codes."""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
from datetime import datetime

import pyotp
import segno

STEP_SECONDS = 30
DIGITS = 6
# Accept the current step and one either side (clock drift, a code typed at the edge).
WINDOW = 1

RECOVERY_CODE_COUNT = 10
# Crockford's base32: no i, l, o or u, so what is read aloud is typed right. 10 characters
# of 5 bits: 50 bits a code.
_RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RECOVERY_LENGTH = 10
_TYPO_FIXES = str.maketrans({"i": "1", "l": "1", "o": "0", "u": "v"})


def new_secret() -> str:
    """160 bits from the OS CSPRNG, base32 (pyotp.random_base32 uses `secrets`)."""
    return pyotp.random_base32(length=32)


def provisioning_uri(secret: str, *, email: str, issuer: str) -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=email, issuer_name=issuer
    )


def qr_svg(uri: str) -> str:
    """The URI as a QR code: a standalone SVG document (with its namespace, so that it
    shows as an <img> or a file as well as inlined; no XML declaration, so that it can
    be inlined into HTML as it is). No background: a page shows it on white."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(
        out,
        kind="svg",
        scale=4,
        border=4,
        title="Two-factor QR code",
        xmldecl=False,
        svgns=True,
        nl=False,
    )
    return out.getvalue().decode("utf-8")


def step_at(moment: datetime) -> int:
    return int(moment.timestamp()) // STEP_SECONDS


def matching_step(secret: str, code: str, *, now: datetime, after: int | None) -> int | None:
    """The time step whose code `code` is, within the window and after the last accepted
    step `after`; None when there is none. Spaces are ignored: apps show "123 456"."""
    code = "".join(code.split())
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = step_at(now)
    found = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        if after is not None and step <= after:
            continue
        # Every candidate is compared, in constant time, whatever matched before.
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


def new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
    return f"{raw[:5]}-{raw[5:]}"


def normalize_recovery_code(code: str) -> str | None:
    """The canonical form of a typed recovery code, or None when it cannot be one."""
    cleaned = code.strip().lower().replace("-", "").replace(" ", "").translate(_TYPO_FIXES)
    if len(cleaned) != _RECOVERY_LENGTH or any(c not in _RECOVERY_ALPHABET for c in cleaned):
        return None
    return cleaned


def recovery_lookup(key: bytes, normalized: str) -> int:
    """16 bits of a keyed hash: picks the stored hash to verify without revealing the code."""
    return int.from_bytes(hmac.new(key, normalized.encode(), hashlib.sha256).digest()[:2], "big")
