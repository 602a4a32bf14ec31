"""What a sign-in's device and network are called (db/devices.py), and the bound on what
is remembered of them."""

from __future__ import annotations

from db import devices
from db.devices import device_family, network_of

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


def test_networks() -> None:
    assert network_of("203.0.113.7") == "203.0.113.0/24"
    assert network_of("::ffff:203.0.113.7") == "203.0.113.0/24"
    assert network_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert network_of("not an address") == devices.UNKNOWN
    assert network_of(None) == devices.UNKNOWN
    assert network_of("") == devices.UNKNOWN


def test_devices() -> None:
    assert device_family(FIREFOX) == "Firefox on Linux"
    assert device_family(None) == devices.UNKNOWN
    assert device_family("SomethingElse/1.0") == "an unrecognised client"


def test_what_is_remembered_is_bounded() -> None:
    """Clients choose their user agent (and, through a proxy, what reaches network_of):
    a long one is answered as well, but never kept, and the caches have a size."""
    long_agent = FIREFOX + " " + "x" * 1000
    before = devices._known_device_family.cache_info().currsize
    assert device_family(long_agent) == "Firefox on Linux"
    assert devices._known_device_family.cache_info().currsize == before
    before = devices._known_network.cache_info().currsize
    assert network_of("1" * 1000) == devices.UNKNOWN
    assert devices._known_network.cache_info().currsize == before
    assert devices._known_device_family.cache_info().maxsize == devices._KNOWN
    assert devices._known_network.cache_info().maxsize == devices._KNOWN
