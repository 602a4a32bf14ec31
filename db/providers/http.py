"""Outbound HTTP (identity providers; webhooks and the claims hook): HTTPS to public addresses
only, bounded in time and size.

The URLs come from settings and from the providers' own discovery documents, so each is a
way to make this server send a request: to a metadata service, to a database on the
internal network. Every connection is checked where it is made, not where a URL is read:
the host name is resolved once, every address it resolves to must be public (not private,
loopback, link-local, shared, multicast or reserved), and the connection goes to the
address that was checked, so a DNS answer that changes between check and connect (DNS
rebinding) reaches nothing new. TLS still verifies the certificate for the host name.
`IDENTITY_PROVIDERS_ALLOW_INSECURE` lifts both rules for providers (tests; a provider on
your own network), `WEBHOOK_ALLOW_PRIVATE` for webhooks and the claims hook; both allow
plain HTTP only to addresses that are not public (`http_private_only`): over the internet,
a request and its answer are read and changed by anyone on the way (`setting` names the
one that applies in what the refusals say).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import anyio
import httpcore
import httpx
import orjson

# The most of a provider's answer read: discovery documents and key sets are a few KiB.
MAX_RESPONSE_BYTES = 512 * 1024
PROVIDERS_SETTING = "IDENTITY_PROVIDERS_ALLOW_INSECURE"


class ProviderUnreachable(Exception):
    """A provider could not be asked, or answered what cannot be used; the message says why
    (for the log: never a secret)."""


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits: NAT64's
# well-known prefix (RFC 6052; a NAT64 gateway forwards to the IPv4 address inside) and the
# deprecated IPv4-compatible addresses. Python (3.11) calls them global whatever they carry.
_EMBEDDING_IPV4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))
# NAT64's local-use prefix (RFC 8215): a network's own translators, with the IPv4 address at
# a place that depends on the prefix length each network chose (RFC 6052, 2.2), so it cannot
# be read out: the whole prefix is refused. Python (3.11) calls it global.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_address(address: str) -> bool:
    """Whether `address` is one a provider may be at: global, not multicast, and, where it
    is an IPv6 address that carries an IPv4 one (IPv4-mapped, NAT64, 6to4, Teredo), the
    IPv4 address it leads to is public too: 64:ff9b::a9fe:a9fe reaches 169.254.169.254 on
    a network with NAT64. NAT64's local-use prefix 64:ff9b:1::/48 is never public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not (ip.is_global and not ip.is_multicast):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        inner = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in network for network in _EMBEDDING_IPV4):
            inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public_address(str(v4)) for v4 in inner if v4 is not None)
    return True


# Where a client's connections may go: public addresses only; any address (the setting
# that allows private ones is on); or only addresses that are not public (plain HTTP where
# WEBHOOK_ALLOW_PRIVATE allows it: never across the internet).
Reach = Literal["public", "any", "private"]


