"""What the backends take and return: typed, backend-neutral, keys in standard base64.

Secrets (private and preshared keys) are kept out of repr() so that logging a
dataclass never logs a key.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from appliance.keys import KeyError_, normalize_key

from .errors import InvalidConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# Both the kernel and the UAPI carry the keepalive interval as an unsigned 16-bit value.
MAX_KEEPALIVE = 0xFFFF
MAX_PORT = 0xFFFF


def check_key(text: str, what: str) -> str:
    """Canonical base64 of a 32-byte key, or InvalidConfig naming the field."""
    try:
        return normalize_key(text)
    except (KeyError_, AttributeError) as e:
        raise InvalidConfig(f"{what}: {e}") from e


def parse_network(value: str | IPNetwork) -> IPNetwork:
    """A CIDR; host bits are dropped the way the kernel's allowed-IPs trie drops them."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return _parse_text(str(value))


# A peer's networks are parsed by the overlap guard and again for the device
# write, moments apart: ~7% of the daemon's CPU in a 10,000-client herd before
# this cache (networks are immutable, so sharing one object is safe).
@functools.lru_cache(maxsize=4096)
def _parse_text(value: str) -> IPNetwork:
    text = value.strip()
    addr, sep, prefix = text.partition("/")
    if not sep:
        raise InvalidConfig(f"allowed IP {text!r}: needs a prefix length, e.g. {text}/32")
    try:
        # inet_pton then the (packed, prefix) constructor: several times faster than
        # ipaddress's string parser, which matters when reading 50,000 peers.
        if ":" in addr:
            return ipaddress.IPv6Network((socket.inet_pton(socket.AF_INET6, addr),
                                          int(prefix)), strict=False)
        return ipaddress.IPv4Network((socket.inet_pton(socket.AF_INET, addr), int(prefix)),
                                     strict=False)
    except (OSError, ValueError) as e:
        raise InvalidConfig(f"allowed IP {text!r}: not an address/prefix ({e})") from e


def parse_networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(v) for v in values)


@dataclass(frozen=True)
class Endpoint:
    """A peer's UDP address. str() gives `host:port`, IPv6 in brackets as wg(8) prints it."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, ipaddress.IPv4Address | ipaddress.IPv6Address):
            object.__setattr__(self, "host", _parse_host(str(self.host)))
        if not 0 < int(self.port) <= MAX_PORT:
            raise InvalidConfig(f"endpoint port {self.port}: must be 1..{MAX_PORT}")
        object.__setattr__(self, "port", int(self.port))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`192.0.2.1:51820` or `[2001:db8::1]:51820` (a `%scope` suffix is dropped)."""
        s = text.strip()
        if s.startswith("["):
            host, sep, port = s[1:].partition("]:")
        else:
            host, sep, port = s.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidConfig(f"endpoint {text!r}: expected HOST:PORT or [V6HOST]:PORT")
        return cls(_parse_host(host), int(port))

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_host(text: str) -> IPAddress:
    host = text.split("%", 1)[0]
    try:
        if ":" in host:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host))
    except OSError as e:
        raise InvalidConfig(f"endpoint host {text!r}: not an IP address") from e


@dataclass(frozen=True)
class PeerConfig:
    """One peer to add or update. A field left as None is not touched on the device.

    allowed_ips, when given, *replaces* the peer's allowed IPs (an empty list clears
    them). persistent_keepalive=0 turns the keepalive off. An all-zero
    preshared_key clears it (that is how both the kernel and the UAPI spell "none").
    """

    public_key: str
    allowed_ips: tuple[IPNetwork, ...] | None = None
    preshared_key: str | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", check_key(self.public_key, "peer public key"))
        if self.allowed_ips is not None:
            if isinstance(self.allowed_ips, str):
                raise InvalidConfig("allowed_ips: give a list of CIDRs, not one string")
            object.__setattr__(self, "allowed_ips", parse_networks(self.allowed_ips))
        if self.preshared_key is not None:
            object.__setattr__(self, "preshared_key",
                               check_key(self.preshared_key, "preshared key"))
        if self.endpoint is not None and not isinstance(self.endpoint, Endpoint):
            object.__setattr__(self, "endpoint", Endpoint.parse(str(self.endpoint)))
        if self.persistent_keepalive is not None and not (
                0 <= int(self.persistent_keepalive) <= MAX_KEEPALIVE):
            raise InvalidConfig(f"persistent keepalive {self.persistent_keepalive}: "
                                f"must be 0..{MAX_KEEPALIVE} seconds")


@dataclass(frozen=True)
class Peer:
    """A peer as the device reports it."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    # None when the peer has no preshared key (the device reports all zeroes).
    preshared_key: str | None = field(default=None, repr=False)
    persistent_keepalive: int = 0
    # Timezone-aware (UTC); None until the first handshake completes.
    last_handshake: datetime | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PeerActivity:
    """The few fields of a peer that housekeeping reads every few seconds.

    A gateway's eviction pass and handshake check read every peer; a full Peer
    (addresses parsed into objects) costs several times the time and memory.
    """

    public_key: str
    last_handshake: float | None  # Unix time; None until the first handshake
    rx_bytes: int
    persistent_keepalive: int


@dataclass(frozen=True)
class DeviceInfo:
    """The interface itself. private_key is None when the device does not reveal it
    (boringtun) or has none yet; public_key is derived from it when the device
    does not report one."""

    ifname: str
    backend: str
    public_key: str | None
    private_key: str | None = field(repr=False)
    listen_port: int
    fwmark: int = 0


@dataclass(frozen=True)
class DeviceDump:
    """The interface and all its peers, read in one go."""

    info: DeviceInfo
    peers: tuple[Peer, ...]
