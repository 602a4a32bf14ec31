"""Device tokens (after OWASP's "Slow Down Online Guessing Attacks with Device Cookies"):
proof that a client signed in to an account before, so that it keeps a brute-force
budget of its own while strangers exhaust the account's.

A token is `<payload>.<mac>`: the payload names the user, the account's device epoch
(raised by logout everywhere and a password reset, which ends every token issued
before), an expiry and a random device id; the MAC is HMAC-SHA-256 under a key derived
from SECRET_KEY. Nothing is stored: checking a token needs the key and the user's
current epoch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from db.clock import Clock
from db.security.limiter import client_key

MAX_DEVICE_TOKEN_LENGTH = 256
_VERSION = "d1"


@dataclass(frozen=True, slots=True)
class DeviceClaims:
    user_id: uuid.UUID
    epoch: int
    device_id: str  # random, 128 bits: the key of this device's own budget


class DeviceTokens:
    def __init__(self, *, key: bytes, lifetime: timedelta, clock: Clock) -> None:
        self._key = key
        self.lifetime = lifetime
        self._clock = clock

    def issue(self, user_id: uuid.UUID, epoch: int, device_id: str | None = None) -> str:
        """A token for this client; `device_id` keeps the one it had (a renewal)."""
        expires = int((self._clock.now() + self.lifetime).timestamp())
        device = device_id or secrets.token_urlsafe(16)
        payload = f"{_VERSION}.{user_id.hex}.{epoch}.{expires}.{device}"
        return f"{payload}.{self._mac(payload)}"

    def check(self, token: str | None, *, user_id: uuid.UUID, epoch: int) -> DeviceClaims | None:
        """The token's claims when it is ours, unexpired, for this user and this epoch;
        None otherwise (a bad device token is no worse than none)."""
        claims = self.read(token)
        if claims is None or claims.user_id != user_id or claims.epoch != epoch:
            return None
        return claims

    def read(self, token: str | None) -> DeviceClaims | None:
        """The claims of a genuine, unexpired token, whoever's it is."""
        if not token or len(token) > MAX_DEVICE_TOKEN_LENGTH or not token.isascii():
            return None
        payload, _, mac = token.rpartition(".")
        if not hmac.compare_digest(mac.encode("ascii"), self._mac(payload).encode("ascii")):
            return None
        parts = payload.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        _version, user_hex, epoch, expires, device = parts
        try:
            user_id = uuid.UUID(hex=user_hex)
            expires_at = datetime.fromtimestamp(int(expires), tz=self._clock.now().tzinfo)
            claims = DeviceClaims(user_id=user_id, epoch=int(epoch), device_id=device)
        except ValueError:
            return None
        if expires_at <= self._clock.now():
            return None
        return claims

    def budget_key(self, ip: str | None, token: str | None) -> str:
        """Whose budget a client's attempts spend: the device its genuine device token
        names, else its address (IPv6 by /64)."""
        held = self.read(token)
        return f"device:{held.device_id}" if held is not None else client_key(ip)

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
