"""What "the same device" means for sign-in notices: the user agent's family and the
network the client came from. Coarse on purpose: a browser update or a new address from
the same provider block is not a new device."""

from __future__ import annotations

import functools
import ipaddress
import re

UNKNOWN = "unknown"

# First match wins: order matters (Edge and Opera also say "Chrome", Chrome also "Safari").
_BROWSERS = (
    ("Edge", re.compile(r"\bEdg(e|A|iOS)?/")),
    ("Opera", re.compile(r"\b(OPR|Opera)/")),
    ("Samsung Internet", re.compile(r"\bSamsungBrowser/")),
    ("Firefox", re.compile(r"\b(Firefox|FxiOS)/")),
    ("Chrome", re.compile(r"\b(Chrome|CriOS|Chromium)/")),
    ("Safari", re.compile(r"\bSafari/")),
    ("curl", re.compile(r"^curl/")),
    ("an HTTP library", re.compile(r"^(python-|okhttp|Dalvik|CFNetwork|Go-http|axios|node)", re.I)),
)
_SYSTEMS = (
    ("iOS", re.compile(r"\b(iPhone|iPad|iPod)\b|\biOS\b")),
    ("Android", re.compile(r"\bAndroid\b")),
    ("Windows", re.compile(r"\bWindows\b")),
    ("macOS", re.compile(r"\bMac OS X\b|\bMacintosh\b|\bDarwin\b")),
    ("ChromeOS", re.compile(r"\bCrOS\b")),
    ("Linux", re.compile(r"\bLinux\b")),
)


# Both are asked on every sign-in, mostly about the same few clients: the patterns and
# ipaddress cost more than a lookup (some 18 and 8 us a call). Memory stays bounded: so
# many entries each, of user agents no longer than this (a longer one is matched every
# time) and of addresses no longer than _LONGEST_ADDRESS.
_KNOWN = 4096
_CACHED_USER_AGENT = 512


def device_family(user_agent: str | None) -> str:
    """ "Firefox on Linux", "Safari on iOS", or "unknown"; never the raw string (it is the
    client's to choose, and mails show this)."""
    if user_agent is not None and len(user_agent) > _CACHED_USER_AGENT:
        return _device_family(user_agent)
    return _known_device_family(user_agent)


def _device_family(user_agent: str | None) -> str:
    if not user_agent:
        return UNKNOWN
    browser = next((name for name, pattern in _BROWSERS if pattern.search(user_agent)), None)
    system = next((name for name, pattern in _SYSTEMS if pattern.search(user_agent)), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or "an unrecognised client"


_known_device_family = functools.lru_cache(maxsize=_KNOWN)(_device_family)


def network_of(ip: str | None) -> str:
    """The client's network: the IPv4 /24 or the IPv6 /48 it belongs to (an IPv4-mapped
    IPv6 address counts as IPv4)."""
    if ip is not None and len(ip) > _LONGEST_ADDRESS:
        return UNKNOWN  # no address is this long
    return _known_network(ip)


# An IPv6 address with a zone ("fe80::1%eth0") is about the longest there is.
_LONGEST_ADDRESS = 64


@functools.lru_cache(maxsize=_KNOWN)
def _known_network(ip: str | None) -> str:
    if not ip:
        return UNKNOWN
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
