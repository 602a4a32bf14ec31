"""Opaque tokens (refresh) stored as digests, and derived keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

REFRESH_TOKEN_BYTES = 32  # 256 bits
MAX_OPAQUE_TOKEN_LENGTH = 128


def derive_key(secret: str, purpose: str) -> bytes:
    """A 256-bit key for one purpose, derived from SECRET_KEY with HKDF-SHA-256."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"strawgate:{purpose}".encode()
    ).derive(secret.encode("utf-8"))


def new_opaque_token() -> str:
    return secrets.token_urlsafe(REFRESH_TOKEN_BYTES)


def token_digest(token: str) -> bytes:
    """SHA-256: a 256-bit random token needs neither salt nor a slow hash."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def successor_token(key: bytes, token: str) -> str:
    """The refresh token that follows `token`. Derived with a keyed hash rather than
    drawn at random, so that a retry of a just-rotated token can be answered with the
    same successor without that successor ever being stored in plaintext."""
    mac = hmac.new(key, token.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def looks_like_opaque_token(value: str) -> bool:
    return 0 < len(value) <= MAX_OPAQUE_TOKEN_LENGTH and value.isascii()
