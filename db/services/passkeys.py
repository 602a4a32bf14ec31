"""Passkeys (WebAuthn): registering one for the signed-in user, listing, renaming and
deleting them. Signing in with one is db/services/signin/passkey.py.

A registration is a ceremony in two requests. The start opens a challenge (the
`challenges` table, method PASSKEY) bound to the user and the session that asked, for five
minutes, and stores only the SHA-256 of its token; the WebAuthn challenge the authenticator
signs is derived from the token, so the finish needs no stored challenge and an answer made
for one ceremony cannot complete another. The finish spends the ceremony in the
transaction that adds the passkey."""

from __future__ import annotations

import secrets
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, null, select, update
from webauthn import generate_registration_options, options_to_json, verify_registration_response
from webauthn.helpers import parse_registration_credential_json
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorAttachment,
    AuthenticatorSelectionCriteria,
    CredentialDeviceType,
    RegistrationCredential,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from db.data.authenticators import authenticator_name
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_challenge, invalid_input
from db.models import IP_MAX, Challenge, Passkey, User
from db.security.access import AccessClaims
from db.security.tokens import looks_like_opaque_token, new_opaque_token, token_digest
from db.services.auth import AuthService
from db.services.events import EventKind
from db.services.passkey_options import (
    CEREMONY_LIFETIME,
    CREDENTIALS,
    PASSKEY,
    PASSKEY_REGISTER,
    IssuedCeremony,
    descriptors,
    webauthn_challenge,
)
from db.services.types import ClientInfo, UserView
from db.session import Runner
from db.settings import RelyingParty
from db.validation import clean_user_agent

REGISTRATION_LIFETIME = CEREMONY_LIFETIME
MAX_PASSKEYS = 20
# Registrations started and not finished at once, per account: a bound on the rows a
# client racing itself can make.
MAX_PENDING_REGISTRATIONS = 5
NAME_MAX = 64
DEFAULT_NAME = "Passkey"
USER_HANDLE_BYTES = 64  # the most WebAuthn allows
# Most credential JSON worth reading: a credential ID is at most 1023 bytes, a public key
# and an attestation (none asked for, some sent anyway) a few kilobytes.
CREDENTIAL_JSON_MAX = 64 * 1024
# ES256 first (every authenticator), EdDSA, RS256 (Windows Hello).
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
# Refused in a name: control and format characters (bidirectional overrides, zero-width
# joiners: a name that reads differently than it is), surrogates, private use, and line
# or paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})

_USER_HANDLE = select(User.webauthn_user_handle).where(User.id == bindparam("uid"))
_SET_USER_HANDLE = (
    update(User)
    .where(User.id == bindparam("uid"), User.webauthn_user_handle.is_(None))
    .values(webauthn_user_handle=bindparam("handle"))
)
_CREDENTIALS = CREDENTIALS
_COUNT = select(func.count(Passkey.id)).where(Passkey.user_id == bindparam("uid"))
_LIST = (
    select(Passkey.id, Passkey.name, Passkey.created_at, Passkey.last_used_at, Passkey.backed_up)
    .where(Passkey.user_id == bindparam("uid"))
    .order_by(Passkey.created_at.desc(), Passkey.id.desc())
)
_PENDING = select(func.count(Challenge.id)).where(
    Challenge.user_id == bindparam("uid"),
    Challenge.method == PASSKEY,
    Challenge.purpose == PASSKEY_REGISTER,
    Challenge.consumed_at.is_(None),
    Challenge.expires_at > bindparam("now"),
)
_OPEN_CEREMONY = insert(Challenge).values(
    id=bindparam("challenge_id"),
    token_hash=bindparam("token_hash"),
    user_id=bindparam("uid"),
    purpose=PASSKEY_REGISTER,
    method=PASSKEY,
    amr=bindparam("amr"),
    user_agent=bindparam("user_agent"),
    ip=bindparam("ip"),
    created_at=bindparam("now"),
    expires_at=bindparam("expires_at"),
    consumed_at=null(),
    session_id=bindparam("session_id"),
)
_CEREMONY = select(
    Challenge.id,
    Challenge.user_id,
    Challenge.session_id,
    Challenge.expires_at,
    Challenge.consumed_at,
).where(
    Challenge.token_hash == bindparam("digest"),
    Challenge.method == PASSKEY,
    Challenge.purpose == PASSKEY_REGISTER,
)
# Spending it is one conditional write: of two finishes racing, exactly one gets a row.
_SPEND_CEREMONY = (
    update(Challenge)
    .where(
        and_(
            Challenge.id == bindparam("challenge_id"),
            Challenge.user_id == bindparam("uid"),
            Challenge.session_id == bindparam("owner_session"),
            Challenge.consumed_at.is_(None),
            Challenge.expires_at > bindparam("now"),
        )
    )
    .values(consumed_at=bindparam("now"))
    .returning(Challenge.id)
)
_ADD = insert(Passkey).values(
    id=bindparam("passkey_id"),
    user_id=bindparam("uid"),
    credential_id=bindparam("credential_id"),
    public_key=bindparam("public_key"),
    sign_count=bindparam("sign_count"),
    aaguid=bindparam("aaguid"),
    transports=bindparam("transports"),
    backup_eligible=bindparam("backup_eligible"),
    backed_up=bindparam("backed_up"),
    attachment=bindparam("attachment"),
    user_verified=bindparam("user_verified"),
    name=bindparam("name"),
    created_at=bindparam("now"),
    last_used_at=null(),
)
_CREDENTIAL_TAKEN = select(Passkey.id).where(Passkey.credential_id == bindparam("credential_id"))
_RENAME = (
    update(Passkey)
    .where(Passkey.id == bindparam("passkey_id"), Passkey.user_id == bindparam("uid"))
    .values(name=bindparam("name"))
    .returning(
        Passkey.id, Passkey.name, Passkey.created_at, Passkey.last_used_at, Passkey.backed_up
    )
)
_DELETE = (
    delete(Passkey)
    .where(Passkey.id == bindparam("passkey_id"), Passkey.user_id == bindparam("uid"))
    .returning(Passkey.id, Passkey.name)
)


