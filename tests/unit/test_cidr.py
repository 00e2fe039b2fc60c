"""The registry's CIDR parser agrees with ipaddress on every text, fast path or not."""

from __future__ import annotations

import ipaddress
import random

import pytest

from appliance.registry import cidr

TABLE = [
    "198.18.0.0/15", "198.18.3.4/32", "0.0.0.0/0", "1.2.3.0/024",
    "::/0", "::1/128", "FD00::/8", "fd00:0:0:1::/64", "1:0:0:1:0:0:0:1/128",
    "1:0:0:1:0:0:1:1/128", "0:0:1::/48", "2001:db8:0:0:1:0:0:0/128",
    # ipaddress spells these its own way; the fast path must hand them over.
    "::ffff:198.18.0.1/128", "::ffff:c612:1/128", "::0.0.0.1/128",
]
REFUSED = ["01.2.3.0/24", "198.18.0.1/24", "198.18.0.0/33", "1.2.3/24", "1.2.3.0/+24",
           "1.2.3.0/ 24", " 1.2.3.0/24", "256.0.0.0/8", "fd00::1/64", "fd00::/129",
           "fd00:::/64", "1.2.3.0/٢٤", "g::/16", ""]


def reference(text: str) -> cidr.Net:
    return cidr.from_network(ipaddress.ip_network(text, strict=True))


@pytest.mark.parametrize("text", TABLE)
def test_accepted_texts_match_ipaddress(text):
    assert cidr.parse(text) == reference(text)


@pytest.mark.parametrize("text", REFUSED)
def test_refused_texts_are_refused_by_both(text):
    with pytest.raises(ValueError):
        reference(text)
    with pytest.raises(ValueError):
        cidr.parse(text)


def test_random_ipv6_spellings_match_ipaddress():
    # Zero runs of every length and position are where IPv6 spellings differ.
    rng = random.Random(7)
    for _ in range(3000):
        groups = [rng.choice([0, 0, 0, rng.randrange(16), rng.randrange(65536)])
                  for _ in range(8)]
        value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
        prefix = rng.randrange(129)
        value &= ~((1 << (128 - prefix)) - 1)
        addr = ipaddress.IPv6Address(value)
        for spelling in (str(addr), addr.exploded, addr.exploded.upper()):
            text = f"{spelling}/{prefix}"
            assert cidr.parse(text) == reference(text), text


@pytest.mark.parametrize("text", ["fe80::1%eth0/128", "fe80::%1/64", "fd00::1%x/128"])
def test_zone_ids_are_refused(text):
    # ipaddress accepts scope ids; an interface name means nothing in allowed IPs.
    ipaddress.ip_network(text)
    with pytest.raises(ValueError, match="zone id"):
        cidr.parse(text)


def test_bounds_and_overlap():
    a, b = cidr.parse("198.18.0.0/24"), cidr.parse("198.18.0.128/25")
    assert (a.lo, a.hi) == (bytes([198, 18, 0, 0]), bytes([198, 18, 0, 255]))
    assert cidr.overlaps(a, b) and cidr.overlaps(b, a)
    assert not cidr.overlaps(a, cidr.parse("198.18.1.0/24"))
    # Same bytes, different family: never an overlap.
    assert not cidr.overlaps(cidr.parse("::/96"), cidr.parse("0.0.0.0/0"))
