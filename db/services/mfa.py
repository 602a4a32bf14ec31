"""Two-factor: TOTP enrolment, recovery codes, and the per-account limit on wrong codes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, null, or_, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_challenge, invalid_otp
from db.models import RecoveryCode, TotpCredential, User
from db.security.box import SecretBox, UndecryptableSecret
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher
from db.security.totp import (
    RECOVERY_CODE_COUNT,
    matching_step,
    new_recovery_code,
    new_secret,
    normalize_recovery_code,
    provisioning_uri,
    qr_svg,
    recovery_lookup,
)
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import CodeChecks, code_check_key
from db.services.notices import Notices
from db.services.types import ClientInfo, UserView
from db.session import Runner, Statements

# Takes what a code is for (a challenge) inside the transaction that spends it; told
# which kind of code it was ("totp" or "recovery").
Claim = Callable[[Runner, str], Awaitable[bool]]
# Runs first in that transaction: the locks the claim will need, in the caller's order.
Lock = Callable[[Runner], Awaitable[None]]

log = logging.getLogger("strawgate.mfa")


@dataclass(frozen=True, slots=True)
class TotpEnrolment:
    secret: str
    otpauth_uri: str
    qr_code_svg: str


_CREDENTIAL = select(
    TotpCredential.secret_sealed, TotpCredential.confirmed_at, TotpCredential.last_step
).where(TotpCredential.user_id == bindparam("uid"))

_ALL_CREDENTIALS = select(TotpCredential.user_id).order_by(TotpCredential.user_id)
_CREDENTIAL_FOR_UPDATE = (
    select(TotpCredential.secret_sealed)
    .where(TotpCredential.user_id == bindparam("uid"))
    .with_for_update()
)
_RESEAL = (
    update(TotpCredential)
    .where(TotpCredential.user_id == bindparam("uid"))
    .values(secret_sealed=bindparam("secret_sealed"))
)

_DROP_PENDING = delete(TotpCredential).where(
    TotpCredential.user_id == bindparam("uid"), TotpCredential.confirmed_at.is_(None)
)
_ADD_CREDENTIAL = insert(TotpCredential).values(
    user_id=bindparam("uid"),
    secret_sealed=bindparam("secret_sealed"),
    confirmed_at=null(),
    last_step=null(),
    created_at=bindparam("now"),
)
# Accepting a step is one conditional write: of two concurrent uses of one code, on one
# process or two, exactly one finds the step still newer than the last accepted one.
_ACCEPT_STEP = (
    update(TotpCredential)
    .where(
        TotpCredential.user_id == bindparam("uid"),
        # The secret the code was checked against: a setupTotp in between replaces it.
        TotpCredential.secret_sealed == bindparam("sealed"),
        or_(TotpCredential.last_step.is_(None), TotpCredential.last_step < bindparam("step")),
    )
    .values(last_step=bindparam("step"))
    .returning(TotpCredential.user_id)
)
_CONFIRM = (
    update(TotpCredential)
    .where(
        TotpCredential.user_id == bindparam("uid"),
        TotpCredential.secret_sealed == bindparam("sealed"),
        TotpCredential.confirmed_at.is_(None),
    )
    .values(confirmed_at=bindparam("now"))
    .returning(TotpCredential.user_id)
)
_DROP_CREDENTIAL = delete(TotpCredential).where(TotpCredential.user_id == bindparam("uid"))
_DROP_RECOVERY_CODES = delete(RecoveryCode).where(RecoveryCode.user_id == bindparam("uid"))
_ADD_RECOVERY_CODE = insert(RecoveryCode).values(
    user_id=bindparam("uid"),
    lookup=bindparam("lookup"),
    code_hash=bindparam("code_hash"),
    used_at=null(),
    created_at=bindparam("now"),
)
_RECOVERY_CANDIDATE = (
    select(RecoveryCode.id, RecoveryCode.code_hash)
    .where(
        RecoveryCode.user_id == bindparam("uid"),
        RecoveryCode.lookup == bindparam("lookup"),
        RecoveryCode.used_at.is_(None),
    )
    .order_by(RecoveryCode.id)
    .limit(1)
)
_USE_RECOVERY_CODE = (
    update(RecoveryCode)
    .where(RecoveryCode.id == bindparam("code_id"), RecoveryCode.used_at.is_(None))
    .values(used_at=bindparam("now"))
    .returning(RecoveryCode.id)
)

# The password's hash, and when it was last set (what a check re-reads under the lock).
PASSWORD_HASH = select(User.password_hash, User.password_changed_at).where(
    User.id == bindparam("uid")
)


class TwoFactor:
    def __init__(
        self,
        *,
        statements: Statements,
        box: SecretBox,
        hasher: PasswordHasher,
        clock: Clock,
        issuer: str,
        recovery_key: bytes,
        notices: Notices,
        limiter: RateLimiter,
        code_checks: CodeChecks,
        events: SecurityEvents,
    ) -> None:
        self.events = events
        self.limiter = limiter
        self.code_checks = code_checks
        self.statements = statements
        self.box = box
        self.hasher = hasher
        self.clock = clock
        self.issuer = issuer
        self._recovery_key = recovery_key
        self.notices = notices

    # -- enrolment -------------------------------------------------------------------------

    async def setup(self, *, user: UserView) -> TotpEnrolment:
        """A new pending secret (replacing a pending one); refused once two-factor is on,
        and for an address nobody has proven (its owner would be kept out of every way in
        by code)."""
        _require_verified(user)
        user_id, email = user.id, user.email
        secret = new_secret()
        for _attempt in range(3):
            try:
                async with self.events.transaction(self.statements) as tx:
                    await tx.execute(_DROP_PENDING, {"uid": user_id})
                    await tx.execute(
                        _ADD_CREDENTIAL,
                        {
                            "uid": user_id,
                            "secret_sealed": self.box.seal(secret),
                            "now": self.clock.now(),
                        },
                    )
                break
            except UniqueViolation:
                # Either two-factor is on, or a concurrent setupTotp inserted first.
                if await self.is_on(user_id):
                    raise _already_on() from None
        else:
            raise _already_on()
        uri = provisioning_uri(secret, email=email, issuer=self.issuer)
        return TotpEnrolment(secret=secret, otpauth_uri=uri, qr_code_svg=qr_svg(uri))

    async def confirm(
        self, *, user: UserView, code: str, client: ClientInfo, budget: str
    ) -> list[str]:
        """Turns two-factor on with a current code from the pending secret (on a proven
        address only); the recovery codes, shown once. `budget`: whose wrong-code budget
        the check spends (the client's device, else its address)."""
        user_id, email = user.id, user.email
        await self.limit("confirm_totp_ip", user_id, client)
        _require_verified(user)
        async with self.statements.connection() as conn:
            credential = await conn.first(_CREDENTIAL, {"uid": user_id})
        if credential is None:
            raise AuthFailure(
                ErrorCode.INVALID_INPUT, "Start with setupTotp before confirming.", field="code"
            )
        if credential["confirmed_at"] is not None:
            raise _already_on()
        await self.check_code(
            user_id=user_id,
            code=code,
            credential=credential,
            recovery=False,
            client=budget,
        )
        codes, rows = await self._new_recovery_codes(user_id)
        async with self.events.transaction(self.statements) as tx:
            confirmed = await tx.first(
                _CONFIRM,
                {"uid": user_id, "sealed": credential["secret_sealed"], "now": self.clock.now()},
            )
            if confirmed is None:  # confirmed, or replaced, by a concurrent request
                raise AuthFailure(
                    ErrorCode.INVALID_INPUT,
                    "The enrolment changed meanwhile: start again with setupTotp.",
                )
            await self._store_recovery_codes(tx, user_id, rows)
            await self.notices.send(
                tx, user_id=user_id, email=email, template="totp_enabled", client=client
            )
            await self.events.record(tx, EventKind.TOTP_ENABLED, user_id=user_id, client=client)
        self.notices.outbox.wake()
        return codes

    async def regenerate_recovery_codes(
        self, *, user_id: uuid.UUID, code: str, client: ClientInfo, budget: str
    ) -> list[str]:
        """Replaces every recovery code; needs a current TOTP code."""
        await self.limit("regenerate_recovery_codes_ip", user_id, client)
        credential = await self.confirmed(user_id)
        await self.check_code(
            user_id=user_id,
            code=code,
            credential=credential,
            recovery=False,
            client=budget,
        )
        codes, rows = await self._new_recovery_codes(user_id)
        async with self.events.transaction(self.statements) as tx:
            await self._store_recovery_codes(tx, user_id, rows)
        return codes

    async def disable(
        self,
        *,
        user_id: uuid.UUID,
        email: str,
        code: str,
        credential: Mapping[str, Any],
        budget: str,
        client: ClientInfo,
    ) -> None:
        """Turns two-factor off with a current or recovery code (the caller has checked
        the password, or that the session signed in recently)."""
        await self.check_code(
            user_id=user_id,
            code=code,
            credential=credential,
            recovery=True,
            client=budget,
        )
        async with self.events.transaction(self.statements) as tx:
            await tx.execute(_DROP_RECOVERY_CODES, {"uid": user_id})
            await tx.execute(_DROP_CREDENTIAL, {"uid": user_id})
            await self.notices.send(
                tx, user_id=user_id, email=email, template="totp_disabled", client=client
            )
            await self.events.record(tx, EventKind.TOTP_DISABLED, user_id=user_id, client=client)
        self.notices.outbox.wake()

    # -- checking a code ---------------------------------------------------------------------

    async def check_code(
        self,
        *,
        user_id: uuid.UUID,
        code: str,
        credential: Mapping[str, Any] | None = None,
        recovery: bool,
        claim: Claim | None = None,
        lock: Lock | None = None,
        client: str = "-",
    ) -> str:
        """Accepts a current TOTP code (once) or, where `recovery`, an unused recovery
        code (once); raises INVALID_OTP otherwise, and RATE_LIMITED when this client has
        had too many wrong codes for the account lately (`client`: its device or address;
        other clients' guesses never use up its budget). Returns "totp" or "recovery".

        `claim` runs in the transaction that spends the code; when it returns False the
        code is not spent (a concurrent request took what the code was for)."""
        now = self.clock.now()
        if recovery:
            self.hasher.check_capacity()  # refuse before a slot is taken, not after
        key = code_check_key(str(user_id), client)
        await self.code_checks.reserve(key)
        # A wrong code leaves the reserved check counted; a right one gives it back, and so
        # does a check that failed for another reason (the claims hook down, the database
        # gone: only a wrong code raises INVALID_OTP before anything else can fail).
        try:
            method = await self._verify(
                user_id, code, credential, recovery=recovery, now=now, claim=claim, lock=lock
            )
        except AuthFailure as failure:
            if failure.code is not ErrorCode.INVALID_OTP:
                await self._give_back_quietly(key)
            raise
        except Exception:
            await self._give_back_quietly(key)
            raise
        async with self.statements.standalone() as tx:
            await self.code_checks.give_back(tx, key)
        return method

    async def _give_back_quietly(self, key: str) -> None:
        """Gives a reserved check back while another failure is on its way to the caller:
        if this fails too (the database is down), that failure is the one reported."""
        try:
            async with self.statements.standalone() as tx:
                await self.code_checks.give_back(tx, key)
        except Exception as exc:
            log.warning("a code check could not be given back (%s)", type(exc).__name__)

    async def _verify(
        self,
        user_id: uuid.UUID,
        code: str,
        credential: Mapping[str, Any] | None,
        *,
        recovery: bool,
        now: datetime,
        claim: Claim | None,
        lock: Lock | None,
    ) -> str:
        if credential is None:
            async with self.statements.connection() as conn:
                credential = await conn.first(_CREDENTIAL, {"uid": user_id})
            if credential is not None and credential["confirmed_at"] is None:
                credential = None  # a pending secret signs nobody in
        normalized = normalize_recovery_code(code) if recovery else None
        secret = None
        if credential is not None:
            try:
                secret = self.box.open(credential["secret_sealed"])
            except UndecryptableSecret:
                # This process lacks the key (a rotation under way): a TOTP code cannot be
                # checked here (SERVICE_UNAVAILABLE); a recovery code can.
                if normalized is None:
                    raise
        if credential is not None and secret is not None:
            step = matching_step(secret, code, now=now, after=credential["last_step"])
            if step is not None:
                async with self.events.transaction(self.statements) as tx:
                    if lock is not None:
                        await lock(tx)
                    accepted = await tx.first(
                        _ACCEPT_STEP,
                        {"uid": user_id, "step": step, "sealed": credential["secret_sealed"]},
                    )
                    if accepted is not None and claim is not None and not await claim(tx, "totp"):
                        raise invalid_challenge()  # rolls the accepted step back
                if accepted is not None:
                    return "totp"
                raise invalid_otp()  # replayed, by a concurrent request
        if normalized is not None:
            lookup = recovery_lookup(self._recovery_key, normalized)
            async with self.statements.connection() as conn:
                candidate = await conn.first(
                    _RECOVERY_CANDIDATE, {"uid": user_id, "lookup": lookup}
                )
            if candidate is not None:
                ok, _ = await self.hasher.verify(normalized, candidate["code_hash"])
                if ok:
                    async with self.events.transaction(self.statements) as tx:
                        if lock is not None:
                            await lock(tx)
                        used = await tx.first(
                            _USE_RECOVERY_CODE, {"code_id": candidate["id"], "now": now}
                        )
                        if (
                            used is not None
                            and claim is not None
                            and not await claim(tx, "recovery")
                        ):
                            raise invalid_challenge()  # the recovery code stays unused
                    if used is not None:
                        return "recovery"
        raise invalid_otp()

    async def limit(self, limit: str, user_id: uuid.UUID, client: ClientInfo) -> None:
        """The client address's budget for the operation, and the account's."""
        await self.limiter.hit(limit, client_key(client.ip))
        await self.limiter.hit("totp_account", str(user_id))

    # -- helpers ---------------------------------------------------------------------------

    async def is_on(self, user_id: uuid.UUID) -> bool:
        async with self.statements.connection() as conn:
            credential = await conn.first(_CREDENTIAL, {"uid": user_id})
        return credential is not None and credential["confirmed_at"] is not None

    async def confirmed(self, user_id: uuid.UUID) -> Mapping[str, Any]:
        """The confirmed credential; INVALID_INPUT where two-factor is off."""
        async with self.statements.connection() as conn:
            credential = await conn.first(_CREDENTIAL, {"uid": user_id})
        if credential is None or credential["confirmed_at"] is None:
            raise AuthFailure(ErrorCode.INVALID_INPUT, "Two-factor sign-in is not on.")
        return credential

    async def _new_recovery_codes(
        self, user_id: uuid.UUID
    ) -> tuple[list[str], list[dict[str, Any]]]:
        codes: list[str] = []
        lookups: dict[str, int] = {}
        while len(codes) < RECOVERY_CODE_COUNT:
            code = new_recovery_code()
            normalized = normalize_recovery_code(code)
            assert normalized is not None  # noqa: S101 - made by new_recovery_code
            lookup = recovery_lookup(self._recovery_key, normalized)
            if lookup in lookups.values():
                continue  # each code must be the only one behind its lookup value
            codes.append(code)
            lookups[normalized] = lookup
        rows = []
        for normalized, lookup in lookups.items():
            rows.append(
                {
                    "uid": user_id,
                    "lookup": lookup,
                    # argon2id, salted: 50 bits under a fast hash would fall to one GPU-day.
                    "code_hash": await self.hasher.hash(normalized),
                }
            )
        return codes, rows

    async def _store_recovery_codes(
        self, tx: Runner, user_id: uuid.UUID, rows: list[dict[str, Any]]
    ) -> None:
        now = self.clock.now()
        await tx.execute(_DROP_RECOVERY_CODES, {"uid": user_id})
        for row in rows:
            await tx.execute(_ADD_RECOVERY_CODE, {**row, "now": now})


def _require_verified(user: UserView) -> None:
    if not user.email_verified:
        raise AuthFailure(
            ErrorCode.INVALID_INPUT,
            "Verify your email address before turning on two-factor sign-in.",
        )


def _already_on() -> AuthFailure:
    return AuthFailure(ErrorCode.INVALID_INPUT, "Two-factor sign-in is already on.")


async def reseal_all(statements: Statements, box: SecretBox) -> tuple[int, int]:
    """Re-encrypts every TOTP secret under the first of ENCRYPTION_KEYS (key rotation):
    (re-encrypted, not decryptable with any configured key). One short transaction per
    secret, so sign-ins are not held up behind a long rotation."""
    async with statements.connection() as conn:
        user_ids = await conn.scalars(_ALL_CREDENTIALS, {})
    done = failed = 0
    for user_id in user_ids:
        async with statements.transaction() as tx:
            row = await tx.first(_CREDENTIAL_FOR_UPDATE, {"uid": user_id})
            if row is None:
                continue  # disabled meanwhile
            try:
                resealed = box.reseal(row["secret_sealed"])
            except ValueError:
                failed += 1
                continue
            await tx.execute(_RESEAL, {"uid": user_id, "secret_sealed": resealed})
            done += 1
    return done, failed
