"""The HTTP edge around the GraphQL app: security headers on every answer, and CORS for
the configured origins only (none by default)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.settings import ConfigError, Settings

# Every answer but the GraphiQL page: JSON and plain text need no resources at all, and
# no page may frame them.
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'"
# Two years, the preload list's minimum; sent in production only (browsers ignore it
# over plain HTTP, and a development server on localhost must not pin HTTPS).
HSTS = "max-age=63072000; includeSubDomains"
# GraphiQL's own copies of its scripts and styles: a file's URL names its version.
IMMUTABLE = "public, max-age=31536000, immutable"
# The public keys: resource servers and their proxies may keep a copy this long (JWT_KEYS'
# rotation waits at least this long between its steps: docs/operating/keys.md).
JWKS_MAX_AGE = 300
JWKS_PATH = "/.well-known/jwks.json"
# Public documents a client or platform may cache as long as the keys (JWKS_MAX_AGE): the
# keys, and the passkeys' associations (graph/wellknown.py).
PUBLIC_DOCUMENTS = frozenset(
    {
        JWKS_PATH,
        "/.well-known/webauthn",
        "/.well-known/assetlinks.json",
        "/.well-known/apple-app-site-association",
    }
)

_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
_LINK = re.compile(r"<link\b([^>]*)>", re.IGNORECASE | re.DOTALL)
_ATTR_URL = re.compile(r"""\b(?:src|href)\s*=\s*["'](https://[^"'/]+)""", re.IGNORECASE)
_LOCAL_URL = re.compile(r"""\b(?:src|href)\s*=\s*["']/(?!/)""", re.IGNORECASE)
_STYLESHEET = re.compile(r"""\brel\s*=\s*["']?stylesheet""", re.IGNORECASE)

CORS_ALLOW_HEADERS = ("content-type", "authorization", "x-request-id", "x-requested-with")
CORS_EXPOSE_HEADERS = ("x-request-id",)


def page_csp(html: str) -> str:
    """The policy of one of the server's HTML pages (GraphiQL, the demo), read from the
    page itself: its scripts and styles from this server or the CDN origins it names, its
    inline scripts by their SHA-256 (no 'unsafe-inline' for scripts), its queries to this
    origin only."""
    script_origins: set[str] = set()
    inline_hashes: list[str] = []
    for attributes, body in _SCRIPT.findall(html):
        origin = _ATTR_URL.search(attributes)
        if origin:
            script_origins.add(origin.group(1))
        elif re.search(r"\bsrc\s*=", attributes, re.IGNORECASE):
            script_origins.add("'self'")
        else:
            digest = hashlib.sha256(body.encode("utf-8")).digest()
            inline_hashes.append(f"'sha256-{base64.b64encode(digest).decode('ascii')}'")
    style_origins: set[str] = set()
    for attributes in _LINK.findall(html):
        if _STYLESHEET.search(attributes):
            if match := _ATTR_URL.search(attributes):
                style_origins.add(match.group(1))
            elif _LOCAL_URL.search(attributes):
                style_origins.add("'self'")
    directives = {
        "default-src": ["'none'"],
        "script-src": [*sorted(script_origins), *inline_hashes],
        # GraphiQL's editors set style attributes, and both pages have an inline <style>.
        "style-src": [*sorted(style_origins), "'unsafe-inline'"],
        "font-src": [*sorted(style_origins), "data:"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "base-uri": ["'none'"],
        "form-action": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


class SecurityHeaders:
    """Adds the security headers to every response, the app's own refusals included.

    `Cache-Control: no-store` on everything: /graphql answers carry tokens, and nothing
    else this server says is worth caching, but for the files found under `immutable`
    (GraphiQL's scripts and styles, versioned by their URL), cached for a year, and the
    public keys (JWKS_PATH), cached for JWKS_MAX_AGE seconds. An HTML
    answer on a path of `pages` gets that page's own policy; every other answer the
    strict one."""

    _OURS = frozenset(
        {
            b"cache-control",
            b"content-security-policy",
            b"referrer-policy",
            b"strict-transport-security",
            b"x-content-type-options",
            b"x-frame-options",
        }
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        hsts: bool,
        pages: Mapping[str, str] | None = None,
        immutable: str | None = None,
    ) -> None:
        self.app = app
        self._immutable = immutable
        common = [
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if hsts:
            common.append((b"strict-transport-security", HSTS.encode("latin-1")))
        self._strict = [*common, (b"content-security-policy", STRICT_CSP.encode("latin-1"))]
        self._pages = {
            path: [*common, (b"content-security-policy", policy.encode("latin-1"))]
            for path, policy in (pages or {}).items()
        }
        self._cached = self._caching(IMMUTABLE)
        self._keys = self._caching(f"public, max-age={JWKS_MAX_AGE}")

    def _caching(self, policy: str) -> list[tuple[bytes, bytes]]:
        return [
            (key, policy.encode("latin-1") if key == b"cache-control" else value)
            for key, value in self._strict
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (key, value)
                    for key, value in message.get("headers", ())
                    if key.lower() not in self._OURS
                ]
                message["headers"] = kept + self._headers_for(scope, kept, message["status"])
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _headers_for(
        self, scope: Scope, headers: Iterable[tuple[bytes, bytes]], status: int
    ) -> list[tuple[bytes, bytes]]:
        if self._immutable and status == 200 and scope["path"].startswith(self._immutable):
            return self._cached
        if status == 200 and scope["path"] in PUBLIC_DOCUMENTS:
            return self._keys
        page = self._pages.get(scope["path"])
        if page is not None:
            for key, value in headers:
                if key.lower() == b"content-type" and value.lower().startswith(b"text/html"):
                    return page
        return self._strict


class AllowlistCORS(CORSMiddleware):
    """Starlette's CORS for listed origins, saying nothing at all to any other origin
    (Starlette would still send its Allow-Credentials, Allow-Methods and Expose headers)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        if not self.is_allowed_origin(request_headers["origin"]):
            return PlainTextResponse("Disallowed CORS origin", status_code=400)
        return super().preflight_response(request_headers)

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if origin is None or self.is_allowed_origin(origin):
            await super().send(message, send, request_headers)
            return
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            headers = MutableHeaders(scope=message)
            headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
        await send(message)


def cors_origins(settings: Settings) -> list[str]:
    """CORS_ALLOW_ORIGINS, checked: exact origins only, as browsers send them."""
    origins = settings.cors_origins
    for origin in origins:
        parts = urlsplit(origin)
        # "*" with credentials would let any site act with a user's cookies; a path or a
        # trailing slash never matches the Origin header a browser sends.
        if (
            origin == "*"
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path
            or parts.query
            or parts.fragment
            or "*" in origin
        ):
            raise ConfigError(
                f"CORS_ALLOW_ORIGINS: {origin!r} is not an origin (scheme://host[:port], "
                "no path, no wildcard)"
            )
    return origins


def edge_middleware(
    settings: Settings, *, pages: Mapping[str, str], immutable: str | None = None
) -> list[Middleware]:
    """The outermost middleware: security headers on every answer (`pages` maps the
    paths of HTML pages to their HTML; the files under `immutable` are cached for good),
    then CORS where origins are configured (with none, no CORS header is ever sent)."""
    middleware = [
        Middleware(
            SecurityHeaders,
            hsts=settings.is_production,
            pages={path: page_csp(html) for path, html in pages.items()},
            immutable=immutable,
        )
    ]
    origins = cors_origins(settings)
    if origins:
        middleware.append(
            Middleware(
                AllowlistCORS,
                allow_origins=origins,
                # Operations go by POST only; GraphiQL is same-origin.
                allow_methods=["POST"],
                allow_headers=list(CORS_ALLOW_HEADERS),
                allow_credentials=True,
                expose_headers=list(CORS_EXPOSE_HEADERS),
            )
        )
    if settings.refresh_token_transport == "cookie":  # noqa: S105 - a mode
        middleware.append(Middleware(CsrfGuard, allowed_origins=origins))
    return middleware


class CsrfGuard:
    """Under cookie transport the browser attaches the refresh cookie by itself, so every
    POST must prove it comes from the app's own pages: a custom header a cross-site form
    cannot send (X-Requested-With), and an Origin (when the browser sends one) that is the
    server's own or in CORS_ALLOW_ORIGINS. Login too (login CSRF). Refused with 403.
    Not a provider's callback (/auth/...): Apple's comes back by a cross-site form POST,
    and the flow's state and the browser's binding cookie are what it proves itself by."""

    def __init__(self, app: ASGIApp, *, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = set(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].startswith("/auth/")
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if not headers.get("x-requested-with"):
            reason = "Send the X-Requested-With header (cookie sessions need it)."
        elif origin is not None and origin != own and origin not in self.allowed:
            reason = "This origin may not use cookie sessions here."
        else:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"errors": [{"message": reason, "extensions": {"code": "CSRF_REFUSED"}}]},
            status_code=403,
        )
        await response(scope, receive, send)