def address_problem(
    host: str, addresses: Sequence[str], *, reach: Reach, setting: str = PROVIDERS_SETTING
) -> str | None:
    """Why a connection to `host`, which resolved to `addresses`, may not be made (None: it
    may): every address must be public for "public", and none for "private"."""
    if reach == "public" and not all(is_public_address(address) for address in addresses):
        return f"{host} resolves to a private, loopback or link-local address ({setting} allows it)"
    if reach == "private" and any(is_public_address(address) for address in addresses):
        return (
            f"{host} resolves to a public address: plain http goes only to private, loopback"
            f" or link-local addresses ({setting}); use https"
        )
    return None


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses that passed the check, by the address checked."""

    def __init__(self, *, reach: Reach, setting: str = PROVIDERS_SETTING) -> None:
        self._inner = httpcore.AnyIOBackend()
        self.reach = reach
        self._setting = setting

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"{host} does not resolve") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve")
        problem = address_problem(host, addresses, reach=self.reach, setting=self._setting)
        if problem is not None:
            raise httpcore.ConnectError(problem)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # noqa: S101 - at least one address was tried
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _BoundedTransport(httpx.AsyncBaseTransport):
    """Reads at most MAX_RESPONSE_BYTES of an answer, before and after decompression (a
    few KiB of gzip can inflate to gigabytes); no redirects are followed (httpx's default),
    so every URL asked is one that was checked. The answer handed on is decoded, with no
    content-encoding left for httpx to decode again without a bound.

    Without `keep_body` (webhooks: only the status counts) at most MAX_DRAINED_BYTES of the
    answer are read and dropped, however long it is, and the answer handed on is empty.
    Plain-HTTP requests go through `plain` where there is one (its connections checked by
    another rule)."""

    def __init__(
        self,
        inner: httpx.AsyncHTTPTransport,
        *,
        keep_body: bool = True,
        plain: httpx.AsyncHTTPTransport | None = None,
    ) -> None:
        self._inner = inner
        self._plain = plain
        self._keep_body = keep_body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._plain if self._plain is not None and request.url.scheme == "http" else None
        response = await (inner or self._inner).handle_async_request(request)
        if not self._keep_body:
            return await _drained(response)
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ProviderUnreachable(
                        f"{request.url.host} answered more than {MAX_RESPONSE_BYTES} bytes"
                    )
        finally:
            await response.aclose()
        encodings = [
            part.strip().lower()
            for part in response.headers.get("content-encoding", "").split(",")
            if part.strip() and part.strip().lower() != "identity"
        ]
        content = bytes(body)
        # Applied in order, undone in reverse (RFC 9110 8.4).
        for encoding in reversed(encodings):
            content = _decompressed(content, encoding, request.url.host)
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length")
        ]
        return httpx.Response(response.status_code, headers=headers, content=content)

    async def aclose(self) -> None:
        await self._inner.aclose()
        if self._plain is not None:
            await self._plain.aclose()


# What an answer whose body is not wanted may send before the connection is dropped: a
# short body is read to its end, so the connection can serve the next request.
MAX_DRAINED_BYTES = 64 * 1024


async def _drained(response: httpx.Response) -> httpx.Response:
    read = 0
    try:
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read > MAX_DRAINED_BYTES:
                break
    finally:
        await response.aclose()
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(response.status_code, headers=headers, content=b"")


def _decompressed(content: bytes, encoding: str, host: str) -> bytes:
    """`content` decoded from gzip or deflate, at most MAX_RESPONSE_BYTES of it. Only
    `identity` is asked for, but a server may compress anyway, and its compressed bytes
    are no JSON: handed on as they came, every answer of such a provider failed."""
    if encoding in ("gzip", "x-gzip"):
        attempts = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        attempts = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped, or raw as some send it
    else:
        raise ProviderUnreachable(f"{host} answered in an encoding not asked for: {encoding}")
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            decoded = inflater.decompress(content, MAX_RESPONSE_BYTES + 1)
        except zlib.error:
            continue
        if len(decoded) > MAX_RESPONSE_BYTES or inflater.unconsumed_tail:
            raise ProviderUnreachable(f"{host} answered more than {MAX_RESPONSE_BYTES} bytes")
        return decoded
    raise ProviderUnreachable(f"{host} answered {encoding} that does not decompress")


@functools.cache
def _tls() -> ssl.SSLContext:
    """The TLS context (certificates checked against the CA bundle, host names verified) of
    every outbound client of the process: made once, as reading the CA bundle takes about
    25 ms, and every app (each test's too) makes several clients."""
    return httpx.create_ssl_context()


def _checked_transport(reach: Reach, setting: str) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(verify=_tls(), retries=0)
    # httpx does not take a network backend; its pool does.
    transport._pool._network_backend = _CheckedBackend(reach=reach, setting=setting)
    return transport


def _origin(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "the URL"
    if not parsed.scheme or not parsed.host:
        return "the URL"
    return str(parsed.copy_with(path="", query=None, fragment=None, userinfo=b""))


def check_url(url: str, *, allow_insecure: bool, setting: str = PROVIDERS_SETTING) -> str | None:
    """Why `url` may not be asked (not absolute, not HTTPS, a user name in it), or None;
    `setting` is the one that allows plain HTTP."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "is not a URL"
    if parsed.scheme not in ("https", "http") or not parsed.host:
        return "is not an absolute http(s) URL"
    if parsed.scheme != "https" and not allow_insecure:
        return f"must use https ({setting} allows http)"
    if parsed.userinfo:
        return "must not hold a user name or password"
    return None


class ProviderHttp:
    """The one HTTP client every provider call goes through (and, built with the webhooks'
    `setting`, `http_private_only` and `keep_body=False`, every webhook delivery:
    db/webhooks/outbound.py).

    `allow_insecure` allows plain HTTP and private, loopback and link-local addresses; with
    `http_private_only` too, plain HTTP goes to those only: an http URL whose host resolves
    to a public address is refused where the connection is made."""

    def __init__(
        self,
        *,
        timeout: float,
        allow_insecure: bool,
        setting: str = PROVIDERS_SETTING,
        keep_body: bool = True,
        http_private_only: bool = False,
    ) -> None:
        self.timeout = timeout
        self.allow_insecure = allow_insecure
        self.setting = setting
        inner = _checked_transport("any" if allow_insecure else "public", setting)
        plain = (
            _checked_transport("private", setting) if allow_insecure and http_private_only else None
        )
        self.transport = _BoundedTransport(inner, keep_body=keep_body, plain=plain)
        self.client = httpx.AsyncClient(
            transport=self.transport,
            timeout=httpx.Timeout(timeout),
            # httpx asks for gzip by default, and its own decoding has no size bound:
            # uncompressed answers are asked for, and compressed ones decoded above.
            headers={
                "user-agent": "Strawgate",
                "accept": "application/json",
                "accept-encoding": "identity",
            },
            follow_redirects=False,
        )

    def checked(self, url: str) -> str:
        problem = check_url(url, allow_insecure=self.allow_insecure, setting=self.setting)
        if problem is not None:
            # Named by its origin only: a path or query string may hold a token (a webhook's),
            # and a user name a password; the message is logged and stored.
            raise ProviderUnreachable(f"{_origin(url)} {problem}")
        return url

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, the whole of it within the timeout; ProviderUnreachable on any
        failure to get an answer (the status is the caller's to judge)."""
        self.checked(url)
        try:
            with anyio.fail_after(self.timeout):
                return await self.client.request(method, url, **kwargs)
        except TimeoutError:
            raise ProviderUnreachable(
                f"{httpx.URL(url).host} did not answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderUnreachable(f"{httpx.URL(url).host}: {exc}") from None

    async def get_json(self, url: str, **kwargs: Any) -> Any:
        response = await self.request("GET", url, **kwargs)
        return json_of(response)

    async def aclose(self) -> None:
        await self.client.aclose()


def json_of(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; ProviderUnreachable otherwise."""
    host = response.request.url.host if response._request is not None else "the provider"
    if not 200 <= response.status_code < 300:
        raise ProviderUnreachable(f"{host} answered HTTP {response.status_code}")
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise ProviderUnreachable(f"{host} answered something that is not JSON") from None
