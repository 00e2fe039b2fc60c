"""Turn the messages of a kernel WireGuard dump (as pyroute2 decodes them) into one
DeviceDump.

The kernel answers WG_CMD_GET_DEVICE with as many messages as the peers need.
The interface's own fields come only in the first. When a peer's allowed IPs do
not fit, the kernel closes the message mid-peer and starts the next one with the
*same* peer again, carrying only its public key and the remaining allowed IPs
(its endpoint, keepalive, handshake time and counters were in the first part).
Flattening the peer lists of all messages (the usual answer to pyroute2 issue
#1212) therefore yields the peer twice, the second time with no stats and only
part of its allowed IPs. Here the parts are merged by public key.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.keys import encode_key, public_key

from .errors import InvalidConfig, ProtocolError
from .model import DeviceDump, DeviceInfo, Endpoint, IPNetwork, Peer, parse_network

_ZERO_KEY = encode_key(bytes(32))


def _key(value: Any) -> str | None:
    """pyroute2 hands keys over as base64 bytes; the kernel's all-zero key means none."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes | bytearray) else str(value)
    return None if text == _ZERO_KEY else text


@dataclass
class _PeerParts:
    public_key: str
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    preshared_key: str | None = None
    keepalive: int = 0
    last_handshake: datetime | None = None
    rx: int = 0
    tx: int = 0

    def add(self, nla: Any) -> None:
        """Fold in one part of this peer. Fields absent from a part are left as they
        are: a continuation part has none of them and must not zero them."""
        get = nla.get_attr
        if (psk := get("WGPEER_A_PRESHARED_KEY")) is not None:
            self.preshared_key = _key(psk)
        if (ka := get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")) is not None:
            self.keepalive = int(ka)
        if (hs := get("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
            self.last_handshake = handshake_time(int(hs["tv_sec"]), int(hs["tv_nsec"]))
        if (rx := get("WGPEER_A_RX_BYTES")) is not None:
            self.rx = int(rx)
        if (tx := get("WGPEER_A_TX_BYTES")) is not None:
            self.tx = int(tx)
        if (ep := get("WGPEER_A_ENDPOINT")) is not None:
            self.endpoint = _endpoint(ep)
        for allowed in get("WGPEER_A_ALLOWEDIPS") or ():
            self.allowed_ips.append(_allowed_ip(allowed))

    def peer(self) -> Peer:
        return Peer(public_key=self.public_key, allowed_ips=tuple(self.allowed_ips),
                    endpoint=self.endpoint, preshared_key=self.preshared_key,
                    persistent_keepalive=self.keepalive, last_handshake=self.last_handshake,
                    rx_bytes=self.rx, tx_bytes=self.tx)


def handshake_time(sec: int, nsec: int) -> datetime | None:
    """The kernel reports wall-clock time since the epoch; 0/0 means never."""
    if sec == 0 and nsec == 0:
        return None
    return datetime.fromtimestamp(sec, UTC) + timedelta(microseconds=nsec // 1000)


def _endpoint(value: Any) -> Endpoint | None:
    try:
        addr, port = value["addr"], int(value["port"])
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"undecodable peer endpoint from the kernel: {value!r}") from e
    if not port:
        return None
    try:
        return Endpoint(addr, port)
    except InvalidConfig as e:
        raise ProtocolError(f"peer endpoint from the kernel: {e}") from e


def _allowed_ip(nla: Any) -> IPNetwork:
    # pyroute2's decoder adds 'addr' as "address/prefix".
    text = nla.get("addr") if hasattr(nla, "get") else None
    if not text:
        raise ProtocolError(f"undecodable allowed IP from the kernel: {nla!r}")
    try:
        return parse_network(text)
    except InvalidConfig as e:
        raise ProtocolError(f"allowed IP from the kernel: {e}") from e


def merge_dump(messages: Iterable[Any], ifname: str) -> DeviceDump:
    """One DeviceDump from all messages of one WG_CMD_GET_DEVICE dump, in order."""
    device: dict[str, Any] = {}
    peers: dict[str, _PeerParts] = {}
    for msg in messages:
        for attr in ("WGDEVICE_A_LISTEN_PORT", "WGDEVICE_A_FWMARK", "WGDEVICE_A_PRIVATE_KEY",
                     "WGDEVICE_A_PUBLIC_KEY", "WGDEVICE_A_IFNAME"):
            value = msg.get_attr(attr)
            if value is not None and attr not in device:
                device[attr] = value
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key is None:
                raise ProtocolError(f"{ifname}: a peer without a public key in the kernel's dump")
            parts = peers.get(key)
            if parts is None:
                parts = peers[key] = _PeerParts(key)
            parts.add(nla)

    private = _key(device.get("WGDEVICE_A_PRIVATE_KEY"))
    public = _key(device.get("WGDEVICE_A_PUBLIC_KEY"))
    if public is None and private is not None:
        public = encode_key(public_key(base64.b64decode(private)))
    info = DeviceInfo(ifname=device.get("WGDEVICE_A_IFNAME") or ifname, backend="netlink",
                      public_key=public, private_key=private,
                      listen_port=int(device.get("WGDEVICE_A_LISTEN_PORT") or 0),
                      fwmark=int(device.get("WGDEVICE_A_FWMARK") or 0))
    return DeviceDump(info, tuple(p.peer() for p in peers.values()))
