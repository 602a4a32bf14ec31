"""The second factors of the user's own: an authenticator (TOTP) code or a recovery code,
completing a TOTP step (db/services/mfa.py checks the code). What follows is decided by
signin/conclusion.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, func, select

from db.errors import invalid_challenge
from db.mail.outbox import Outbox
from db.models import RecoveryCode
from db.services.challenges import Challenges
from db.services.device_trust import DeviceTrust
from db.services.events import EventKind, SecurityEvents
from db.services.mfa import TwoFactor
from db.services.notices import Notices
from db.services.sessions import Sessions
from db.services.signin.conclusion import USER_BY_ID, Conclusion, Intent
from db.services.types import (
    AMR_RECOVERY_CODE,
    AMR_TOTP,
    ClientInfo,
    IssuedChallenge,
    IssuedSession,
    merge_amr,
)
from db.session import Runner

_UNUSED_RECOVERY_CODES = select(func.count(RecoveryCode.id)).where(
    RecoveryCode.user_id == bindparam("uid"), RecoveryCode.used_at.is_(None)
)


class SecondFactors:
    def __init__(
        self,
        *,
        two_factor: TwoFactor,
        trust: DeviceTrust,
        events: SecurityEvents,
        outbox: Outbox,
        challenges: Challenges,
        notices: Notices,
        sessions: Sessions,
        conclusion: Conclusion,
    ) -> None:
        self.two_factor = two_factor
        self.trust = trust
        self.events = events
        self.outbox = outbox
        self.challenges = challenges
        self.notices = notices
        self.sessions = sessions
        self.conclusion = conclusion

    async def complete(
        self, challenge: Mapping[str, Any], code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Completes a TOTP step by a current code or an unused recovery code: spent, and
        handed over to the one place, in one transaction under the account's lock."""
        user_id = challenge["user_id"]
        if user_id is None:  # pragma: no cover - TOTP challenges always have a user
            raise invalid_challenge()
        intent = Intent(
            purpose=challenge["purpose"],
            session_id=challenge["session_id"],
            new_password_hash=challenge["pending_password_hash"],
        )
        issued: list[IssuedSession | IssuedChallenge] = []

        async def lock(tx: Runner) -> None:
            # First in the transaction that spends the code (see _LOCK_USER).
            await self.sessions.lock_user(
                tx, user_id, exclusive=intent.new_password_hash is not None
            )

        async def claim(tx: Runner, method: str) -> bool:
            # In the transaction that spends the code: of two requests racing on one
            # challenge, the loser's code stays unspent; and the session is made there
            # too, so a password change cannot slip in between.
            if not await self.challenges.consume(tx, challenge["id"]):
                return False
            if method == "recovery":
                await self._recovery_code_used(tx, user_id, client)
            amr = merge_amr(
                challenge["amr"].split(), AMR_TOTP if method == "totp" else AMR_RECOVERY_CODE
            )
            issued.append(
                await self.conclusion.conclude(tx, user_id, amr=amr, client=client, intent=intent)
            )
            return True

        await self.two_factor.check_code(
            user_id=user_id,
            code=code,
            recovery=True,
            claim=claim,
            lock=lock,
            client=await self.trust.budget_of(client, user_id, not_session=challenge["session_id"]),
        )
        self.outbox.wake()
        return issued[0]

    async def _recovery_code_used(self, tx: Runner, user_id: uuid.UUID, client: ClientInfo) -> None:
        user = await tx.first(USER_BY_ID, {"user_id": user_id})
        remaining = await tx.scalars(_UNUSED_RECOVERY_CODES, {"uid": user_id})
        if user is not None:
            await self.notices.send(
                tx,
                user_id=user_id,
                email=user["email"],
                template="recovery_code_used",
                client=client,
                remaining=int(remaining[0]),
            )
        await self.events.record(
            tx,
            EventKind.RECOVERY_CODE_USED,
            user_id=user_id,
            client=client,
            details={"remaining": int(remaining[0])},
        )
