"""What "the same device" means for sign-in notices: the user agent's family and the
network the client came from. Coarse on purpose: a browser update or a new address from
the same provider block is not a new device."""

from __future__ import annotations

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


def device_family(user_agent: str | None) -> str:
    """ "Firefox on Linux", "Safari on iOS", or "unknown"; never the raw string (it is the
    client's to choose, and mails show this)."""
    if not user_agent:
        return UNKNOWN
    browser = next((name for name, pattern in _BROWSERS if pattern.search(user_agent)), None)
    system = next((name for name, pattern in _SYSTEMS if pattern.search(user_agent)), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or "an unrecognised client"


def network_of(ip: str | None) -> str:
    """The client's network: the IPv4 /24 or the IPv6 /48 it belongs to (an IPv4-mapped
    IPv6 address counts as IPv4)."""
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
