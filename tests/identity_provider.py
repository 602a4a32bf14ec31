"""Identity providers on loopback for the tests of "sign in with Google/Apple/GitHub/any
OpenID Connect provider": a small but real OpenID Connect provider (`LocalProvider`) and a
stub of GitHub's OAuth 2.0 (`LocalGitHub`, which is not OpenID Connect). Each is a
Starlette app served by uvicorn in a thread of this process on 127.0.0.1, over plain HTTP
(the app allows insecure providers in tests), so a test can set who signs in next, refuse
the next sign-in, break an endpoint in a chosen way, and read every request received.

They check what a provider checks (known client, PKCE S256, single-use codes that expire,
the same redirect_uri, client authentication) so a client that gets it wrong fails here as
it would against Google, Apple or GitHub. Every wait is bounded; stop() never hangs on a
"slow" endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import re
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any, ClassVar, NamedTuple, Self
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit

import httpx
import uvicorn
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.pg import free_port

# Another port is tried when binding the one picked fails (another worker took it).
PORT_ATTEMPTS = 3
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

DEFAULT_CLIENT_ID = "web-client"
DEFAULT_CLIENT_SECRET = "web-secret"
GITHUB_CLIENT_ID = "github-client"
GITHUB_CLIENT_SECRET = "github-secret"

FAILURE_MODES = frozenset({"slow", "garbage", "error", "huge"})
# What "huge" answers: valid JSON of about 5 MB, for a client that must cap what it reads.
HUGE_BODY = b'{"padding": "' + b"x" * 5_000_000 + b'"}'
GARBAGE_BODY = b"not json{"

# RFC 7636 4.1: 43 to 128 unreserved characters; a S256 challenge is 43 base64url ones.
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")
CLAIMS_SUPPORTED = [
    "iss",
    "sub",
    "aud",
    "iat",
    "exp",
    "auth_time",
    "nonce",
    "email",
    "email_verified",
    "name",
]
_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}

SigningKey = RSAKey | ECKey | OctKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """S256 (RFC 7636 4.2): base64url without padding of the SHA-256 of the verifier."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def pkce_pair() -> tuple[str, str]:
    """A fresh (code_verifier, code_challenge) pair, as a client makes one per sign-in."""
    verifier = b64url(secrets.token_bytes(32))
    return verifier, pkce_challenge(verifier)


def epoch(now: datetime | float | None) -> int:
    """Seconds since the epoch of an injected time (a naive datetime is taken as UTC), or
    of the real time when `now` is None."""
    if now is None:
        return int(time.time())
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return int(now.timestamp())
    return int(now)


def _without_nones(claims: dict[str, Any]) -> dict[str, Any]:
    """A None in overrides removes the claim, so a test can make a token without one."""
    return {name: value for name, value in claims.items() if value is not None}


