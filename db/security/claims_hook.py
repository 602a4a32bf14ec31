"""The claims hook: claims an operator's code adds to every access token.

Either a Python callable (`CLAIMS_HOOK`, `module:function`, async) or an HTTPS endpoint
(`CLAIMS_HOOK_URL`, its requests signed per Standard Webhooks with `CLAIMS_HOOK_SECRET`).
It is asked where tokens are issued (a sign-in, a refresh, a step-up), inside the
transaction of that change, and it fails closed: a hook that fails, times out or answers
what cannot be used fails the request (SERVICE_UNAVAILABLE, and a log line that says why)
and the change rolls back. An access token never lacks the claims an app relies on.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
from standardwebhooks.webhooks import Webhook

from db.clock import Clock
from db.providers.http import ProviderHttp
from db.settings import ConfigError, Settings

log = logging.getLogger("strawgate.claims_hook")

HOOK_TIMEOUT = 2.0  # seconds, the whole call
# The claims Strawgate sets, which a hook never changes (nbf too: a hook must not make a
# token that is not valid yet). `typ` is a header of ours, kept out of the claims too.
RESERVED_CLAIMS = frozenset(
    {
        *("sub", "sid", "iss", "aud", "exp", "iat", "nbf", "jti", "typ", "amr", "auth_time"),
        "roles",
        # Hashes a JWT library checks against a token it is given beside this one: a token
        # carrying either fails verification (python-jose refuses it with no such token).
        "at_hash",
        "c_hash",
    }
)
MAX_ANSWER_BYTES = 16 * 1024  # of an endpoint's answer

Reason = Literal["sign-in", "refresh", "step-up"]


class ClaimsHookFailed(Exception):
    """The hook failed or answered what cannot be used; the message says why (for the log,
    never a secret): the request fails with SERVICE_UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class ClaimsRequest:
    """What the hook is told about the token being issued."""

    user_id: uuid.UUID
    email: str
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    session_id: uuid.UUID
    reason: Reason

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["user_id"] = str(self.user_id)
        data["session_id"] = str(self.session_id)
        data["roles"] = list(self.roles)
        data["amr"] = list(self.amr)
        return data


ClaimsHook = Callable[[ClaimsRequest], Awaitable[Mapping[str, Any]]]


class ClaimsSource:
    """Asks the configured hook and checks what it answers."""

    def __init__(
        self,
        hook: ClaimsHook,
        *,
        name: str,
        timeout: float = HOOK_TIMEOUT,
        max_concurrent: int = 10,
    ) -> None:
        self._hook = hook
        self.name = name
        self._timeout = timeout
        # The hook is asked inside a transaction: each call in flight holds a database
        # connection. Past this many at once (half the pool), a call fails at once rather
        # than wait, so a slow hook cannot take every connection from the other requests.
        self.max_concurrent = max_concurrent
        self._in_flight = 0

    async def claims(self, request: ClaimsRequest) -> dict[str, Any]:
        """The hook's claims for this token, reserved ones dropped (with a warning); raises
        ClaimsHookFailed when the hook fails, takes longer than the timeout or answers
        anything but an object of JSON values."""
        if self._in_flight >= self.max_concurrent:
            raise self._failed(
                request,
                f"{self._in_flight} calls are already waiting for it (at most"
                f" {self.max_concurrent} at once: DB_POOL_SIZE / 2)",
            )
        self._in_flight += 1
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._hook(request)
        except ClaimsHookFailed as exc:
            raise self._failed(request, str(exc)) from None
        except TimeoutError:
            raise self._failed(request, f"no answer within {self._timeout:g} s") from None
        except Exception as exc:
            log.error(
                "claims hook %s raised for a %s token of user %s",
                self.name,
                request.reason,
                request.user_id,
                exc_info=exc,
            )
            raise ClaimsHookFailed(f"the claims hook failed ({type(exc).__name__})") from None
        finally:
            self._in_flight -= 1
        if not isinstance(answer, Mapping):
            raise self._failed(request, f"answered {type(answer).__name__}, not an object")
        claims: dict[str, Any] = {}
        refused: list[str] = []
        for key, value in answer.items():
            if not isinstance(key, str) or not key:
                raise self._failed(request, "answered a claim without a name")
            if key in RESERVED_CLAIMS:
                refused.append(key)
                continue
            claims[key] = value
        if refused:
            log.warning(
                "claims hook %s tried to set reserved claims %s; they keep Strawgate's values",
                self.name,
                ", ".join(sorted(refused)),
            )
        try:
            # JSON values only: orjson refuses anything else, but writes NaN and the
            # infinities (which JSON has no word for) as null; those are looked for apart.
            orjson.dumps(claims)
            _finite(claims)
        except (TypeError, ValueError, orjson.JSONEncodeError):
            raise self._failed(request, "answered claims that are not JSON values") from None
        return claims

    async def aclose(self) -> None:
        close = getattr(self._hook, "aclose", None)
        if close is not None:
            await close()

    def too_big(self, request: ClaimsRequest, size: int, limit: int) -> ClaimsHookFailed:
        return self._failed(
            request, f"its claims make the access token {size} bytes (it must stay under {limit})"
        )

    def _failed(self, request: ClaimsRequest, why: str) -> ClaimsHookFailed:
        log.error(
            "claims hook %s: %s; the %s of user %s fails (no token without the claims)",
            self.name,
            why,
            request.reason,
            request.user_id,
        )
        return ClaimsHookFailed(f"claims hook {self.name}: {why}")


