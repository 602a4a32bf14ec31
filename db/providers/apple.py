"""Sign in with Apple's client secret: not a fixed string but a JWT (ES256) signed with the
developer's private key, at most six months valid. Strawgate signs one from the key in
CLIENT_SECRET and renews it an hour before it expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from db.providers.config import AppleKey

APPLE_AUDIENCE = "https://appleid.apple.com"
LIFETIME = timedelta(days=1)
RENEW_BEFORE = timedelta(hours=1)


def key_problem(pem: str) -> str | None:
    """Why `pem` is not a Sign in with Apple key (a P-256 private key), or None."""
    try:
        key = ECKey.import_key(pem)
    except (JoseError, ValueError, TypeError):
        return "is not a PEM private key (the .p8 file's text)"
    if not key.is_private or key.curve_name != "P-256":
        return "must be the P-256 private key of a Sign in with Apple key (the .p8 file)"
    return None


class AppleClientSecret:
    def __init__(self, key: AppleKey, client_id: str) -> None:
        self._key = key
        self._client_id = client_id
        self._private = ECKey.import_key(key.pem)
        self._secret: str | None = None
        self._expires: datetime | None = None

    def current(self, now: datetime) -> str:
        """The client secret to send now: the kept one, or a new one where it would expire
        within the hour."""
        if self._secret is None or self._expires is None or now >= self._expires - RENEW_BEFORE:
            expires = now + LIFETIME
            claims = {
                "iss": self._key.team_id,
                "iat": int(now.timestamp()),
                "exp": int(expires.timestamp()),
                "aud": APPLE_AUDIENCE,
                "sub": self._client_id,
            }
            header = {"alg": "ES256", "kid": self._key.key_id}
            self._secret = jwt.encode(header, claims, self._private, algorithms=["ES256"])
            self._expires = expires
        return self._secret
