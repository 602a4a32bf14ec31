"""Secrets at rest (TOTP secrets): encrypted with MultiFernet under ENCRYPTION_KEYS."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class UndecryptableSecret(ValueError):
    """A secret that none of ENCRYPTION_KEYS decrypts."""


class SecretBox:
    """The first key encrypts; every key decrypts, so a key is rotated by putting a new
    one first and re-encrypting (`strawgate rotate-keys`), then dropping the old one."""

    def __init__(self, keys: list[str]) -> None:
        self._fernet = MultiFernet([Fernet(key.encode("ascii")) for key in keys])

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except InvalidToken as exc:
            raise UndecryptableSecret(
                "a secret could not be decrypted with ENCRYPTION_KEYS"
            ) from exc

    def reseal(self, sealed: str) -> str:
        """The same secret under the first key."""
        try:
            return self._fernet.rotate(sealed.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise UndecryptableSecret(
                "a secret could not be decrypted with ENCRYPTION_KEYS"
            ) from exc