class _FormReader(HTMLParser):
    """The first form of a page: its action and its inputs' names and values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form" and not self._done and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and "name" in values:
            if values.get("type") == "checkbox" and "checked" not in values:
                return
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True


def parse_form_post(page: str) -> tuple[str, dict[str, str]]:
    """(action, fields) of the first form of an HTML page, as a browser would submit it
    (unchecked checkboxes left out): a form_post answer for an HTTP-client test to POST
    to its action."""
    reader = _FormReader()
    reader.feed(page)
    reader.close()
    assert reader.action is not None, f"no form in the page:\n{page[:2000]}"
    return reader.action, reader.fields


class _RequestLine(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]


class Recorded(_RequestLine):
    """One request received: unpacks as (method, path, query, form); `headers` (names in
    lower case) beside, to see e.g. where the client secret went."""

    headers: dict[str, str]


def _recorded(
    method: str, path: str, query: dict[str, str], form: dict[str, str], headers: dict[str, str]
) -> Recorded:
    item = Recorded(method, path, query, form)
    item.headers = headers
    return item


@dataclass
class _Failure:
    mode: str
    delay: float


class _LoopbackServer:
    """uvicorn serving `routes()` on 127.0.0.1 in a daemon thread. The socket is bound
    here and handed to uvicorn, so the port is known and held before the thread starts;
    start() returns once the server answers, stop() is bounded even with a request in a
    "slow" failure (those sleep in short steps and give up when stopping)."""

    FAIL_ENDPOINTS: ClassVar[frozenset[str]] = frozenset()
    NAME: ClassVar[str] = "server"

    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.reset()

    def reset(self) -> None:
        """No requests recorded, no failures."""
        with self._lock:
            self.requests: list[Recorded] = []
        self._failures: dict[str, _Failure] = {}

    # -- the server ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self.port, f"{self.NAME} not started"
        return f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/_alive", self._alive), *self.routes()])

    async def _alive(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    def start(self) -> Self:
        assert self._thread is None, f"{self.NAME} already started"
        problems: list[str] = []
        for _ in range(PORT_ATTEMPTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", free_port()))
            except OSError as exc:
                sock.close()
                problems.append(str(exc))
                continue
            if self._serve(sock):
                return self
            problems.append(f"no answer on port {self.port} within {START_TIMEOUT} s")
        raise AssertionError(f"{self.NAME} did not start: {problems}")

    def _serve(self, sock: socket.socket) -> bool:
        """Serve on `sock` until it answers (True) or START_TIMEOUT passes (False, all
        stopped again)."""
        self._stopping.clear()
        self.port = int(sock.getsockname()[1])
        self._socket = sock
        config = uvicorn.Config(
            self._app(),
            log_config=None,  # leave the test process's logging as it is
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"{self.NAME}-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=self.base_url, timeout=1.0) as http:
            while time.monotonic() < deadline and self._thread.is_alive():
                if server.started:
                    with contextlib.suppress(httpx.TransportError):
                        if http.get("/_alive").status_code == 200:
                            return True
                time.sleep(0.02)
        self.stop()
        return False

    @staticmethod
    def _run(server: uvicorn.Server, sock: socket.socket) -> None:
        # uvicorn exits with SystemExit when it cannot start: that ends the thread, and
        # start() sees it.
        with contextlib.suppress(SystemExit):
            server.run(sockets=[sock])

    def stop(self) -> None:
        self._stopping.set()
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(STOP_TIMEOUT)
            assert not thread.is_alive(), f"{self.NAME} did not stop in {2 * STOP_TIMEOUT} s"
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests set and read -----------------------------------------------------

    def fail(self, endpoint: str, mode: str, delay: float = 10.0) -> None:
        """Make `endpoint` fail until heal(): "slow" answers normally after `delay`
        seconds, "garbage" is a 200 that is not JSON, "error" a 500, "huge" 5 MB of JSON."""
        assert endpoint in self.FAIL_ENDPOINTS, (
            f"endpoint {endpoint!r} not in {self.FAIL_ENDPOINTS}"
        )
        assert mode in FAILURE_MODES, f"mode {mode!r} not in {FAILURE_MODES}"
        self._failures[endpoint] = _Failure(mode, delay)

    def heal(self, endpoint: str | None = None) -> None:
        """Every endpoint (or just `endpoint`) answers normally again."""
        if endpoint is None:
            self._failures.clear()
        else:
            self._failures.pop(endpoint, None)

    def requests_to(self, path: str, method: str | None = None) -> list[Recorded]:
        """The requests received on `path` (and with `method`), oldest first."""
        with self._lock:
            return [
                item
                for item in self.requests
                if item.path == path and (method is None or item.method == method)
            ]

    # -- helpers of the handlers ---------------------------------------------------------

    async def _record(self, request: Request) -> Recorded:
        body = await request.body()
        form: dict[str, str] = {}
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        item = _recorded(
            request.method,
            request.url.path,
            dict(request.query_params),
            form,
            {name.lower(): value for name, value in request.headers.items()},
        )
        with self._lock:
            self.requests.append(item)
        return item

    async def _failure(self, endpoint: str) -> Response | None:
        """The failing answer of `endpoint`, or None to answer normally (after the wait
        of a "slow" failure)."""
        failure = self._failures.get(endpoint)
        if failure is None:
            return None
        if failure.mode == "slow":
            deadline = time.monotonic() + failure.delay
            # stop() sets a threading.Event from the test's thread: polled in short steps.
            while not self._stopping.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            return None
        if failure.mode == "garbage":
            return Response(GARBAGE_BODY, media_type="application/json")
        if failure.mode == "huge":
            return Response(HUGE_BODY, media_type="application/json")
        return PlainTextResponse("Internal Server Error", status_code=500)

    @staticmethod
    def _redirect(target: str, params: dict[str, str]) -> Response:
        joiner = "&" if urlsplit(target).query else "?"
        return Response(status_code=302, headers={"location": target + joiner + urlencode(params)})

    @staticmethod
    def _valid_redirect_uri(value: str) -> bool:
        parts = urlsplit(value)
        return parts.scheme in {"http", "https"} and bool(parts.netloc) and not parts.fragment


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n"
    )


def _hidden(fields: dict[str, str]) -> str:
    return "\n".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in fields.items()
    )


def _auto_post_page(action: str, fields: dict[str, str]) -> HTMLResponse:
    """What a provider answers in response_mode=form_post: a form that posts itself."""
    body = (
        f'<form method="post" action="{html.escape(action)}">\n{_hidden(fields)}\n'
        '<noscript><button type="submit">Continue</button></noscript>\n</form>\n'
        "<script>document.forms[0].submit()</script>"
    )
    return HTMLResponse(_page("Signing in", body), headers={"cache-control": "no-store"})


def _text_input(name: str, label: str, value: str = "", *, required: bool = False) -> str:
    need = " required" if required else ""
    return (
        f'<p><label for="{name}">{label}</label> '
        f'<input id="{name}" name="{name}" type="text" value="{html.escape(value)}"{need}></p>'
    )


def _consent_page(who: str, action: str, client_id: str, query: str, inputs: str) -> HTMLResponse:
    """A sign-in page for a browser test: the original authorization query travels in
    one hidden field (so no query parameter can collide with a claim's input)."""
    body = (
        f"<h1>{html.escape(who)}</h1>\n"
        f"<p>Sign in to <strong>{html.escape(client_id)}</strong></p>\n"
        f'<form method="post" action="{action}">\n'
        f'<input type="hidden" name="authorize_query" value="{html.escape(query)}">\n'
        f"{inputs}\n"
        '<button type="submit" name="action" value="continue">Continue</button>\n'
        '<button type="submit" name="action" value="cancel" formnovalidate>Cancel</button>\n'
        "</form>"
    )
    return HTMLResponse(_page(who, body), headers={"cache-control": "no-store"})


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    user: dict[str, Any]
    scope: str
    nonce: str | None
    auth_time: int
    expires: float  # time.monotonic()


@dataclass
class _Grant:
    client_id: str
    user: dict[str, Any]
    scope: str


class LocalProvider(_LoopbackServer):
    """An OpenID Connect provider: discovery, JWKS, the authorization code flow with PKCE
    (S256 only) in response modes query and form_post, client_secret_basic and
    client_secret_post, ID tokens signed RS256 (or ES256), and userinfo."""

    FAIL_ENDPOINTS: ClassVar[frozenset[str]] = frozenset(
        {"discovery", "jwks", "authorize", "token", "userinfo"}
    )
    NAME: ClassVar[str] = "Local Provider"
    PATH: ClassVar[str] = "/authorize"

    def __init__(self, *, clients: dict[str, str] | None = None) -> None:
        self._initial_clients = dict(
            clients if clients is not None else {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
        )
        self._keys: list[RSAKey] = [self._new_rsa_key()]
        super().__init__()

    def reset(self) -> None:
        """Everything as constructed (clients, settings, counters, requests, failures, codes
        and tokens), keeping the port and the current RSA key only: one server can serve
        many tests."""
        super().reset()
        self.clients: dict[str, str] = dict(self._initial_clients)
        # Clients whose secret is checked by a function instead (Apple's signed JWT).
        self.secret_checks: dict[str, Callable[[str], bool]] = {}
        # Who signs in at the next /authorize: approved at once, then consumed (unless
        # sticky_user). None shows the consent page.
        self.next_user: dict[str, Any] | None = None
        self.sticky_user = False
        self.deny_next = False  # the next /authorize answers access_denied
        # Sent as the `user` field of form_post answers (Apple sends the name this way).
        self.form_post_user: dict[str, Any] | None = None
        # Merged into the claims of the ID tokens /token issues (a None removes a claim).
        self.id_token_overrides: dict[str, Any] = {}
        self.id_token_alg = "RS256"  # or "ES256": the ID tokens of /token
        self.code_lifetime = 60.0  # seconds of real time
        self.access_token_lifetime = 3600
        self.id_token_lifetime = 600
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self._keys = [self.current_key]
        self._ec_key: ECKey | None = None
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}

    # -- configuration -------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def discovery_url(self) -> str:
        return self.base_url + "/.well-known/openid-configuration"

    def add_client(self, client_id: str, secret: str) -> None:
        self.clients[client_id] = secret

    @staticmethod
    def _new_rsa_key() -> RSAKey:
        return RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)

    @property
    def current_key(self) -> RSAKey:
        """The RSA key that signs ID tokens now."""
        return self._keys[-1]

    def rotate_key(self) -> RSAKey:
        """A new signing key (another kid), published beside the old ones."""
        key = self._new_rsa_key()
        self._keys.append(key)
        return key

    def retire_old_keys(self) -> None:
        """The JWKS keeps only the current RSA key (and the EC key, if made)."""
        self._keys = [self.current_key]

    def ec_key(self) -> ECKey:
        """The provider's P-256 key for ES256, made and published on first use."""
        if self._ec_key is None:
            self._ec_key = ECKey.generate_key(
                "P-256", parameters={"use": "sig", "alg": "ES256"}, auto_kid=True
            )
        return self._ec_key

    @staticmethod
    def foreign_key(kid: str | None = None) -> RSAKey:
        """An RSA key the provider never published (kid `kid`, else its thumbprint)."""
        if kid is None:
            return LocalProvider._new_rsa_key()
        return RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256", "kid": kid})

    def jwks(self) -> dict[str, Any]:
        """What GET /jwks answers: the public halves of the published keys."""
        keys: list[SigningKey] = [*self._keys]
        if self._ec_key is not None:
            keys.append(self._ec_key)
        return {"keys": [key.as_dict(private=False) for key in keys]}

    def public_keys(self) -> KeySet:
        """The published keys as a joserfc KeySet, to verify a token with."""
        return KeySet.import_key_set(self.jwks())  # type: ignore[arg-type]

    def metadata(self) -> dict[str, Any]:
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": base + "/authorize",
            "token_endpoint": base + "/token",
            "userinfo_endpoint": base + "/userinfo",
            "jwks_uri": base + "/jwks",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "form_post"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "claims_supported": CLAIMS_SUPPORTED,
        }

    # -- tokens --------------------------------------------------------------------------

    def sign(
        self,
        claims: dict[str, Any],
        *,
        alg: str = "RS256",
        key: SigningKey | None = None,
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
    ) -> str:
        """A JWS of `claims`. Without `key`: the current RSA key for RS*, the EC key for
        ES*, the client's secret for HS* (as OpenID Connect allows a confidential client),
        none for "none". The header's kid is `kid`, else the key's; a None in `headers`
        removes that header."""
        if alg == "none":
            unsigned = _without_nones({"alg": "none", "typ": "JWT", **(headers or {})})
            encoded = [b64url(json.dumps(part).encode()) for part in (unsigned, claims)]
            return ".".join([*encoded, ""])
        if key is None:
            if alg.startswith("ES"):
                key = self.ec_key()
            elif alg.startswith("HS"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SecurityWarning)  # short test secrets
                    key = OctKey.import_key(self.clients[client_id])
            else:
                key = self.current_key
        header: dict[str, Any] = {"alg": alg}
        chosen_kid = kid if kid is not None else key.kid
        if chosen_kid is not None:
            header["kid"] = chosen_kid
        header = _without_nones({**header, **(headers or {})})
        return jwt.encode(header, claims, key, algorithms=[alg])

    def mint_id_token(
        self,
        claims: dict[str, Any],
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        now: datetime | float | None = None,
        lifetime: int = 600,
        nonce: str | None = None,
        kid: str | None = None,
        key: SigningKey | None = None,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
    ) -> str:
        """An ID token to hand to the app directly (the native-app path): iss, aud
        (client_id), iat (`now`: a datetime or epoch seconds, default the real time),
        auth_time = iat, exp = iat + lifetime, nonce when given; `claims` override any of
        them (a None removes it). Signed as sign() does."""
        issued = epoch(now)
        base: dict[str, Any] = {
            "iss": self.issuer,
            "aud": client_id,
            "iat": issued,
            "exp": issued + lifetime,
            "auth_time": issued,
        }
        if nonce is not None:
            base["nonce"] = nonce
        return self.sign(
            _without_nones({**base, **claims}),
            alg=alg,
            key=key,
            kid=kid,
            headers=headers,
            client_id=client_id,
        )

    # -- endpoints -----------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/.well-known/openid-configuration", self._discovery),
            Route("/jwks", self._jwks),
            Route("/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/token", self._token, methods=["POST"]),
            Route("/userinfo", self._userinfo, methods=["GET", "POST"]),
        ]

    async def _discovery(self, request: Request) -> Response:
        await self._record(request)
        self.discovery_fetches += 1
        if (failed := await self._failure("discovery")) is not None:
            return failed
        return JSONResponse(self.metadata())

    async def _jwks(self, request: Request) -> Response:
        await self._record(request)
        self.jwks_fetches += 1
        if (failed := await self._failure("jwks")) is not None:
            return failed
        return JSONResponse(self.jwks())

    def _answer(self, query: dict[str, str], params: dict[str, str]) -> Response:
        """Back to the client's redirect_uri in the response mode it asked for."""
        if query.get("response_mode") == "form_post":
            return _auto_post_page(query["redirect_uri"], params)
        return self._redirect(query["redirect_uri"], params)

    def _error(self, query: dict[str, str], error: str, description: str) -> Response:
        params = {"error": error, "error_description": description}
        if query.get("state"):
            params["state"] = query["state"]
        return self._answer(query, params)

    def _check_authorize(self, query: dict[str, str]) -> Response | None:
        """None when the request may go on; else the error answer. An unknown client or a
        bad redirect_uri is shown here (never redirected to), as RFC 6749 4.1.2.1 says."""
        if query.get("client_id") not in self.clients:
            return HTMLResponse(_page("Error", "<p>Unknown client_id.</p>"), status_code=400)
        if not self._valid_redirect_uri(query.get("redirect_uri", "")):
            return HTMLResponse(_page("Error", "<p>Invalid redirect_uri.</p>"), status_code=400)
        if query.get("response_mode", "query") not in {"query", "form_post"}:
            return self._error({**query, "response_mode": "query"}, "invalid_request", "bad mode")
        problem = None
        if query.get("response_type") != "code":
            problem = "response_type must be code"
        elif "openid" not in query.get("scope", "").split():
            problem = "scope must contain openid"
        elif not _CHALLENGE.match(query.get("code_challenge", "")):
            problem = "code_challenge missing or malformed"
        elif query.get("code_challenge_method") != "S256":
            problem = "code_challenge_method must be S256"
        elif not query.get("state"):
            problem = "state missing"
        return None if problem is None else self._error(query, "invalid_request", problem)

    async def _authorize(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (failed := await self._failure("authorize")) is not None:
            return failed
        if request.method == "POST":
            return self._consented(recorded.form)
        query = recorded.query
        if (refused := self._check_authorize(query)) is not None:
            return refused
        if self.deny_next:
            self.deny_next = False
            return self._error(query, "access_denied", "The user denied the request.")
        user = self.next_user
        if user is None:
            return self._consent(query)
        if not self.sticky_user:
            self.next_user = None
        return self._approve(query, user)

    def _consent(self, query: dict[str, str]) -> Response:
        inputs = "\n".join(
            [
                _text_input("sub", "Subject", required=True),
                _text_input("email", "Email"),
                '<p><label><input id="email_verified" name="email_verified" type="checkbox" '
                'value="true" checked> Verified</label></p>',
                _text_input("name", "Name"),
            ]
        )
        return _consent_page(self.NAME, self.PATH, query["client_id"], urlencode(query), inputs)

    def _consented(self, form: dict[str, str]) -> Response:
        query = dict(parse_qsl(form.get("authorize_query", ""), keep_blank_values=True))
        if (refused := self._check_authorize(query)) is not None:
            return refused
        if form.get("action") == "cancel":
            return self._error(query, "access_denied", "The user cancelled.")
        if not form.get("sub"):
            return HTMLResponse(_page("Error", "<p>Subject is required.</p>"), status_code=400)
        user: dict[str, Any] = {"sub": form["sub"]}
        if form.get("email"):
            user["email"] = form["email"]
            user["email_verified"] = form.get("email_verified") == "true"
        if form.get("name"):
            user["name"] = form["name"]
        return self._approve(query, user)

    def _approve(self, query: dict[str, str], user: dict[str, Any]) -> Response:
        assert "sub" in user, f"a user needs a sub: {user!r}"
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Code(
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                challenge=query["code_challenge"],
                user=dict(user),
                scope=query["scope"],
                nonce=query.get("nonce"),
                auth_time=int(time.time()),
                expires=time.monotonic() + self.code_lifetime,
            )
        params = {"code": code, "state": query["state"]}
        if query.get("response_mode") == "form_post" and self.form_post_user is not None:
            params["user"] = json.dumps(self.form_post_user)
        return self._answer(query, params)

    def _authenticate(self, request: Request, form: dict[str, str]) -> str | Response:
        """The client_id of an authenticated client, or the error answer (RFC 6749 2.3.1:
        Basic with form-urlencoded id and secret, or both in the body, not both ways)."""
        header = request.headers.get("authorization", "")
        basic = header[:6].lower() == "basic "
        if basic:
            if "client_secret" in form:
                return _oauth_error(400, "invalid_request", "more than one authentication")
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
                raw_id, raw_secret = decoded.split(":", 1)
            except ValueError:
                return _invalid_client(basic, "malformed Basic credentials")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if form.get("client_id", client_id) != client_id:
                return _invalid_client(basic, "client_id differs from the Basic one")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        check = self.secret_checks.get(client_id)
        if check is not None:
            # A client secret that is not a fixed string (Apple's: a JWT the client signs).
            if not check(secret):
                return _invalid_client(basic, "the client secret does not verify")
            return client_id
        known = self.clients.get(client_id)
        if known is None or not hmac.compare_digest(known.encode(), secret.encode()):
            return _invalid_client(basic, "unknown client or wrong secret")
        return client_id

    async def _token(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (failed := await self._failure("token")) is not None:
            return failed
        form = recorded.form
        client_id = self._authenticate(request, form)
        if isinstance(client_id, Response):
            return client_id
        if form.get("grant_type") != "authorization_code":
            return _oauth_error(400, "unsupported_grant_type", "only authorization_code")
        with self._lock:
            # A code is spent by any attempt to redeem it, right or wrong.
            code = self._codes.pop(form.get("code", ""), None)
        problem = None
        if code is None or code.client_id != client_id:
            problem = "unknown, used or someone else's code"
        elif time.monotonic() > code.expires:
            problem = "code expired"
        elif form.get("redirect_uri") != code.redirect_uri:
            problem = "redirect_uri differs from the authorization request's"
        elif not _VERIFIER.match(form.get("code_verifier", "")):
            problem = "code_verifier missing or malformed"
        elif code.challenge is None or not hmac.compare_digest(
            pkce_challenge(form["code_verifier"]), code.challenge
        ):
            problem = "code_verifier does not match the code_challenge"
        if problem is not None or code is None:
            return _oauth_error(400, "invalid_grant", problem or "no code")
        access_token = secrets.token_urlsafe(32)
        with self._lock:
            self._grants[access_token] = _Grant(client_id, code.user, code.scope)
        now = int(time.time())
        claims = {
            **code.user,
            "iss": self.issuer,
            "aud": client_id,
            "iat": now,
            "exp": now + self.id_token_lifetime,
            "auth_time": code.auth_time,
        }
        if code.nonce is not None:
            claims["nonce"] = code.nonce
        claims = _without_nones({**claims, **self.id_token_overrides})
        return JSONResponse(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": self.access_token_lifetime,
                "id_token": self.sign(claims, alg=self.id_token_alg, client_id=client_id),
                "scope": code.scope,
            },
            headers=_NO_STORE,
        )

    async def _userinfo(self, request: Request) -> Response:
        await self._record(request)
        if (failed := await self._failure("userinfo")) is not None:
            return failed
        header = request.headers.get("authorization", "")
        grant = None
        if header[:7].lower() == "bearer ":
            grant = self._grants.get(header[7:].strip())
        if grant is None:
            return JSONResponse(
                {"error": "invalid_token"},
                status_code=401,
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
        return JSONResponse(grant.user)


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=_NO_STORE
    )


def _invalid_client(basic: bool, description: str) -> JSONResponse:
    response = _oauth_error(401, "invalid_client", description)
    if basic:
        response.headers["www-authenticate"] = 'Basic realm="token"'
    return response


@dataclass
class _GitHubCode:
    client_id: str
    redirect_uri: str
    challenge: str | None
    user: dict[str, Any]
    scope: str
    expires: float  # time.monotonic()


class LocalGitHub(_LoopbackServer):
    """GitHub's OAuth 2.0 for OAuth apps (not OpenID Connect: no ID token, the user and
    their addresses come from the REST API), with GitHub's paths and answers: the token
    endpoint answers errors with HTTP 200, form-encoded unless the client asks for JSON.
    The OAuth endpoints and the API share one base_url here."""

    FAIL_ENDPOINTS: ClassVar[frozenset[str]] = frozenset({"authorize", "token", "user", "emails"})
    NAME: ClassVar[str] = "Local GitHub"
    PATH: ClassVar[str] = "/login/oauth/authorize"

    def __init__(self, *, clients: dict[str, str] | None = None) -> None:
        self._initial_clients = dict(
            clients if clients is not None else {GITHUB_CLIENT_ID: GITHUB_CLIENT_SECRET}
        )
        super().__init__()

    def reset(self) -> None:
        """Everything as constructed, keeping the port: one server can serve many tests."""
        super().reset()
        self.clients: dict[str, str] = dict(self._initial_clients)
        # id (int), login, name, email (the public one, or None), emails: a list of
        # {"email", "primary", "verified", "visibility"}. None shows the consent page.
        self.next_user: dict[str, Any] | None = None
        self.sticky_user = False
        self.deny_next = False
        self.code_lifetime = 600.0  # GitHub's codes last ten minutes
        self._codes: dict[str, _GitHubCode] = {}
        self._grants: dict[str, _Grant] = {}

    @property
    def authorize_url(self) -> str:
        return self.base_url + "/login/oauth/authorize"

    @property
    def token_url(self) -> str:
        return self.base_url + "/login/oauth/access_token"

    @property
    def api_url(self) -> str:
        return self.base_url

    def add_client(self, client_id: str, secret: str) -> None:
        self.clients[client_id] = secret

    def routes(self) -> list[Route]:
        return [
            Route("/login/oauth/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/login/oauth/access_token", self._token, methods=["POST"]),
            Route("/user", self._user),
            Route("/user/emails", self._emails),
        ]

    async def _authorize(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (failed := await self._failure("authorize")) is not None:
            return failed
        if request.method == "POST":
            return self._consented(recorded.form)
        query = recorded.query
        if (refused := self._check_authorize(query)) is not None:
            return refused
        if self.deny_next:
            self.deny_next = False
            return self._error(
                query, "access_denied", "The user has denied your application access."
            )
        user = self.next_user
        if user is None:
            return self._consent(query)
        if not self.sticky_user:
            self.next_user = None
        return self._approve(query, user)

    def _error(self, query: dict[str, str], error: str, description: str) -> Response:
        params = {"error": error, "error_description": description}
        if query.get("state"):
            params["state"] = query["state"]
        return self._redirect(query["redirect_uri"], params)

    def _check_authorize(self, query: dict[str, str]) -> Response | None:
        if query.get("client_id") not in self.clients:
            return HTMLResponse(_page("Error", "<p>Unknown client_id.</p>"), status_code=404)
        if not self._valid_redirect_uri(query.get("redirect_uri", "")):
            return HTMLResponse(_page("Error", "<p>Invalid redirect_uri.</p>"), status_code=400)
        challenge = query.get("code_challenge")
        if challenge is not None and (
            not _CHALLENGE.match(challenge) or query.get("code_challenge_method") != "S256"
        ):
            return self._error(query, "invalid_request", "code_challenge must be S256")
        return None

    def _consent(self, query: dict[str, str]) -> Response:
        inputs = "\n".join(
            [
                _text_input("id", "User ID", "1001", required=True),
                _text_input("login", "Login", required=True),
                _text_input("name", "Name"),
                _text_input("email", "Email"),
                '<p><label><input id="verified" name="verified" type="checkbox" '
                'value="true" checked> Verified</label></p>',
            ]
        )
        return _consent_page(self.NAME, self.PATH, query["client_id"], urlencode(query), inputs)

    def _consented(self, form: dict[str, str]) -> Response:
        query = dict(parse_qsl(form.get("authorize_query", ""), keep_blank_values=True))
        if (refused := self._check_authorize(query)) is not None:
            return refused
        if form.get("action") == "cancel":
            return self._error(
                query, "access_denied", "The user has denied your application access."
            )
        if not form.get("login") or not form.get("id", "").isdigit():
            return HTMLResponse(_page("Error", "<p>User ID and login needed.</p>"), 400)
        email = form.get("email") or None
        emails = []
        if email is not None:
            emails.append(
                {
                    "email": email,
                    "primary": True,
                    "verified": form.get("verified") == "true",
                    "visibility": "public",
                }
            )
        user = {
            "id": int(form["id"]),
            "login": form["login"],
            "name": form.get("name") or None,
            "email": email,
            "emails": emails,
        }
        return self._approve(query, user)

    def _approve(self, query: dict[str, str], user: dict[str, Any]) -> Response:
        code = secrets.token_hex(10)  # GitHub's codes are 20 hex digits
        with self._lock:
            self._codes[code] = _GitHubCode(
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                challenge=query.get("code_challenge"),
                user=dict(user),
                scope=query.get("scope", ""),
                expires=time.monotonic() + self.code_lifetime,
            )
        params = {"code": code}
        if query.get("state"):
            params["state"] = query["state"]
        return self._redirect(query["redirect_uri"], params)

    @staticmethod
    def _token_answer(request: Request, fields: dict[str, str]) -> Response:
        """As GitHub answers: JSON when the client accepts it, else form-encoded."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(fields)
        return Response(urlencode(fields), media_type="application/x-www-form-urlencoded")

    def _token_error(self, request: Request, error: str, description: str) -> Response:
        fields = {
            "error": error,
            "error_description": description,
            "error_uri": "https://docs.github.com/apps/managing-oauth-apps/"
            "troubleshooting-oauth-app-access-token-request-errors/#" + error.replace("_", "-"),
        }
        return self._token_answer(request, fields)

    async def _token(self, request: Request) -> Response:
        recorded = await self._record(request)
        if (failed := await self._failure("token")) is not None:
            return failed
        form = recorded.form
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        header = request.headers.get("authorization", "")
        if header[:6].lower() == "basic ":
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
                client_id, secret = (unquote_plus(part) for part in decoded.split(":", 1))
        known = self.clients.get(client_id)
        if known is None or not hmac.compare_digest(known.encode(), secret.encode()):
            return self._token_error(
                request,
                "incorrect_client_credentials",
                "The client_id and/or client_secret passed are incorrect.",
            )
        with self._lock:
            code = self._codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier")
        bad = (
            code is None
            or code.client_id != client_id
            or time.monotonic() > code.expires
            or (
                code.challenge is not None
                and (
                    verifier is None
                    or not _VERIFIER.match(verifier)
                    or not hmac.compare_digest(pkce_challenge(verifier), code.challenge)
                )
            )
        )
        if bad or code is None:
            return self._token_error(
                request,
                "bad_verification_code",
                "The code passed is incorrect or expired.",
            )
        if "redirect_uri" in form and form["redirect_uri"] != code.redirect_uri:
            return self._token_error(
                request,
                "redirect_uri_mismatch",
                "The redirect_uri MUST match the registered callback URL for this application.",
            )
        access_token = "gho_" + secrets.token_urlsafe(27)
        granted = ",".join(code.scope.replace(",", " ").split())
        with self._lock:
            self._grants[access_token] = _Grant(client_id, code.user, granted)
        return self._token_answer(
            request, {"access_token": access_token, "token_type": "bearer", "scope": granted}
        )

    def _grant(self, request: Request) -> _Grant | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in {"bearer", "token"}:
            return None
        return self._grants.get(token.strip())

    @staticmethod
    def _bad_credentials() -> Response:
        return JSONResponse(
            {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"},
            status_code=401,
        )

    async def _user(self, request: Request) -> Response:
        await self._record(request)
        if (failed := await self._failure("user")) is not None:
            return failed
        grant = self._grant(request)
        if grant is None:
            return self._bad_credentials()
        user = grant.user
        login = str(user.get("login", ""))
        return JSONResponse(
            {
                "id": user.get("id"),
                "login": login,
                "name": user.get("name"),
                "email": user.get("email"),
                "type": "User",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{user.get('id')}",
                "html_url": "https://github.com/" + quote(login),
            },
            headers={"x-oauth-scopes": grant.scope.replace(",", ", ")},
        )

    async def _emails(self, request: Request) -> Response:
        await self._record(request)
        if (failed := await self._failure("emails")) is not None:
            return failed
        grant = self._grant(request)
        if grant is None:
            return self._bad_credentials()
        if not {"user", "user:email"} & set(grant.scope.split(",")):
            # GitHub hides what a token's scopes do not reach behind a 404.
            return JSONResponse(
                {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"},
                status_code=404,
            )
        user = grant.user
        emails = user.get("emails")
        if emails is None:
            email = user.get("email")
            emails = (
                [{"email": email, "primary": True, "verified": True, "visibility": "public"}]
                if email
                else []
            )
        return JSONResponse(emails, headers={"x-oauth-scopes": grant.scope.replace(",", ", ")})
