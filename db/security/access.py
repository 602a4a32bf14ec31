"""Access tokens: short-lived JWTs (python-jose), decoded with everything pinned."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from db.clock import Clock
from db.security.jwks import SigningKey

ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type
# Clock skew tolerated between servers when checking `iat` (python-jose ignores a future iat).
IAT_LEEWAY_SECONDS = 60
MAX_ACCESS_TOKEN_LENGTH = 4096


class InvalidAccessToken(Exception):
    """The bearer token is not one of ours, or no longer valid. Never says why to clients."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    amr: tuple[str, ...]
    # When the user last proved a credential on the session (RFC 9068 / OIDC auth_time):
    # the token's own claim (None in a token without one), capped by the session's once
    # the per-request check has read it.
    auth_time: datetime | None = None


class AccessTokenCodec:
    def __init__(
        self,
        *,
        key: str,
        algorithm: str,
        issuer: str,
        audience: str,
        lifetime: timedelta,
        clock: Clock,
        cache_size: int = 4096,
        keys: list[SigningKey] | None = None,
    ) -> None:
        # HS*: `key` (SECRET_KEY). ES256/RS256: `keys` (JWT_KEYS), the first signs, each
        # verifies the tokens that name it by `kid`.
        self._key = key
        self._keys = {signing.kid: signing for signing in keys or []}
        self._signer = keys[0] if keys else None
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self.lifetime = lifetime
        self._clock = clock
        self._verified: Callable[[str], _Verified] = lru_cache(maxsize=cache_size)(self._verify)
        self._options = {
            "verify_signature": True,
            "verify_aud": True,
            "verify_iat": True,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
            "require_aud": True,
            "require_iat": True,
            "require_exp": True,
            "require_iss": True,
            "require_sub": True,
            "require_jti": True,
            "leeway": 0,
        }

    def public_jwks(self) -> dict[str, Any] | None:
        """What /.well-known/jwks.json publishes; None for a shared-secret algorithm."""
        if self._signer is None:
            return None
        return {"keys": [signing.public_jwk for signing in self._keys.values()]}

    def issue(
        self,
        *,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        amr: list[str],
        auth_time: datetime,
        roles: tuple[str, ...] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed access token. `extra` (the claims hook's) comes first: Strawgate's own
        claims are set after it, so no extra claim can change them."""
        now = self._clock.now()
        claims = {
            **(extra or {}),
            "auth_time": int(auth_time.timestamp()),
            "sub": str(user_id),
            "sid": str(session_id),
            "jti": uuid.uuid4().hex,
            "iat": int(now.timestamp()),
            "exp": int((now + self.lifetime).timestamp()),
            "iss": self._issuer,
            "aud": self._audience,
            "amr": list(amr),
            # Granted by operators (sorted; [] for none): resource servers authorize by it.
            "roles": list(roles),
        }
        if self._signer is not None:
            return str(
                jwt.encode(
                    claims,
                    self._signer.private_jwk,
                    algorithm=self._algorithm,
                    headers={"typ": ACCESS_TOKEN_TYPE, "kid": self._signer.kid},
                )
            )
        return str(
            jwt.encode(
                claims, self._key, algorithm=self._algorithm, headers={"typ": ACCESS_TOKEN_TYPE}
            )
        )

    def decode(self, token: str) -> AccessClaims:
        """The claims of a valid access token, else InvalidAccessToken."""
        if not token or len(token) > MAX_ACCESS_TOKEN_LENGTH:
            raise InvalidAccessToken
        verified = self._verified(token)
        now = self._clock.now().timestamp()
        # On the injected clock, on every use (python-jose checked the wall clock once).
        if verified.exp <= now or verified.iat > now + IAT_LEEWAY_SECONDS:
            raise InvalidAccessToken
        return verified.claims

    def _verify(self, token: str) -> _Verified:
        """Signature, algorithm, type and claims: what never changes for one token. A
        client sends the same access token with every request of its lifetime, so the
        result is kept in a bounded LRU (failures are not kept); what depends on time is
        checked in decode() on every request."""
        try:
            # Trusted only once the signature holds: `typ` below; here, which key to try.
            header = jwt.get_unverified_header(token)
            verifying_key: Any = self._key
            if self._signer is not None:
                # The token names its key; only keys of our set, of our algorithm, count.
                named = self._keys.get(str(header.get("kid")))
                if named is None:
                    raise InvalidAccessToken
                verifying_key = named.public_jwk
            # The algorithm list is pinned: a token cannot choose `none` or another key type.
            claims: dict[str, Any] = jwt.decode(
                token,
                verifying_key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=self._options,
            )
        except (JOSEError, ValueError, TypeError) as exc:
            raise InvalidAccessToken from exc
        # python-jose does not look at `typ`; checked only after the signature holds.
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise InvalidAccessToken
        exp, iat, amr = claims.get("exp"), claims.get("iat"), claims.get("amr", [])
        if not isinstance(exp, int) or not isinstance(iat, int):
            raise InvalidAccessToken
        auth_time = claims.get("auth_time")
        try:
            return _Verified(
                claims=AccessClaims(
                    user_id=uuid.UUID(str(claims["sub"])),
                    session_id=uuid.UUID(str(claims["sid"])),
                    amr=tuple(str(value) for value in amr) if isinstance(amr, list) else (),
                    auth_time=datetime.fromtimestamp(auth_time, UTC)
                    if isinstance(auth_time, int) and not isinstance(auth_time, bool)
                    else None,
                ),
                exp=exp,
                iat=iat,
            )
        except (KeyError, ValueError, OverflowError, OSError) as exc:
            raise InvalidAccessToken from exc


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: AccessClaims
    exp: int
    iat: int