@dataclass(frozen=True, slots=True)
class PasskeyView:
    id: uuid.UUID
    name: str
    created_at: datetime
    last_used_at: datetime | None
    backed_up: bool


class PasskeyService:
    def __init__(self, *, auth: AuthService, relying_party: RelyingParty | None) -> None:
        self.auth = auth
        self.relying_party = relying_party
        self.events = auth.events
        self.statements = auth.statements
        self.clock = auth.clock
        self.notices = auth.notices

    # -- the user's passkeys ----------------------------------------------------------------

    async def list(self, user_id: uuid.UUID) -> list[PasskeyView]:
        """Newest first."""
        async with self.statements.connection() as conn:
            rows = await conn.all(_LIST, {"uid": user_id})
        return [_view(row) for row in rows]

    async def count(self, user_id: uuid.UUID) -> int:
        async with self.statements.connection() as conn:
            found = await conn.scalars(_COUNT, {"uid": user_id})
        return int(found[0]) if found else 0

    # -- registration -----------------------------------------------------------------------

    async def start_registration(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        attachment: str | None,
        client: ClientInfo,
    ) -> IssuedCeremony:
        """The creation options for a new passkey of the signed-in user, and the token that
        finishes the ceremony (on this session, within five minutes). Needs a recent
        sign-in: an access token alone must not be enough to add a way in."""
        rp = self._configured()
        self.auth.require_recent(claims)
        now = self.clock.now()
        token = new_opaque_token()  # 256 bits; stored only as its SHA-256
        async with self.events.transaction(self.statements) as tx:
            if await self.auth.lock_user(tx, user.id, exclusive=True) is None:
                raise invalid_challenge()  # pragma: no cover - the session check saw it
            credentials = await tx.all(_CREDENTIALS, {"uid": user.id})
            if len(credentials) >= MAX_PASSKEYS:
                raise _too_many()
            pending = await tx.scalars(_PENDING, {"uid": user.id, "now": now})
            if pending and int(pending[0]) >= MAX_PENDING_REGISTRATIONS:
                raise AuthFailure(
                    ErrorCode.RATE_LIMITED,
                    "Too many passkey registrations under way; finish one, or wait.",
                    retry_after=int(REGISTRATION_LIFETIME.total_seconds()),
                )
            handle = await self._user_handle(tx, user.id)
            await tx.execute(
                _OPEN_CEREMONY,
                {
                    "challenge_id": uuid.uuid4(),
                    "token_hash": token_digest(token),
                    "uid": user.id,
                    "amr": " ".join(claims.amr),
                    "user_agent": clean_user_agent(client.user_agent),
                    "ip": client.ip[:IP_MAX] if client.ip else None,
                    "now": now,
                    "expires_at": now + REGISTRATION_LIFETIME,
                    "session_id": claims.session_id,
                },
            )
        options = generate_registration_options(
            rp_id=rp.id,
            rp_name=rp.name,
            user_id=handle,
            user_name=user.email,
            user_display_name=user.email,
            challenge=webauthn_challenge(token),
            timeout=int(REGISTRATION_LIFETIME.total_seconds() * 1000),
            attestation=AttestationConveyancePreference.NONE,
            authenticator_selection=AuthenticatorSelectionCriteria(
                authenticator_attachment=AuthenticatorAttachment(attachment)
                if attachment
                else None,
                resident_key=ResidentKeyRequirement.REQUIRED,
                require_resident_key=True,
                user_verification=UserVerificationRequirement.REQUIRED,
            ),
            exclude_credentials=descriptors(credentials),
            supported_pub_key_algs=ALGORITHMS,
        )
        return IssuedCeremony(
            challenge_token=token,
            options_json=options_to_json(options),
            expires_in=int(REGISTRATION_LIFETIME.total_seconds()),
        )

    async def finish_registration(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        challenge_token: str,
        credential_json: str,
        name: str | None,
        client: ClientInfo,
    ) -> PasskeyView:
        """Verifies the authenticator's answer to the ceremony the token names (started by
        this user on this session, not expired, not used) and adds the passkey. The
        ceremony is spent by an answer that fails verification too: one try each."""
        rp = self._configured()
        # A blank name is no name (an empty text box): the authenticator's make instead.
        chosen = clean_name(name, field="name") if name and name.strip() else None
        if not challenge_token or not looks_like_opaque_token(challenge_token):
            raise invalid_challenge()
        now = self.clock.now()
        async with self.statements.connection() as conn:
            ceremony = await conn.first(_CEREMONY, {"digest": token_digest(challenge_token)})
        # Another user's or another session's ceremony is left as it was (its owner may
        # still finish it) and looks like one that does not exist.
        if (
            ceremony is None
            or ceremony["user_id"] != user.id
            or ceremony["session_id"] != claims.session_id
            or ceremony["consumed_at"] is not None
            or ceremony["expires_at"] <= now
        ):
            raise invalid_challenge()
        spend = {
            "challenge_id": ceremony["id"],
            "uid": user.id,
            "owner_session": claims.session_id,
            "now": now,
        }
        try:
            credential, verified = _verify(rp, credential_json, webauthn_challenge(challenge_token))
        except AuthFailure:
            async with self.statements.transaction() as tx:
                await tx.first(_SPEND_CEREMONY, spend)
            raise
        aaguid = verified.aaguid.lower()
        passkey_name = chosen or authenticator_name(aaguid) or DEFAULT_NAME
        passkey_id = uuid.uuid4()
        async with self.events.transaction(self.statements) as tx:
            if await self.auth.lock_user(tx, user.id, exclusive=True) is None:
                raise invalid_challenge()  # pragma: no cover - the session check saw it
            if await tx.first(_SPEND_CEREMONY, spend) is None:
                raise invalid_challenge()  # spent by a concurrent finish
            count = await tx.scalars(_COUNT, {"uid": user.id})
            if count and int(count[0]) >= MAX_PASSKEYS:
                raise _too_many()
            # Checked first, so that the common case rolls back nothing; the unique index
            # is what holds against a concurrent registration for another account.
            if await tx.first(_CREDENTIAL_TAKEN, {"credential_id": verified.credential_id}):
                raise _already_registered()
            # A decoy listed for another address answers as a registered ID does: its
            # registration tells nobody which of a list was real.
            if self.auth.passkey_options.is_decoy(bytes(verified.credential_id)):
                raise _already_registered()
            transports = credential.response.transports or []
            try:
                await self._add(
                    tx,
                    {
                        "passkey_id": passkey_id,
                        "uid": user.id,
                        "credential_id": verified.credential_id,
                        "public_key": verified.credential_public_key,
                        "sign_count": verified.sign_count,
                        "aaguid": aaguid,
                        "transports": " ".join(sorted({t.value for t in transports}))[:255] or None,
                        "backup_eligible": verified.credential_device_type
                        == CredentialDeviceType.MULTI_DEVICE,
                        "backed_up": verified.credential_backed_up,
                        "attachment": credential.authenticator_attachment.value
                        if credential.authenticator_attachment
                        else None,
                        "user_verified": verified.user_verified,
                        "name": passkey_name,
                        "now": now,
                    },
                )
            except UniqueViolation:
                raise _already_registered() from None
            await self.events.record(
                tx,
                EventKind.PASSKEY_ADDED,
                user_id=user.id,
                session_id=claims.session_id,
                client=client,
                details={"passkey": str(passkey_id), "aaguid": aaguid},
            )
            await self.notices.send(
                tx,
                user_id=user.id,
                email=user.email,
                template="passkey_added",
                client=client,
                name=passkey_name,
            )
        self.notices.outbox.wake()
        return PasskeyView(
            id=passkey_id,
            name=passkey_name,
            created_at=now,
            last_used_at=None,
            backed_up=verified.credential_backed_up,
        )

    # -- management -------------------------------------------------------------------------

    async def rename(self, *, user: UserView, passkey_id: str, name: str) -> PasskeyView:
        """Renames one of the user's passkeys; INVALID_INPUT (field "id") for any other id."""
        self._configured()
        target = _passkey_id(passkey_id)
        cleaned = clean_name(name, field="name")
        async with self.statements.transaction() as tx:
            await self.auth.lock_user(tx, user.id, exclusive=True)
            row = await tx.first(_RENAME, {"passkey_id": target, "uid": user.id, "name": cleaned})
        if row is None:
            raise _no_such_passkey()
        return _view(row)

    async def delete(
        self, *, user: UserView, claims: AccessClaims, passkey_id: str, client: ClientInfo
    ) -> None:
        """Deletes one of the user's passkeys (needs a recent sign-in); INVALID_INPUT
        (field "id") for any other id."""
        self._configured()
        self.auth.require_recent(claims)
        target = _passkey_id(passkey_id)
        async with self.events.transaction(self.statements) as tx:
            await self.auth.lock_user(tx, user.id, exclusive=True)
            row = await tx.first(_DELETE, {"passkey_id": target, "uid": user.id})
            if row is None:
                raise _no_such_passkey()
            await self.events.record(
                tx,
                EventKind.PASSKEY_REMOVED,
                user_id=user.id,
                session_id=claims.session_id,
                client=client,
                details={"passkey": str(target)},
            )
            await self.notices.send(
                tx,
                user_id=user.id,
                email=user.email,
                template="passkey_removed",
                client=client,
                name=row["name"],
            )
        self.notices.outbox.wake()

    # -- helpers ----------------------------------------------------------------------------

    async def _add(self, tx: Runner, row: Mapping[str, Any]) -> None:
        await tx.execute(_ADD, row)

    def _configured(self) -> RelyingParty:
        if self.relying_party is None:
            raise invalid_input("Passkeys are not configured on this server.")
        return self.relying_party

    async def _user_handle(self, tx: Runner, user_id: uuid.UUID) -> bytes:
        """The user's WebAuthn user handle, made at the first registration (in `tx`,
        which holds the user's row exclusively)."""
        found = await tx.first(_USER_HANDLE, {"uid": user_id})
        handle = found["webauthn_user_handle"] if found is not None else None
        if handle is not None:
            return bytes(handle)
        handle = secrets.token_bytes(USER_HANDLE_BYTES)
        await tx.execute(_SET_USER_HANDLE, {"uid": user_id, "handle": handle})
        return handle


