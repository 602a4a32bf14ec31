"""Where webhooks (and the claims hook) may send requests: HTTPS to public addresses only,
unless WEBHOOK_ALLOW_PRIVATE, which allows private, loopback and link-local addresses too,
and plain HTTP to those (never to a public address: on the way across the internet, a
request and its answer, the claims hook's claims say, are anyone's to read and change). A
URL is checked when the settings are read (`endpoint_problem`, ConfigError naming the
setting), and every connection where it is made: the shared outbound client of
db/providers/http.py resolves the host name once, refuses it if any address is private,
loopback or link-local (or, for plain HTTP, if any is public), and connects to the address
it checked (no DNS rebinding); TLS verifies the host name. No redirect is followed and no
more than a bounded answer is read."""

from __future__ import annotations

import hashlib
import ipaddress
import logging

import httpx

from db.providers.http import ProviderHttp, check_url, is_public_address
from db.settings import ConfigError, Settings

log = logging.getLogger("strawgate.webhooks")

SETTING = "WEBHOOK_ALLOW_PRIVATE"
MAX_URL = 2048  # webhook_deliveries.endpoint


def endpoint_problem(url: str, *, allow_private: bool) -> str | None:
    """Why `url` cannot be a webhook endpoint (or the claims hook), or None: not an
    absolute http(s) URL, a user name or password in it, plain HTTP (with `allow_private`:
    plain HTTP to a public address written in it), or an address that is not public
    written in it (unless `allow_private`). A host name is checked where each connection is
    made, against what it resolves to then."""
    problem = check_url(url, allow_insecure=allow_private, setting=SETTING)
    if problem is not None:
        return problem
    if len(url) > MAX_URL:
        return f"is longer than {MAX_URL} characters"
    host = httpx.URL(url).host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: checked at connect time
    if not allow_private and not is_public_address(str(address)):
        return f"is a private, loopback or link-local address ({SETTING} allows it)"
    if httpx.URL(url).scheme == "http" and is_public_address(str(address)):
        return (
            f"is plain http to a public address: {SETTING} allows http only to private,"
            " loopback or link-local addresses; use https"
        )
    return None


def check_endpoints(settings: Settings) -> None:
    """ConfigError for a WEBHOOK_ENDPOINTS entry that cannot be delivered to, or a URL
    listed twice (its events would be written twice for one endpoint)."""
    seen: set[str] = set()
    for position, endpoint in enumerate(settings.webhook_endpoints):
        problem = endpoint_problem(endpoint.url, allow_private=settings.webhook_allow_private)
        if problem is not None:
            raise ConfigError(f"WEBHOOK_ENDPOINTS[{position}]: {shown(endpoint.url)} {problem}")
        if endpoint.url in seen:
            raise ConfigError(
                f"WEBHOOK_ENDPOINTS[{position}]: {shown(endpoint.url)} is listed twice"
                " (give it one entry, with every event it wants)"
            )
        seen.add(endpoint.url)


def outbound_http(*, timeout: float, allow_private: bool, keep_body: bool) -> ProviderHttp:
    """The shared outbound client with the webhooks' rules (plain HTTP, where allowed, only
    to addresses that are not public): without `keep_body` (deliveries: only the status
    counts) an answer's body is read only up to a small bound, and dropped."""
    return ProviderHttp(
        timeout=timeout,
        allow_insecure=allow_private,
        setting=SETTING,
        keep_body=keep_body,
        http_private_only=True,
    )


def warn_if_private_allowed(settings: Settings) -> None:
    """A warning, at start, where WEBHOOK_ALLOW_PRIVATE is on in production."""
    if settings.webhook_allow_private and settings.is_production:
        log.warning(
            "%s is on in production: webhook endpoints and the claims hook may be on private,"
            " loopback and link-local addresses, and reached there over plain HTTP; turn it"
            " off unless they are on your own network",
            SETTING,
        )


# What stands for an endpoint's path and query string where it is shown: `…#` and the
# first SHOWN_HASH hex digits of their SHA-256.
SHOWN_HASH = 8


def shown(url: str) -> str:
    """An endpoint as logs, metrics and the command line show it: its scheme, host and port,
    and in place of its path and query string (where receivers put tokens: Slack's,
    Discord's, Zapier's hooks) a short hash of them, the same in every process:
    `https://hooks.example.com/…#a1b2c3d4`. `strawgate webhooks replay --endpoint` takes it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "(not a URL)"
    if not parsed.scheme or not parsed.host:
        return "(not a URL)"
    origin = str(parsed.copy_with(path="/", query=None, fragment=None, userinfo=b""))
    rest = parsed.raw_path  # the path and query string, as written
    if rest in (b"", b"/"):
        return origin
    return f"{origin}…#{hashlib.sha256(rest).hexdigest()[:SHOWN_HASH]}"


def names(given: str, url: str) -> bool:
    """Whether an operator's `given` names the endpoint `url`: the URL itself, or as shown
    (with `...` for `…`, which is easier to type)."""
    return given == url or given.replace("...", "…") == shown(url)
