"""Device tokens (after OWASP's "Slow Down Online Guessing Attacks with Device Cookies"):
proof that a client signed in to an account before, so that it keeps a brute-force
budget of its own while strangers exhaust the account's.

A token is `<payload>.<mac>`: the payload names the user, the account's device epoch
(raised by logout everywhere, a password change or reset, which ends every token issued
before), an expiry, a random device id and the session it was issued with; the MAC is
HMAC-SHA-256 under a key derived from SECRET_KEY. Nothing of it is stored: a token is
good when its MAC holds, it is unexpired, it names the account it is shown for at that
account's current epoch, and its session did not end by a revocation (the service checks
the last two: AuthService.device_of). A session that ended by its own logout, by the
session cap or by going idle leaves its device's token good: the device is still the
owner's."""

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
_VERSION = "d2"


@dataclass(frozen=True, slots=True)
class DeviceClaims:
    user_id: uuid.UUID
    epoch: int
    device_id: str  # random, 128 bits: the key of this device's own budget
    session_id: uuid.UUID  # the session it was issued with: a revocation of it ends it


class DeviceTokens:
    def __init__(self, *, key: bytes, lifetime: timedelta, clock: Clock) -> None:
        self._key = key
        self.lifetime = lifetime
        self._clock = clock

    def issue(
        self, user_id: uuid.UUID, epoch: int, session_id: uuid.UUID, device_id: str | None = None
    ) -> str:
        """A token for this client, issued with `session_id`; `device_id` keeps the one it
        had (a renewal)."""
        expires = int((self._clock.now() + self.lifetime).timestamp())
        device = device_id or secrets.token_urlsafe(16)
        payload = f"{_VERSION}.{user_id.hex}.{epoch}.{expires}.{device}.{session_id.hex}"
        return f"{payload}.{self._mac(payload)}"

    def check(self, token: str | None, *, user_id: uuid.UUID) -> DeviceClaims | None:
        """The token's claims when it is ours, unexpired and for this user; None otherwise
        (a bad device token is no worse than none). The epoch and the session are the
        caller's to check against the database."""
        claims = self.read(token)
        if claims is None or claims.user_id != user_id:
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
        if len(parts) != 6 or parts[0] != _VERSION:
            return None
        _version, user_hex, epoch, expires, device, session_hex = parts
        try:
            expires_at = datetime.fromtimestamp(int(expires), tz=self._clock.now().tzinfo)
            claims = DeviceClaims(
                user_id=uuid.UUID(hex=user_hex),
                epoch=int(epoch),
                device_id=device,
                session_id=uuid.UUID(hex=session_hex),
            )
        except ValueError:
            return None
        if expires_at <= self._clock.now():
            return None
        return claims

    def budget_key(self, ip: str | None, token: str | None) -> str:
        """Whose budget a client's attempts on one challenge spend: the device its
        genuine device token names, else its address (IPv6 by /64). Budgets of an
        account take only a device token that is good for that account (see
        AuthService.device_of)."""
        held = self.read(token)
        return device_budget(held) if held is not None else client_key(ip)

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def device_budget(claims: DeviceClaims) -> str:
    """The key of a device's own budget."""
    return f"device:{claims.device_id}"
