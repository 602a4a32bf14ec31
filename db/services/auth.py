"""Signing in, the composition root: `AuthService` builds the ways in and what they share,
and is what the resolvers and the other services call.

- db/services/signin/conclusion.py: what follows a proven credential (`conclude`), the
  one place every way in hands over to.
- db/services/signin/password.py: the way in by password (login, step-up, the check
  before a sensitive change, changing it).
- db/services/signin/emailed_code.py: the way in by emailed code (sign-in, verification,
  step-up, change of address).
- db/services/signin/second_factor.py: TOTP and recovery codes (the TOTP step).
- db/services/signin/passkey.py: the way in by passkey (a sign-in ceremony, the TOTP
  step answered by a passkey, a step-up).
- db/services/signin/identity.py: the way in by another identity provider (native apps'
  ID tokens, the account decisions, linking and unlinking); signin/identity_redirect.py:
  the web redirect through a provider.
- db/services/signin/signup.py: a new account.
- db/services/sessions.py: sessions, their tokens, refresh, logout, the per-request check.

Here: the front doors that pick a way in (reauthenticate: a password or an emailed code;
verifyOtp: an emailed code or a TOTP step) and what every code a challenge takes goes
through (its per-client budget, a wrong one recorded).

These services open their own transactions rather than taking one from the caller:
a password hash (tens of milliseconds in a worker thread) sits between reading the user
and writing the session, and no database connection is held across it. They run fixed
Core statements through `Statements` (see db/session.py): this is the request path of
every client, and ORM units of work cost more here than the queries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

from db.clock import Clock
from db.errors import AuthFailure, ErrorCode
from db.mail.outbox import Outbox
from db.providers.registry import IdentityProviders
from db.security.access import AccessClaims, AccessTokenCodec
from db.security.claims_hook import ClaimsSource
from db.security.device import DeviceTokens
from db.security.limiter import RateLimiter, client_key
from db.security.passwords import PasswordHasher
from db.security.tokens import token_digest
from db.services import challenges as ch
from db.services.challenges import Challenges
from db.services.device_trust import DeviceTrust
from db.services.events import EventKind, SecurityEvents
from db.services.lockout import CodeChecks, Lockout
from db.services.mfa import TwoFactor
from db.services.notices import Notices
from db.services.passkey_options import PasskeyOptions
from db.services.sessions import Sessions
from db.services.signin.conclusion import Conclusion
from db.services.signin.emailed_code import EmailedCodes
from db.services.signin.identity import IdentitySignIns
from db.services.signin.identity_redirect import IdentityRedirects
from db.services.signin.passkey import PasskeySignIns
from db.services.signin.password import Passwords
from db.services.signin.second_factor import SecondFactors
from db.services.signin.signup import Signups
from db.services.types import ClientInfo, IssuedChallenge, IssuedSession, UserView
from db.session import Statements
from db.settings import RelyingParty
from db.validation import parse_email

__all__ = ["AuthService", "ClientInfo", "IssuedChallenge", "IssuedSession", "UserView"]


class AuthService:
    def __init__(
        self,
        *,
        statements: Statements,
        hasher: PasswordHasher,
        access_tokens: AccessTokenCodec,
        refresh_key: bytes,
        clock: Clock,
        refresh_lifetime: timedelta,
        reuse_interval: timedelta,
        password_min_length: int,
        two_factor: TwoFactor,
        challenges: Challenges,
        outbox: Outbox,
        notices: Notices,
        require_email_verification: bool,
        devices: DeviceTokens,
        trust: DeviceTrust,
        lockout: Lockout,
        code_lockout: Lockout,
        code_checks: CodeChecks,
        limiter: RateLimiter,
        events: SecurityEvents,
        idle_timeout: timedelta = timedelta(0),
        max_sessions: int = 50,
        reauth_window: timedelta = timedelta(minutes=10),
        relying_party: RelyingParty | None = None,
        passkey_decoy_key: bytes = b"",
        identity_providers: IdentityProviders,
        identity_flow_key: bytes,
        claims_hook: ClaimsSource | None = None,
    ) -> None:
        self.events = events
        self.devices = devices
        self.trust = trust
        self.lockout = lockout
        self.code_lockout = code_lockout
        self.code_checks = code_checks
        self.limiter = limiter
        self.statements = statements
        self.hasher = hasher
        self.access_tokens = access_tokens
        self.clock = clock
        self.password_min_length = password_min_length
        self.two_factor = two_factor
        self.challenges = challenges
        self.outbox = outbox
        self.notices = notices
        self.require_email_verification = require_email_verification
        self.sessions = Sessions(
            statements=statements,
            access_tokens=access_tokens,
            refresh_key=refresh_key,
            clock=clock,
            refresh_lifetime=refresh_lifetime,
            reuse_interval=reuse_interval,
            devices=devices,
            limiter=limiter,
            events=events,
            notices=notices,
            idle_timeout=idle_timeout,
            max_sessions=max_sessions,
            reauth_window=reauth_window,
            claims_hook=claims_hook,
        )
        # Request options of passkey ceremonies; off (None) while WEBAUTHN_RP_ID is unset.
        self.passkey_options = PasskeyOptions(
            relying_party=relying_party, decoy_key=passkey_decoy_key
        )
        self.conclusion = Conclusion(
            clock=clock,
            sessions=self.sessions,
            challenges=challenges,
            notices=notices,
            events=events,
            require_email_verification=require_email_verification,
            passkey_options=self.passkey_options,
        )
        self.passwords = Passwords(
            statements=statements,
            hasher=hasher,
            clock=clock,
            limiter=limiter,
            trust=trust,
            lockout=lockout,
            events=events,
            outbox=outbox,
            challenges=challenges,
            notices=notices,
            sessions=self.sessions,
            conclusion=self.conclusion,
        )
        self.signups = Signups(
            statements=statements,
            hasher=hasher,
            clock=clock,
            limiter=limiter,
            events=events,
            outbox=outbox,
            challenges=challenges,
            sessions=self.sessions,
            password_min_length=password_min_length,
            require_email_verification=require_email_verification,
        )
        self.emailed_codes = EmailedCodes(
            statements=statements,
            clock=clock,
            limiter=limiter,
            trust=trust,
            code_lockout=code_lockout,
            code_checks=code_checks,
            events=events,
            outbox=outbox,
            challenges=challenges,
            notices=notices,
            sessions=self.sessions,
            conclusion=self.conclusion,
        )
        self.second_factors = SecondFactors(
            two_factor=two_factor,
            trust=trust,
            events=events,
            outbox=outbox,
            challenges=challenges,
            notices=notices,
            sessions=self.sessions,
            conclusion=self.conclusion,
        )
        self.passkey_sign_ins = PasskeySignIns(
            statements=statements,
            clock=clock,
            limiter=limiter,
            lockout=lockout,
            events=events,
            challenges=challenges,
            sessions=self.sessions,
            conclusion=self.conclusion,
            options=self.passkey_options,
        )
        self.identities = IdentitySignIns(
            statements=statements,
            clock=clock,
            limiter=limiter,
            events=events,
            outbox=outbox,
            notices=notices,
            sessions=self.sessions,
            conclusion=self.conclusion,
            providers=identity_providers,
        )
        self.identity_redirects = IdentityRedirects(
            statements=statements,
            clock=clock,
            limiter=limiter,
            sessions=self.sessions,
            sign_ins=self.identities,
            flow_key=identity_flow_key,
        )

        # What the resolvers and the other services call, by the names they know.
        self.signup = self.signups.signup
        self.login = self.passwords.login
        self.start_passkey_login = self.passkey_sign_ins.start
        self.finish_passkey_login = self.passkey_sign_ins.finish
        self.conclude = self.conclusion.conclude
        self.check_current_password = self.passwords.check_current_password
        self.prove_password = self.passwords.prove_password
        self.acting = self.passwords.acting
        self.change_password_now = self.passwords.change_password_now
        self.emailed_code_check = self.emailed_codes.emailed_code_check
        self.spending = self.emailed_codes.spending
        self.unspent = self.emailed_codes.unspent
        self.is_recent = self.sessions.is_recent
        self.require_recent = self.sessions.require_recent
        self.lock_user = self.sessions.lock_user
        self.lock_sessions = self.sessions.lock_sessions
        self.open_session = self.sessions.open_session
        self.replace_refresh_token = self.sessions.replace_refresh_token
        self.issue = self.sessions.issue
        self.refresh = self.sessions.refresh
        self.logout = self.sessions.logout
        self.decode_access_token = self.sessions.decode_access_token
        self.current_user = self.sessions.current_user

    # -- the front doors that pick a way in -------------------------------------------

    async def reauthenticate(
        self,
        *,
        user: UserView,
        claims: AccessClaims,
        password: str | None,
        email_code: bool,
        client: ClientInfo,
    ) -> IssuedSession | IssuedChallenge:
        """Step-up on this session: the password (its wrong attempts count as a login's),
        or with none, a code mailed to the address and, where the user has passkeys, one
        of them (finishPasskeyLogin; with `email_code` false only a passkey); then the
        TOTP step where two-factor is on (a passkey needs none). Answers this session
        re-issued with a fresh auth_time, or the challenge."""
        address = parse_email(user.email).normalized
        if password is None:
            return await self.emailed_codes.reauthenticate(
                user=user, claims=claims, address=address, email_code=email_code, client=client
            )
        return await self.passwords.reauthenticate(
            user=user, claims=claims, address=address, password=password, client=client
        )

    async def verify_otp(
        self, *, challenge_token: str, code: str, client: ClientInfo
    ) -> IssuedSession | IssuedChallenge:
        """Completes a TOTP step (a current code or an unused recovery code), or an
        emailed sign-in, verification, change-of-address or step-up code. An emailed
        reset code is not taken here. A wrong code costs the same whether or not the
        address has an account."""
        await self.limiter.hit("verify_otp_ip", client_key(client.ip))
        await self.limit_code_checks(challenge_token, client)
        challenge = await self.challenges.take_attempt(ch.TAKE_FOR_VERIFY_OTP, challenge_token)
        async with self.recording_wrong_codes(challenge, client, step=challenge["method"].lower()):
            if challenge["method"] == ch.EMAIL:
                return await self.emailed_codes.complete(challenge, code, client)
            return await self.second_factors.complete(challenge, code, client)

    # -- every code a challenge takes -------------------------------------------------

    async def limit_code_checks(self, challenge_token: str, client: ClientInfo) -> None:
        """Wrong-code budgets count per challenge and per client: another client's
        guesses never use up this one's."""
        digest = token_digest(challenge_token).hex()[:32] if challenge_token else "-"
        budget = self.devices.budget_key(client.ip, client.device_token)
        await self.limiter.hit("verify_otp_challenge", f"{digest}:{budget}")

    @contextlib.asynccontextmanager
    async def recording_wrong_codes(
        self, challenge: Mapping[str, Any], client: ClientInfo, *, step: str
    ) -> AsyncIterator[None]:
        """A wrong code checked in the block (INVALID_OTP) is recorded as a failed
        sign-in, for an unknown address too (as a wrong password is): the same write
        either way, so the time of a wrong code tells nothing."""
        try:
            yield
        except AuthFailure as failure:
            if failure.code is ErrorCode.INVALID_OTP:
                await self.events.record_now(
                    self.statements,
                    EventKind.LOGIN_FAILED,
                    user_id=challenge["user_id"],
                    client=client,
                    email=challenge["email"],
                    details={"step": step},
                )
            raise
