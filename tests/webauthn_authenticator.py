"""A software WebAuthn authenticator (and the browser around it) for the tests: an EC P-256
key made with `cryptography`, attestation "none", authenticator data with the flags chosen
(UP, UV, BE, BS), a settable AAGUID and sign count, and clientDataJSON with the type,
challenge and origin given. It answers creation options with RegistrationResponseJSON and
request options with AuthenticationResponseJSON, as `credential.toJSON()` does."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP = 0x01  # user present
UV = 0x04  # user verified
BE = 0x08  # backup eligible
BS = 0x10  # backed up
AT = 0x40  # attested credential data included

ES256 = -7
NO_AAGUID = uuid.UUID(int=0)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def options_of(options_json: str | dict[str, Any]) -> dict[str, Any]:
    return json.loads(options_json) if isinstance(options_json, str) else options_json


@dataclass
class SoftAuthenticator:
    """One credential on one authenticator. Every keyword of `register` and `assertion`
    overrides what an honest authenticator and browser would send, to make a bad answer."""

    rp_id: str = "example.com"
    origin: str = "https://example.com"
    aaguid: uuid.UUID = NO_AAGUID
    user_present: bool = True
    user_verified: bool = True
    backup_eligible: bool = True
    backed_up: bool = True
    sign_count: int = 0
    transports: list[str] = field(default_factory=lambda: ["hybrid", "internal"])
    attachment: str | None = "platform"
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    # What the last registration stored: the account's user handle.
    user_handle: bytes | None = None

    def cose_public_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,  # kty: EC2
                3: ES256,  # alg
                -1: 1,  # crv: P-256
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    def flags(self, **overrides: bool) -> int:
        chosen = {
            "up": self.user_present,
            "uv": self.user_verified,
            "be": self.backup_eligible,
            "bs": self.backed_up,
            **overrides,
        }
        return (
            (UP if chosen["up"] else 0)
            | (UV if chosen["uv"] else 0)
            | (BE if chosen["be"] else 0)
            | (BS if chosen["bs"] else 0)
        )

    def authenticator_data(
        self, *, rp_id: str | None = None, attested: bool, flags: int | None = None
    ) -> bytes:
        rp_id_hash = hashlib.sha256((rp_id or self.rp_id).encode("utf-8")).digest()
        value = self.flags() if flags is None else flags
        data = rp_id_hash + bytes([value | (AT if attested else 0)])
        data += struct.pack(">I", self.sign_count)
        if attested:
            data += self.aaguid.bytes + struct.pack(">H", len(self.credential_id))
            data += self.credential_id + self.cose_public_key()
        return data

    def client_data(
        self, kind: str, challenge: str, *, origin: str | None = None, cross_origin: bool = False
    ) -> bytes:
        return json.dumps(
            {
                "type": kind,
                "challenge": challenge,
                "origin": origin or self.origin,
                "crossOrigin": cross_origin,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    def register(
        self,
        options_json: str | dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        kind: str = "webauthn.create",
        flags: int | None = None,
    ) -> str:
        """navigator.credentials.create() with these creation options, then toJSON()."""
        options = options_of(options_json)
        self.user_handle = from_b64url(options["user"]["id"])
        client_data = self.client_data(kind, challenge or options["challenge"], origin=origin)
        attestation = cbor2.dumps(
            {
                "fmt": "none",
                "attStmt": {},
                "authData": self.authenticator_data(
                    rp_id=rp_id or options["rp"]["id"], attested=True, flags=flags
                ),
            }
        )
        credential: dict[str, Any] = {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": self.transports,
            },
            "clientExtensionResults": {},
        }
        if self.attachment is not None:
            credential["authenticatorAttachment"] = self.attachment
        return json.dumps(credential)

    def assertion(
        self,
        options_json: str | dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        kind: str = "webauthn.get",
        flags: int | None = None,
        count: int | None = None,
    ) -> str:
        """navigator.credentials.get() with these request options, then toJSON() (the
        WebAuthn "assert" operation). The sign count goes up by one unless `count`."""
        options = options_of(options_json)
        self.sign_count = count if count is not None else self.sign_count + 1
        client_data = self.client_data(kind, challenge or options["challenge"], origin=origin)
        data = self.authenticator_data(
            rp_id=rp_id or options.get("rpId") or self.rp_id, attested=False, flags=flags
        )
        signature = self.key.sign(
            data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        credential: dict[str, Any] = {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(data),
                "signature": b64url(signature),
                "userHandle": b64url(self.user_handle) if self.user_handle else None,
            },
            "clientExtensionResults": {},
        }
        if self.attachment is not None:
            credential["authenticatorAttachment"] = self.attachment
        return json.dumps(credential)
