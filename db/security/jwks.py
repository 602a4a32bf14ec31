"""Asymmetric access-token keys (ES256, RS256): a JSON Web Key Set in JWT_KEYS, inline or
as a file path. The first key signs; every key verifies (by `kid`); the public parts are
published at /.well-known/jwks.json, so that a resource server needs nothing but that URL.

Rotation: add the new key second (it is published, verifies nothing yet), then move it
first (it signs; the old one still verifies), then drop the old one once the longest
access-token lifetime has passed."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk

ASYMMETRIC_ALGORITHMS = {"ES256": "EC", "RS256": "RSA"}
# The members of each key type a public JWK carries (RFC 7518, 6.2 and 6.3).
_PUBLIC_MEMBERS = {"EC": ("kty", "crv", "x", "y"), "RSA": ("kty", "n", "e")}
_PRIVATE_MEMBER = "d"


class KeySetError(ValueError):
    """JWT_KEYS cannot be used: the message says why (never a key's value)."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private_jwk: dict[str, Any] | None  # None: verifies only (a key being retired)
    public_jwk: dict[str, Any]


def thumbprint(public: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required public members, in order, as the key's id."""
    members = {name: public[name] for name in sorted(_PUBLIC_MEMBERS[public["kty"]])}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":")).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def load_keys(value: str, algorithm: str) -> list[SigningKey]:
    """The keys of a JWKS (or of one JWK) given inline or as a path to a file; the first
    must be a private key of `algorithm`'s type."""
    kty = ASYMMETRIC_ALGORITHMS.get(algorithm)
    if kty is None:
        raise KeySetError(f"{algorithm} takes no key set")
    text = value.strip()
    if not text.startswith("{"):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError:
            raise KeySetError("JWT_KEYS is neither a JSON key set nor a readable file") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise KeySetError("JWT_KEYS is not valid JSON") from None
    entries = document.get("keys", [document]) if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeySetError("JWT_KEYS holds no key")
    keys = [_key(entry, kty, algorithm, position) for position, entry in enumerate(entries)]
    if keys[0].private_jwk is None:
        raise KeySetError("the first key of JWT_KEYS signs: it must be a private key")
    if len({key.kid for key in keys}) != len(keys):
        raise KeySetError("two keys of JWT_KEYS share a kid")
    return keys


def _key(entry: Any, kty: str, algorithm: str, position: int) -> SigningKey:
    where = f"JWT_KEYS key #{position + 1}"
    if not isinstance(entry, dict) or entry.get("kty") != kty:
        raise KeySetError(f"{where} is not a {kty} key (needed for {algorithm})")
    if entry.get("alg") not in (None, algorithm):
        raise KeySetError(f"{where} is for {entry.get('alg')}, not {algorithm}")
    if kty == "EC" and entry.get("crv") != "P-256":
        raise KeySetError(f"{where}: ES256 needs the P-256 curve")
    public = {name: entry.get(name) for name in _PUBLIC_MEMBERS[kty]}
    if not all(isinstance(member, str) for member in public.values()):
        raise KeySetError(f"{where} lacks its public members")
    try:
        constructed = jwk.construct(entry, algorithm)
    except Exception:
        raise KeySetError(f"{where} is not a usable {algorithm} key") from None
    if kty == "RSA" and constructed.prepared_key.key_size < 2048:
        raise KeySetError(f"{where}: RSA keys need at least 2048 bits")
    kid = entry.get("kid") or thumbprint(public)
    published = {**public, "kid": kid, "alg": algorithm, "use": "sig"}
    private = {**entry, "kid": kid, "alg": algorithm} if _PRIVATE_MEMBER in entry else None
    return SigningKey(kid=str(kid), algorithm=algorithm, private_jwk=private, public_jwk=published)


def public_jwks(keys: list[SigningKey]) -> dict[str, Any]:
    return {"keys": [key.public_jwk for key in keys]}


def generate(algorithm: str) -> dict[str, Any]:
    """A new private JWK for `algorithm`, with its thumbprint as kid."""
    if algorithm == "ES256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise KeySetError(f"no key to generate for {algorithm} (ES256 or RS256)")
    from cryptography.hazmat.primitives import serialization

    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    entry = {
        name: (value.decode() if isinstance(value, bytes) else value)
        for name, value in jwk.construct(pem, algorithm).to_dict().items()
    }
    kty = ASYMMETRIC_ALGORITHMS[algorithm]
    entry["kid"] = thumbprint({name: entry[name] for name in _PUBLIC_MEMBERS[kty]})
    entry["alg"] = algorithm
    entry["use"] = "sig"
    return entry