def _finite(value: Any) -> None:
    """ValueError for a NaN or an infinity anywhere in `value` (what orjson.dumps took:
    dicts, lists and tuples of JSON values), walked without recursion."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is float:
            if not math.isfinite(item):
                raise ValueError("not finite")
        elif kind is dict:
            pending.extend(item.values())
        elif kind is list or kind is tuple:
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("not finite")  # a float subclass
        elif isinstance(item, dict):
            pending.extend(item.values())


def load_callable(spec: str) -> ClaimsHook:
    """`module:function`, imported now: a ConfigError names what is wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"CLAIMS_HOOK must be module:function, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"CLAIMS_HOOK: module {module_name!r} cannot be imported ({exc})"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"CLAIMS_HOOK: {module_name} has no {attribute!r}")
    if not inspect.iscoroutinefunction(target) and not inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an async callable object counts too
    ):
        raise ConfigError(f"CLAIMS_HOOK: {spec} must be an async function")
    function: ClaimsHook = target
    return function


class HttpClaimsHook:
    """POSTs the request as JSON to CLAIMS_HOOK_URL, signed per Standard Webhooks; the
    endpoint answers 200 with `{"claims": {...}}`."""

    def __init__(self, *, url: str, secret: str, http: ProviderHttp, clock: Clock) -> None:
        self._url = url
        self._signer = Webhook(secret)
        self._http = http  # checked addresses, bounded reads (db/webhooks/outbound.py)
        self._clock = clock

    async def __call__(self, request: ClaimsRequest) -> Mapping[str, Any]:
        body = orjson.dumps(request.to_json())
        message_id = f"msg_{uuid.uuid4().hex}"
        now = self._clock.now()
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._signer.sign(message_id, now, body),
        }
        try:
            response = await self._http.request("POST", self._url, content=body, headers=headers)
        except Exception as exc:
            raise ClaimsHookFailed(f"cannot be reached ({_reason(exc)})") from None
        if response.status_code != 200:
            raise ClaimsHookFailed(f"answered HTTP {response.status_code}")
        if len(response.content) > MAX_ANSWER_BYTES:
            raise ClaimsHookFailed(f"answered more than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ClaimsHookFailed("answered something that is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("claims"), dict):
            raise ClaimsHookFailed('answered no {"claims": {...}} object')
        claims: dict[str, Any] = answer["claims"]
        return claims

    async def aclose(self) -> None:
        await self._http.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _max_concurrent(settings: Settings) -> int:
    return max(1, settings.db_pool_size // 2)


def check_claims_hook(settings: Settings) -> None:
    """ConfigError, naming the setting, for a hook that cannot work: at start."""
    if settings.claims_hook:
        load_callable(settings.claims_hook)
    elif settings.claims_hook_url:
        from db.webhooks.outbound import endpoint_problem

        if settings.claims_hook_secret is None:
            raise ConfigError("CLAIMS_HOOK_URL needs CLAIMS_HOOK_SECRET (whsec_...)")
        problem = endpoint_problem(
            settings.claims_hook_url, allow_private=settings.webhook_allow_private
        )
        if problem is not None:
            raise ConfigError(f"CLAIMS_HOOK_URL {problem}")


def claims_source_from_settings(settings: Settings, *, clock: Clock) -> ClaimsSource | None:
    """The configured hook (CLAIMS_HOOK before CLAIMS_HOOK_URL), or None."""
    if settings.claims_hook:
        return ClaimsSource(
            load_callable(settings.claims_hook),
            name=settings.claims_hook,
            timeout=settings.claims_hook_timeout,
            max_concurrent=_max_concurrent(settings),
        )
    if settings.claims_hook_url:
        from db.webhooks.outbound import outbound_http, shown

        check_claims_hook(settings)
        assert settings.claims_hook_secret is not None  # noqa: S101 - checked above
        hook = HttpClaimsHook(
            url=settings.claims_hook_url,
            secret=settings.claims_hook_secret.get_secret_value(),
            http=outbound_http(
                timeout=settings.claims_hook_timeout,
                allow_private=settings.webhook_allow_private,
                keep_body=True,
            ),
            clock=clock,
        )
        # Named as the webhooks show endpoints (no path or query, where a token may be).
        return ClaimsSource(
            hook,
            name=shown(settings.claims_hook_url),
            timeout=settings.claims_hook_timeout,
            max_concurrent=_max_concurrent(settings),
        )
    return None
