"""CIDR text to the form the registry stores: canonical text, family, first and last address.

`ipaddress` is the reference and words every error, but it builds objects
and formats IPv6 in Python: about 10 µs a network, 20 s of a million-peer
import with two networks each. inet_pton/inet_ntop do the common cases in C.
Whatever the fast path is not sure to spell exactly as `ipaddress` would
(embedded IPv4 in IPv6, odd prefix spellings, host bits set) goes
to `ipaddress`, so both paths accept the same texts and store the same strings.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Net(NamedTuple):
    cidr: str
    family: int
    # First and last address as big-endian bytes (4 or 16): SQLite compares
    # blobs with memcmp, so ranges can be queried on them.
    lo: bytes
    hi: bytes


def from_network(net: IPNetwork) -> Net:
    size = 4 if net.version == 4 else 16
    first = int(net.network_address)
    last = first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
    return Net(str(net), net.version, first.to_bytes(size, "big"), last.to_bytes(size, "big"))


def overlaps(a: Net, b: Net) -> bool:
    return a.family == b.family and a.lo <= b.hi and b.lo <= a.hi


def parse(text: str) -> Net:
    """A network in CIDR notation with its host bits zero; ValueError otherwise."""
    if "%" in text:
        # ipaddress takes "fe80::1%eth0/128" (RFC 4007 scope ids); a zone names
        # an interface on one host and means nothing in a peer's allowed IPs.
        raise ValueError("a zone id (%...) has no place in allowed IPs")
    net = _fast(text)
    return net if net is not None else from_network(ipaddress.ip_network(text, strict=True))


def _fast(text: str) -> Net | None:
    addr, slash, plen = text.partition("/")
    if not slash or not plen.isascii() or not plen.isdigit() or len(plen) > 3:
        return None
    if ":" in addr:
        if "." in addr:
            return None
        af, family, bits = socket.AF_INET6, 6, 128
    else:
        af, family, bits = socket.AF_INET, 4, 32
    try:
        packed = socket.inet_pton(af, addr)
    except OSError:
        return None
    prefix = int(plen)
    if prefix > bits:
        return None
    first = int.from_bytes(packed, "big")
    host = (1 << (bits - prefix)) - 1
    if first & host:
        return None
    if family == 4:
        # inet_pton takes only the canonical dotted quad (no leading zeros).
        text_addr = addr
    else:
        text_addr = socket.inet_ntop(af, packed)
        if "." in text_addr:
            return None
    if len(plen) > 1 and plen[0] == "0":
        plen = str(prefix)
    return Net(f"{text_addr}/{plen}", family, packed, (first | host).to_bytes(len(packed), "big"))
