"""What every passkey ceremony shares: the WebAuthn challenge derived from a challenge's
token, the request options a sign-in or a second step hands to the authenticator, and the
decoy credentials listed for an address that has no passkeys.

The WebAuthn challenge is never stored: it is derived from the ceremony's token (whose
SHA-256 alone is stored), so an OtpChallenge can carry request options without any extra
storage, and an answer made for one ceremony cannot finish another."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, select
from webauthn import generate_authentication_options, options_to_json
from webauthn.helpers.structs import (
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    UserVerificationRequirement,
)

from db.models import Passkey
from db.session import Runner
from db.settings import RelyingParty

PASSKEY = "PASSKEY"  # the challenges' method of a passkey ceremony
PASSKEY_REGISTER = "PASSKEY_REGISTER"  # its purposes: a registration,
PASSKEY_LOGIN = "PASSKEY_LOGIN"  # and a sign-in ("sign-in" ceremonies)
CEREMONY_LIFETIME = timedelta(minutes=5)

CREDENTIALS = (
    select(Passkey.credential_id, Passkey.transports)
    .where(Passkey.user_id == bindparam("uid"))
    .order_by(Passkey.created_at, Passkey.id)
)

# Decoys: as many as most accounts hold (one to three), each a body and a 16-byte tag
# (HMAC of the body under a key of its own: the server alone can tell a decoy, and refuses
# to register one, see is_decoy), as long as the IDs of Windows Hello and most software
# authenticators (32 bytes) and security keys (64). Shorter real IDs (Google Password
# Manager 16 bytes, iCloud Keychain 20) leave room for no tag: decoys never take them.
DECOY_TAG_BYTES = 16
DECOY_MIN_BYTES, DECOY_MAX_BYTES = 32, 64
_DECOY_LENGTHS = (32, 32, 32, 48, 64)
# What a platform or phone passkey lists (most real passkeys; the software authenticator's
# too): usable on this device or from a phone.
_DECOY_TRANSPORTS = [AuthenticatorTransport.HYBRID, AuthenticatorTransport.INTERNAL]


@dataclass(frozen=True, slots=True)
class IssuedCeremony:
    """A ceremony to hand to the authenticator: its token, options and lifetime."""

    challenge_token: str
    options_json: str
    expires_in: int


def webauthn_challenge(token: str) -> bytes:
    """The WebAuthn challenge of the ceremony `token` names: derived from the token, so
    nothing but the token's digest is stored, and distinct from that digest (a database
    reader learns no ceremony's challenge)."""
    return hashlib.sha256(b"strawgate:webauthn-challenge:" + token.encode("utf-8")).digest()


def transports(stored: str | None) -> list[AuthenticatorTransport] | None:
    if not stored:
        return None
    known = {transport.value: transport for transport in AuthenticatorTransport}
    return [known[value] for value in stored.split() if value in known] or None


def descriptors(rows: Sequence[Mapping[str, Any]]) -> list[PublicKeyCredentialDescriptor]:
    return [
        PublicKeyCredentialDescriptor(
            id=bytes(row["credential_id"]), transports=transports(row["transports"])
        )
        for row in rows
    ]


class PasskeyOptions:
    """Request options (navigator.credentials.get) for a ceremony's token."""

    def __init__(self, *, relying_party: RelyingParty | None, decoy_key: bytes) -> None:
        self.relying_party = relying_party
        self._decoy_key = decoy_key
        # A key of its own for the decoys' tags, derived from the decoys' key.
        self._tag_key = hmac.new(decoy_key, b"strawgate:passkey-decoy-tag", "sha256").digest()

    def request(self, token: str, allowed: list[PublicKeyCredentialDescriptor]) -> str:
        """The options as JSON text: user verification required (a passkey signs in
        alone), the RP ID, and `allowed` (empty: any discoverable passkey)."""
        assert self.relying_party is not None  # noqa: S101 - callers check it is on
        options = generate_authentication_options(
            rp_id=self.relying_party.id,
            challenge=webauthn_challenge(token),
            timeout=int(CEREMONY_LIFETIME.total_seconds() * 1000),
            allow_credentials=allowed,
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        return options_to_json(options)

    async def for_user(self, tx: Runner, user_id: uuid.UUID, token: str) -> str | None:
        """Options listing the user's passkeys for the challenge `token` names (a step the
        user has reached by a proven first factor, or a step-up); None where the user has
        none, or passkeys are off."""
        if self.relying_party is None:
            return None
        rows = await tx.all(CREDENTIALS, {"uid": user_id})
        return self.request(token, descriptors(rows)) if rows else None

    def decoys(self, address: str) -> list[PublicKeyCredentialDescriptor]:
        """Credential IDs for an address without passkeys (unknown, or an account that
        has none): derived by HMAC under the server's key from the normalized address, so
        the same on every call, as many and as long as real ones look, each ending in its
        tag (is_decoy)."""
        seed = hmac.new(self._decoy_key, b"count\x00" + address.encode(), "sha256").digest()
        found = []
        for index in range(1 + seed[0] % 3):
            digest = hmac.new(
                self._decoy_key, b"id\x00%d\x00" % index + address.encode(), "sha512"
            ).digest()
            length = _DECOY_LENGTHS[digest[0] % len(_DECOY_LENGTHS)]
            body = (digest + hashlib.sha512(digest).digest())[1 : 1 + length - DECOY_TAG_BYTES]
            ident = body + self._tag(body)
            found.append(PublicKeyCredentialDescriptor(id=ident, transports=_DECOY_TRANSPORTS))
        return found

    def is_decoy(self, credential_id: bytes) -> bool:
        """Whether a credential ID is one of this server's decoys (its tag checks out):
        refused at registration exactly as an ID already registered is, so registering
        a listed ID tells nobody whether it was real."""
        if not DECOY_MIN_BYTES <= len(credential_id) <= DECOY_MAX_BYTES:
            return False
        body, tag = credential_id[:-DECOY_TAG_BYTES], credential_id[-DECOY_TAG_BYTES:]
        return hmac.compare_digest(tag, self._tag(body))

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._tag_key, body, "sha256").digest()[:DECOY_TAG_BYTES]
