"""Emailed one-time codes: six digits from a CSPRNG, stored as a keyed digest.

A six-digit code under a plain hash is no secret (a million candidates), so the digest is
HMAC-SHA-256 under a key derived with HKDF from SECRET_KEY, with the challenge's id as
context: a leaked digest is useless without the key, and equal codes of two challenges
have unrelated digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

EMAIL_CODE_DIGITS = 6


def new_email_code() -> str:
    return f"{secrets.randbelow(10**EMAIL_CODE_DIGITS):0{EMAIL_CODE_DIGITS}d}"


def normalize_email_code(code: str) -> str | None:
    """Six ASCII digits, as typed (spaces and a dash in the middle allowed), or None."""
    cleaned = code.replace(" ", "").replace("-", "")
    if len(cleaned) != EMAIL_CODE_DIGITS or not (cleaned.isascii() and cleaned.isdigit()):
        return None
    return cleaned


def email_code_digest(secret: str, challenge_id: uuid.UUID, code: str) -> bytes:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"strawgate:email-code:" + challenge_id.bytes,
    ).derive(secret.encode("utf-8"))
    return hmac.new(key, code.encode("ascii"), hashlib.sha256).digest()


def email_code_matches(secret: str, challenge_id: uuid.UUID, code: str, digest: bytes) -> bool:
    normalized = normalize_email_code(code)
    # A malformed code is compared too (against a code no digest can match), so that the
    # time taken does not depend on the input's shape.
    candidate = email_code_digest(secret, challenge_id, normalized or "------")
    return hmac.compare_digest(candidate, digest) and normalized is not None
