"""The way in by passkey (WebAuthn): a sign-in ceremony (startPasskeyLogin), and proving an
assertion (finishPasskeyLogin) for it, for the TOTP step of a proven first factor, or for
a step-up. What follows a verified passkey is decided by signin/conclusion.py.

A passkey verified by its user (PIN, biometrics) is multi-factor on its own: its `amr`
holds "mfa", so conclude asks for no TOTP step after it. Before any work, only the
client's `login_ip` budget is spent; then the assertion is verified (no password hash:
cheap). A verified passkey cannot have been guessed: it is never held back by a budget or
a lock a stranger can spend (no address lockout, no `login_account`), as a device token's
holder escapes the address's lock. A first-factor sign-in then asks for the address to be
proven where verification is required, as a password login does.

Every refusal answers the same INVALID_CREDENTIALS and is counted as a wrong password is
(`login_account`, a lockout failure: RATE_LIMITED while that key is locked; LOGIN_FAILED,
LOCKED_OUT), charged to a key that never depends on whether the credential ID presented
exists or whose it is: the address the ceremony was started with (registered or not); the
user's address for a second step or a step-up; else `passkey:<SHA-256 of the credential ID
presented>` (refusal_key), the same for a registered ID, a decoy or a random one.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import bindparam, select, update
from webauthn import verify_authentication_response
from webauthn.authentication.verify_authentication_response import VerifiedAuthentication
from webauthn.helpers import parse_authentication_credential_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import AuthenticationCredential

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, invalid_input
from db.models import Passkey, User
from db.security.access import AccessClaims
from db.security.limiter import RateLimiter, client_key
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import Lockout
from db.services.passkey_options import (
    CEREMONY_LIFETIME,
    PASSKEY,
    PASSKEY_LOGIN,
    IssuedCeremony,
    PasskeyOptions,
    descriptors,
    webauthn_challenge,
)
from db.services.sessions import Sessions
from db.services.signin.conclusion import SIGN_IN, Conclusion, Intent, step_up
from db.services.types import (
    AMR_PASSKEY_DEVICE_BOUND,
    AMR_PASSKEY_SYNCED,
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    merge_amr,
)
from db.session import Runner, Statements, Writes
from db.settings import RelyingParty
from db.validation import parse_email

INVALID_PASSKEY_MESSAGE = "This passkey could not sign you in."
# Most credential JSON worth reading (see db/services/passkeys.py).
CREDENTIAL_JSON_MAX = 64 * 1024

# The address's account and its passkeys, in one statement whether or not the address is
# registered or has passkeys: the same database work for every address.
_ACCOUNT_CREDENTIALS = (
    select(User.id, Passkey.credential_id, Passkey.transports)
    .select_from(User)
    .outerjoin(Passkey, Passkey.user_id == User.id)
    .where(User.email_normalized == bindparam("email"))
    .order_by(Passkey.created_at, Passkey.id)
)
# A credential is found by its ID through the unique index, whoever holds it.
_PASSKEY_BY_CREDENTIAL_ID = (
    select(
        Passkey.id,
        Passkey.user_id,
        Passkey.name,
        Passkey.public_key,
        Passkey.sign_count,
        Passkey.backup_eligible,
        User.webauthn_user_handle,
    )
    .join(User, User.id == Passkey.user_id)
    .where(Passkey.credential_id == bindparam("credential_id"))
)
_ADDRESS_OF = select(User.email_normalized).where(User.id == bindparam("uid"))
# Only over the count as checked: of two sign-ins with one authenticator racing, the
# later count cannot be overwritten by the earlier.
_USED = (
    update(Passkey)
    .where(Passkey.id == bindparam("passkey_id"), Passkey.sign_count == bindparam("checked"))
    .values(
        sign_count=bindparam("new_count"),
        last_used_at=bindparam("now"),
        backed_up=bindparam("backed_up"),
    )
    .returning(Passkey.id)
)
# A sign-in's challenge consumed and its passkey's count moved, in one round trip.
_SPEND = Writes(ch.CONSUME, _USED, counted=True)


REFUSAL_KEY_PREFIX = "passkey:"


def refusal_key(credential_id: bytes) -> str:
    """The key a refused assertion of an address-less ceremony is charged to: derived from
    the credential ID presented alone, the same whether it is registered, a decoy or
    random (whose it is, or whether it exists, never shows in a budget or a lock)."""
    return REFUSAL_KEY_PREFIX + hashlib.sha256(credential_id).hexdigest()


@dataclass(frozen=True, slots=True)
class _Verified:
    new_count: int
    backed_up: bool


class PasskeySignIns:
    def __init__(
        self,
        *,
        statements: Statements,
        clock: Clock,
        limiter: RateLimiter,
        lockout: Lockout,
        events: SecurityEvents,
        challenges: Challenges,
        sessions: Sessions,
        conclusion: Conclusion,
        options: PasskeyOptions,
    ) -> None:
        self.statements = statements
        self.clock = clock
        self.limiter = limiter
        self.lockout = lockout
        self.events = events
        self.challenges = challenges
        self.sessions = sessions
        self.conclusion = conclusion
        self.options = options
        # A public key nobody holds the private half of: an unknown credential ID is
        # checked against it, so that its refusal costs the signature check a known one's
        # does (the time of a refusal tells no decoy from a registered ID).
        self._unknown_key = _cose_ec2(ec.generate_private_key(ec.SECP256R1()).public_key())

    # -- starting ---------------------------------------------------------------------------

    async def start(self, *, email: str | None, client: ClientInfo) -> IssuedCeremony:
        """A sign-in ceremony: five minutes, single use, only its token's digest stored.
        Without an address, options for any discoverable passkey (autofill, a "sign in
        with a passkey" button). With one, options listing that account's passkeys; for
        an unknown address or an account without passkeys, decoys that look the same and
        stay the same. The ceremony remembers the account (never said)."""
        self._configured()
        await self.limiter.hit("start_passkey_login_ip", client_key(client.ip))
        normalized: str | None = None
        if email is not None:
            try:
                normalized = parse_email(email).normalized
            except AuthFailure:
                # Cannot be registered: answered like an unknown address (its decoys are
                # derived from the text as given, trimmed and lowercased).
                normalized = email.strip().lower()[:254]
        user_id: uuid.UUID | None = None
        rows: list[Mapping[str, Any]] = []
        async with self.events.transaction(self.statements) as tx:
            if normalized is not None:
                # Run for every address given: an unknown one costs what a known one does.
                found = await tx.all(_ACCOUNT_CREDENTIALS, {"email": normalized})
                if found:
                    user_id = found[0]["id"]
                rows = [row for row in found if row["credential_id"] is not None]
            token = await self.challenges.open_passkey(
                tx, purpose=PASSKEY_LOGIN, user_id=user_id, email=normalized, client=client
            )
        if normalized is None:
            allowed = []  # discoverable: the authenticator offers what it holds
        elif rows:
            allowed = descriptors(rows)
        else:
            allowed = self.options.decoys(normalized)
        return IssuedCeremony(
            challenge_token=token,
            options_json=self.options.request(token, allowed),
            expires_in=int(CEREMONY_LIFETIME.total_seconds()),
        )

    # -- finishing --------------------------------------------------------------------------

    async def finish(
        self,
        *,
        challenge_token: str,
        credential_json: str,
        client: ClientInfo,
        bearer: Callable[[], Awaitable[AccessClaims | None]],
    ) -> IssuedSession | IssuedChallenge:
        """Proves a passkey's assertion for the challenge the token names: a sign-in
        ceremony (any passkey, or the account's where started with its address), the TOTP
        step of a proven first factor, or a step-up of the session whose bearer token the
        request carries (`bearer`, read only then). Then conclude: a session with `amr`
        hwk or swk, user, mfa (merged with the first factor's), or that session renewed.
        Every refusal is the same INVALID_CREDENTIALS, counted as a wrong password."""
        rp = self._configured()
        # Before any work: the client's budget only. Nothing a stranger can spend holds
        # back a verified passkey (it cannot be guessed).
        await self.limiter.hit("login_ip", client_key(client.ip))
        credential = _parse(credential_json)
        passkey = None
        # One connection for both: the attempt committed by itself, then the passkey read.
        async with self.statements.standalone() as conn:
            challenge = await self._take(challenge_token, conn)
            if credential is not None:
                passkey = await conn.first(
                    _PASSKEY_BY_CREDENTIAL_ID, {"credential_id": bytes(credential.raw_id)}
                )
        owner: uuid.UUID | None = passkey["user_id"] if passkey is not None else None
        try:
            if challenge is None or credential is None:
                raise _invalid()
            if passkey is None:
                _check_signature(rp, challenge_token, credential, self._unknown_key)
                raise _invalid()
            intent = await self._intent(challenge, owner, bearer)
            verified = await self._verify(rp, challenge_token, credential, passkey, client)
        except AuthFailure as refused:
            if refused.code is ErrorCode.INVALID_CREDENTIALS:
                await self._count_refusal(challenge, credential, client)
            raise
        amr = merge_amr(
            challenge["amr"].split(),
            AMR_PASSKEY_SYNCED if passkey["backup_eligible"] else AMR_PASSKEY_DEVICE_BOUND,
        )
        assert owner is not None  # noqa: S101 - a passkey was found
        try:
            async with self.events.transaction(self.statements) as tx:
                # First: the account's lock (see _LOCK_USER); exclusive for a reset.
                locked = await self.sessions.lock_user(
                    tx, owner, exclusive=intent.new_password_hash is not None
                )
                if locked is None:
                    raise _Lost()
                # The challenge spent here, in the transaction that concludes: of two
                # finishes racing (on any number of processes), exactly one gets it; and
                # the passkey's count moved on from the one checked, unless a concurrent
                # sign-in with it moved it first. Either lost: nothing of this is kept.
                spent = await tx.execute_together(
                    _SPEND,
                    {
                        "challenge_id": challenge["id"],
                        "passkey_id": passkey["id"],
                        "checked": passkey["sign_count"],
                        "new_count": verified.new_count,
                        "now": self.clock.now(),
                        "backed_up": verified.backed_up,
                    },
                )
                if spent is None or not (spent["write_1"] and spent["write_2"]):
                    raise _Lost()
                issued = await self.conclusion.conclude(
                    tx,
                    owner,
                    amr=amr,
                    client=client,
                    intent=intent,
                    # A first factor, as a password login is: the address must be proven.
                    verify_address=intent is SIGN_IN,
                )
        except _Lost:
            # Not a guess: the answer was right, and a concurrent request used the
            # challenge or the passkey's count first.
            raise _invalid() from None
        self.challenges.outbox.wake()
        return issued

    # -- the steps of a finish -------------------------------------------------------------

    async def _take(self, token: str, on: Runner) -> Mapping[str, Any] | None:
        """The challenge, one attempt taken, if finishPasskeyLogin may complete it (see
        TAKE_FOR_PASSKEY: never a registration ceremony or an emailed sign-in code)."""
        try:
            return await self.challenges.take_attempt(ch.TAKE_FOR_PASSKEY, token, on=on)
        except AuthFailure:
            return None

    async def _refusal_key(
        self, challenge: Mapping[str, Any] | None, credential: AuthenticationCredential | None
    ) -> tuple[str, uuid.UUID | None]:
        """Whom a refused assertion is charged to, never depending on whether the
        credential ID presented exists or whose it is: the address the ceremony was
        started with (registered or not); a second step's or step-up's user's address;
        else a key derived from the credential ID presented (refusal_key)."""
        if challenge is not None and challenge["email"] is not None:
            return challenge["email"], challenge["user_id"]
        if challenge is not None and challenge["user_id"] is not None:
            async with self.statements.connection() as conn:
                found = await conn.first(_ADDRESS_OF, {"uid": challenge["user_id"]})
            if found is not None:
                return str(found["email_normalized"]), challenge["user_id"]
        presented = bytes(credential.raw_id) if credential is not None else b""
        return refusal_key(presented), None

    async def _count_refusal(
        self,
        challenge: Mapping[str, Any] | None,
        credential: AuthenticationCredential | None,
        client: ClientInfo,
    ) -> None:
        """A refused assertion, counted as a wrong password is: the key's `login_account`
        budget and a lockout failure (RATE_LIMITED while the key is locked, as a wrong
        password then); LOGIN_FAILED, and LOCKED_OUT where it starts a lock."""
        key, user_id = await self._refusal_key(challenge, credential)
        await self.limiter.hit("login_account", key)
        await self.lockout.reserve(key)
        try:
            locked_until = await self.lockout.failed(key)
        except BaseException:
            await self.lockout.give_back(key)
            raise
        email = None if key.startswith(REFUSAL_KEY_PREFIX) else key
        async with self.events.transaction(self.statements) as tx:
            await self.events.record(
                tx,
                EventKind.LOGIN_FAILED,
                user_id=user_id,
                client=client,
                email=email,
                details={"step": "passkey"},
            )
            if locked_until is not None:
                await self.events.record(
                    tx,
                    EventKind.LOCKED_OUT,
                    user_id=user_id,
                    client=client,
                    email=email,
                    details={"until": locked_until.isoformat()},
                )

    async def _intent(
        self,
        challenge: Mapping[str, Any],
        owner: uuid.UUID | None,
        bearer: Callable[[], Awaitable[AccessClaims | None]],
    ) -> Intent:
        """What the passkey is for, from the challenge it answers; refused where the
        passkey is not the challenge's user's, or a step-up comes without its session."""
        if challenge["user_id"] is not None and challenge["user_id"] != owner:
            raise _invalid()  # started with another account's address, or its step
        if challenge["email"] is not None and challenge["user_id"] is None:
            raise _invalid()  # started with an address that has no account
        if challenge["method"] == PASSKEY and challenge["purpose"] == PASSKEY_LOGIN:
            return SIGN_IN
        if challenge["purpose"] == ch.REAUTHENTICATE:
            # A step-up renews the session that asked: its bearer token must come along
            # (a thief holding only the challenge token gets nothing).
            claims = await bearer()
            if (
                claims is None
                or claims.session_id != challenge["session_id"]
                or claims.user_id != owner
            ):
                raise _invalid()
            return step_up(challenge["session_id"])
        return Intent(
            purpose=challenge["purpose"],
            session_id=challenge["session_id"],
            new_password_hash=challenge["pending_password_hash"],
        )

    async def _verify(
        self,
        rp: RelyingParty,
        token: str,
        credential: AuthenticationCredential,
        passkey: Mapping[str, Any],
        client: ClientInfo,
    ) -> _Verified:
        """The assertion, verified against the stored public key: the challenge derived
        from the token, the RP ID, every allowed origin, user presence and verification.
        Then the clone check, done here rather than by the library (it is given 0): a
        count that did not go up, where the stored and the new are not both 0, is refused
        and PASSKEY_CLONE_SUSPECTED recorded in its own transaction."""
        verified = _check_signature(rp, token, credential, bytes(passkey["public_key"]))
        if verified is None:
            raise _invalid()
        # The account the authenticator says the passkey is for (userHandle, where it
        # says) must be the passkey's owner.
        handle = credential.response.user_handle
        if handle is not None and not hmac.compare_digest(
            bytes(handle), bytes(passkey["webauthn_user_handle"] or b"")
        ):
            raise _invalid()
        stored, new = int(passkey["sign_count"]), int(verified.new_sign_count)
        if (stored != 0 or new != 0) and new <= stored:
            await self.events.record_now(
                self.statements,
                EventKind.PASSKEY_CLONE_SUSPECTED,
                user_id=passkey["user_id"],
                client=client,
                details={
                    "passkey": str(passkey["id"]),
                    "name": passkey["name"],
                    "stored_count": stored,
                    "count": new,
                },
            )
            raise _invalid()
        # The credential the library checked is the one looked up (it compares the IDs).
        if not hmac.compare_digest(bytes(verified.credential_id), bytes(credential.raw_id)):
            raise _invalid()  # pragma: no cover - the library checks id == rawId
        return _Verified(new_count=new, backed_up=bool(verified.credential_backed_up))

    def _configured(self) -> RelyingParty:
        rp = self.options.relying_party
        if rp is None:
            raise invalid_input("Passkeys are not configured on this server.")
        return rp


class _Lost(Exception):
    """A right answer that a concurrent request used first."""


def _check_signature(
    rp: RelyingParty, token: str, credential: AuthenticationCredential, public_key: bytes
) -> VerifiedAuthentication | None:
    """py_webauthn's verification with the challenge derived from the token, the RP ID,
    every allowed origin, user presence and verification; None where it refuses."""
    try:
        return verify_authentication_response(
            credential=credential,
            expected_challenge=webauthn_challenge(token),
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            credential_public_key=public_key,
            # The clone check is ours, after the signature (see PasskeySignIns._verify).
            credential_current_sign_count=0,
            # A passkey signs in alone: the authenticator must have verified the user.
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _cose_ec2(key: ec.EllipticCurvePublicKey) -> bytes:
    """A P-256 public key as a COSE_Key (RFC 9053: kty EC2, alg ES256, crv P-256, x, y),
    CBOR-encoded by hand: a map of five entries, 32-byte coordinates."""
    numbers = key.public_numbers()
    return (
        b"\xa5\x01\x02\x03\x26\x20\x01"
        + b"\x21\x58\x20"
        + numbers.x.to_bytes(32, "big")
        + b"\x22\x58\x20"
        + numbers.y.to_bytes(32, "big")
    )


def _parse(credential_json: str) -> AuthenticationCredential | None:
    if not credential_json or len(credential_json) > CREDENTIAL_JSON_MAX:
        return None
    try:
        # As text: the library's bytes path fails (see PITFALLS.md).
        return parse_authentication_credential_json(credential_json)
    except (WebAuthnException, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _invalid() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_CREDENTIALS, INVALID_PASSKEY_MESSAGE)