def clean_name(raw: str, *, field: str) -> str:
    """A passkey's name: trimmed, NFC, 1 to 64 characters, none of them control or
    format characters; INVALID_INPUT otherwise."""
    name = unicodedata.normalize("NFC", raw).strip()
    if not name:
        raise invalid_input("Give the passkey a name.", field)
    if len(name) > NAME_MAX:
        raise invalid_input(f"A passkey's name is at most {NAME_MAX} characters.", field)
    if any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in name):
        raise invalid_input("A passkey's name must not contain control characters.", field)
    return name


def _verify(
    rp: RelyingParty, credential_json: str, challenge: bytes
) -> tuple[RegistrationCredential, Any]:
    """The credential, parsed and verified: INVALID_INPUT (field "credentialJson") for
    anything the library refuses, without its words (they quote what the client sent)."""
    if len(credential_json) > CREDENTIAL_JSON_MAX:
        raise _unverified()
    try:
        # As text: the library's bytes path fails (see PITFALLS.md).
        credential = parse_registration_credential_json(credential_json)
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            require_user_presence=True,
            # A passkey signs in alone: the authenticator must have verified the user.
            require_user_verification=True,
            supported_pub_key_algs=ALGORITHMS,
        )
    except (WebAuthnException, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise _unverified() from None
    return credential, verified


def _passkey_id(given: str) -> uuid.UUID:
    try:
        return uuid.UUID(given)
    except (ValueError, TypeError, AttributeError):
        raise _no_such_passkey() from None


def _view(row: Mapping[str, Any]) -> PasskeyView:
    return PasskeyView(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        backed_up=bool(row["backed_up"]),
    )


def _unverified() -> AuthFailure:
    return invalid_input(
        "The authenticator's answer could not be verified; start the registration again.",
        "credentialJson",
    )


def _too_many() -> AuthFailure:
    return invalid_input(f"An account holds at most {MAX_PASSKEYS} passkeys; delete one first.")


def _already_registered() -> AuthFailure:
    return invalid_input("This passkey is already registered.", "credentialJson")


def _no_such_passkey() -> AuthFailure:
    return invalid_input("No such passkey.", "id")
