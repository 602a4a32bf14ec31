"""Two-factor: TOTP enrolment, recovery codes, and the per-account limit on wrong codes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, literal, null, or_, select, update

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode, UniqueViolation, invalid_challenge, invalid_otp
from db.models import LoginThrottle, RecoveryCode, TotpCredential, User
from db.security.box import SecretBox
from db.security.device import DeviceTokens
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
from db.services.notices import Notices
from db.services.types import ClientInfo
from db.session import Runner, Statements
from db.validation import could_be_a_password, normalize_password

# Takes what a code is for (a challenge) inside the transaction that spends it; told
# which kind of code it was ("totp" or "recovery").
Claim = Callable[[Runner, str], Awaitable[bool]]
# Runs first in that transaction: the locks the claim will need, in the caller's order.
Lock = Callable[[Runner], Awaitable[None]]

# Wrong codes per account, across challenges and mutations, before code checks refuse.
ACCOUNT_CODE_FAILURES = 10
ACCOUNT_CODE_WINDOW = timedelta(minutes=15)


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

# Wrong codes per account and client (see _reserve_check), in the throttles table under
# a key of their own: the window's start, and the checks counted in it.
_CHECKS = (
    select(LoginThrottle.failures, LoginThrottle.last_failure_at)
    .where(LoginThrottle.email == bindparam("key"))
    .with_for_update()
)
_FIRST_CHECK = insert(LoginThrottle).values(
    email=bindparam("key"),
    failures=literal(1),
    last_failure_at=bindparam("now"),
    locked_until=null(),
)
_SET_CHECKS = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("key"))
    .values(failures=bindparam("failures"), last_failure_at=bindparam("since"))
)
_REFUND_CHECK = (
    update(LoginThrottle)
    .where(LoginThrottle.email == bindparam("key"), LoginThrottle.failures > 0)
    .values(failures=LoginThrottle.failures - 1)
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
        devices: DeviceTokens,
        events: SecurityEvents,
    ) -> None:
        self.events = events
        self.limiter = limiter
        self.devices = devices
        self.statements = statements
        self.box = box
        self.hasher = hasher
        self.clock = clock
        self.issuer = issuer
        self._recovery_key = recovery_key
        self.notices = notices

    # -- enrolment -------------------------------------------------------------------------

    async def setup(self, *, user_id: uuid.UUID, email: str) -> TotpEnrolment:
        """A new pending secret (replacing a pending one); refused once two-factor is on."""
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
        self, *, user_id: uuid.UUID, email: str, code: str, client: ClientInfo
    ) -> list[str]:
        """Turns two-factor on with a current code from the pending secret; the recovery
        codes, shown once."""
        await self._limit("confirm_totp_ip", user_id, client)
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
            client=self._budget(client),
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
            await self.notices.send(tx, email=email, template="totp_enabled", client=client)
            await self.events.record(tx, EventKind.TOTP_ENABLED, user_id=user_id, client=client)
        self.notices.outbox.wake()
        return codes

    async def regenerate_recovery_codes(
        self, *, user_id: uuid.UUID, code: str, client: ClientInfo
    ) -> list[str]:
        """Replaces every recovery code; needs a current TOTP code."""
        await self._limit("regenerate_recovery_codes_ip", user_id, client)
        credential = await self._confirmed(user_id)
        await self.check_code(
            user_id=user_id,
            code=code,
            credential=credential,
            recovery=False,
            client=self._budget(client),
        )
        codes, rows = await self._new_recovery_codes(user_id)
        async with self.events.transaction(self.statements) as tx:
            await self._store_recovery_codes(tx, user_id, rows)
        return codes

    async def disable(
        self, *, user_id: uuid.UUID, email: str, password: str, code: str, client: ClientInfo
    ) -> None:
        """Turns two-factor off: needs the password and a current or recovery code."""
        await self._limit("disable_totp_ip", user_id, client)
        credential = await self._confirmed(user_id)
        password = normalize_password(password)
        async with self.statements.connection() as conn:
            row = await conn.first(PASSWORD_HASH, {"uid": user_id})
        ok = False
        if row is not None and could_be_a_password(password):
            ok, _new_hash = await self.hasher.verify(password, row["password_hash"])
        if not ok:
            raise AuthFailure(ErrorCode.INVALID_CREDENTIALS, "The password is incorrect.")
        await self.check_code(
            user_id=user_id,
            code=code,
            credential=credential,
            recovery=True,
            client=self._budget(client),
        )
        async with self.events.transaction(self.statements) as tx:
            await tx.execute(_DROP_RECOVERY_CODES, {"uid": user_id})
            await tx.execute(_DROP_CREDENTIAL, {"uid": user_id})
            await self.notices.send(tx, email=email, template="totp_disabled", client=client)
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
        key = f"otp:{user_id}:{client}"
        await self._reserve_check(key, now)
        # A wrong code leaves the reserved check counted; a right one gives it back.
        method = await self._verify(
            user_id, code, credential, recovery=recovery, now=now, claim=claim, lock=lock
        )
        async with self.events.transaction(self.statements) as tx:
            await tx.execute(_REFUND_CHECK, {"key": key})
        return method

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
        if credential is not None:
            secret = self.box.open(credential["secret_sealed"])
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
        normalized = normalize_recovery_code(code) if recovery else None
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

    async def _reserve_check(self, key: str, now: datetime) -> None:
        """Takes one check of the window's budget, or refuses: the row lock serialises
        parallel guesses, so none passes the cap."""
        for _attempt in range(3):
            try:
                async with self.events.transaction(self.statements) as tx:
                    row = await tx.first(_CHECKS, {"key": key})
                    if row is None:
                        await tx.execute(_FIRST_CHECK, {"key": key, "now": now})
                        return
                    since, failures = row["last_failure_at"], row["failures"]
                    if now - since >= ACCOUNT_CODE_WINDOW or failures == 0:
                        since, failures = now, 0  # a new window
                    if failures >= ACCOUNT_CODE_FAILURES:
                        wait = (since + ACCOUNT_CODE_WINDOW - now).total_seconds()
                        raise AuthFailure(
                            ErrorCode.RATE_LIMITED,
                            "Too many wrong codes for this account; try again later.",
                            retry_after=max(1, math.ceil(wait)),
                        )
                    await tx.execute(
                        _SET_CHECKS, {"key": key, "failures": failures + 1, "since": since}
                    )
                    return
            except UniqueViolation:
                continue  # a concurrent first check made the row: count on top of it

    async def _limit(self, limit: str, user_id: uuid.UUID, client: ClientInfo) -> None:
        """The client address's budget for the operation, and the account's."""
        await self.limiter.hit(limit, client_key(client.ip))
        await self.limiter.hit("totp_account", str(user_id))

    def _budget(self, client: ClientInfo) -> str:
        return self.devices.budget_key(client.ip, client.device_token)

    # -- helpers ---------------------------------------------------------------------------

    async def is_on(self, user_id: uuid.UUID) -> bool:
        async with self.statements.connection() as conn:
            credential = await conn.first(_CREDENTIAL, {"uid": user_id})
        return credential is not None and credential["confirmed_at"] is not None

    async def _confirmed(self, user_id: uuid.UUID) -> Mapping[str, Any]:
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
