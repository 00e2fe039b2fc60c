"""The `netlink` backend: kernel WireGuard through pyroute2's generic netlink socket.

pyroute2's `WireGuard.set()` carries one peer per request (one netlink round trip
and one kernel rtnl_lock/device_update_lock section each), although
WG_CMD_SET_DEVICE takes any number of peers in its WGDEVICE_A_PEERS nest. So the
writes here build the same `wgmsg` pyroute2 uses, with many peers per message,
and send it on pyroute2's socket; bench/backends.py compares the two. Reads use
pyroute2's `info()` and merge its messages (see netlink_dump).
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink import NETLINK_GENERIC, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from . import link
from .device import WgDevice, check_keys
from .errors import (
    BackendUnavailable,
    InterfaceMissing,
    InvalidConfig,
    NotWireGuard,
    PermissionDenied,
    ProtocolError,
    WgError,
    errno_text,
)
from .model import MAX_PORT, DeviceDump, IPInterface, IPNetwork, PeerConfig, check_key
from .netlink_dump import merge_dump
from .nsenter import netlink_socket_fd

# Bytes of peer attributes per WG_CMD_SET_DEVICE message. The kernel takes up to
# the socket's send buffer, but it holds rtnl_lock for a whole message, so a
# bounded message lets other netlink users (and our own installs) in between.
MAX_SET_MESSAGE = 32 * 1024
# A dump that overlaps a peer change is flagged NLM_F_DUMP_INTR; wg(8) retries it.
DUMP_ATTEMPTS = 5

# Encoded sizes (netlink attribute headers included, padded to 4 bytes).
_NEST = 4
_KEY = 4 + 32
_U32 = 8
_U16 = 8
_ENDPOINT4 = 4 + 16
_ENDPOINT6 = 4 + 28
_ALLOWED4 = _NEST + 8 + 8 + 8
_ALLOWED6 = _NEST + 8 + 20 + 8


def netlink_error(e: NetlinkError, ifname: str, doing: str) -> WgError:
    code = e.code
    if code == errno.ENODEV:
        return InterfaceMissing(f"{ifname}: no such kernel WireGuard interface ({doing}); "
                                f"create it or check the name", ifname=ifname, errno=code)
    if code == errno.EOPNOTSUPP:
        return NotWireGuard(f"{ifname}: is not a kernel WireGuard interface ({doing}); if "
                            f"wireguard-go serves it use the uapi backend", ifname=ifname,
                            errno=code)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{ifname}: {doing} needs root (CAP_NET_ADMIN)", ifname=ifname,
                                errno=code)
    if code == errno.EINVAL:
        return ProtocolError(f"{ifname}: the kernel rejected {doing}: {errno_text(code)}",
                             ifname=ifname, errno=code)
    return WgError(f"{ifname}: {doing} failed: {errno_text(code)}", ifname=ifname, errno=code)


def _allowed_ip_nla(net: IPNetwork) -> dict[str, Any]:
    family = 2 if net.version == 4 else 10  # AF_INET, AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}


def _allowed_size(net: IPNetwork) -> int:
    return _ALLOWED4 if net.version == 4 else _ALLOWED6


def peer_entries(peers: Iterable[PeerConfig], *, update_only: bool = False,
                 budget: int = MAX_SET_MESSAGE) -> Iterator[list[dict[str, Any]]]:
    """Group peers into WGDEVICE_A_PEERS lists that each fit one message.

    A peer with more allowed IPs than fit is split the way wg(8) splits it: the
    first part carries its fields and REPLACE_ALLOWEDIPS, the following parts only
    the key and more allowed IPs (appended, as the kernel appends without that flag).
    """
    base_flags = WGPEER_F_UPDATE_ONLY if update_only else 0
    batch: list[dict[str, Any]] = []
    used = 0
    for peer in peers:
        head: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", peer.public_key]]
        head_size = _NEST + _KEY + _U32
        flags = base_flags
        if peer.preshared_key is not None:
            head.append(["WGPEER_A_PRESHARED_KEY", peer.preshared_key])
            head_size += _KEY
        if peer.endpoint is not None:
            head.append(["WGPEER_A_ENDPOINT", {"addr": str(peer.endpoint.host),
                                               "port": peer.endpoint.port}])
            head_size += _ENDPOINT4 if peer.endpoint.host.version == 4 else _ENDPOINT6
        if peer.persistent_keepalive is not None:
            head.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.persistent_keepalive])
            head_size += _U16
        pending = deque(peer.allowed_ips) if peer.allowed_ips is not None else None
        if pending is not None:
            flags |= WGPEER_F_REPLACE_ALLOWEDIPS
            head_size += _NEST
        head.insert(1, ["WGPEER_A_FLAGS", flags])
        while True:
            need = head_size + (_allowed_size(pending[0]) if pending else 0)
            if batch and used + need > budget:
                yield batch
                batch, used = [], 0
            size = head_size
            chunk: list[IPNetwork] = []
            # At least one allowed IP per part, so that a tiny budget still progresses.
            while pending and (used + size + _allowed_size(pending[0]) <= budget or not chunk):
                net = pending.popleft()
                size += _allowed_size(net)
                chunk.append(net)
            part = list(head)
            if pending is not None:
                part.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip_nla(n) for n in chunk]])
            batch.append({"attrs": part})
            used += size
            if not pending:
                break
            # More allowed IPs than fit: continue the same peer in the next message.
            yield batch
            batch, used = [], 0
            head = [["WGPEER_A_PUBLIC_KEY", peer.public_key], ["WGPEER_A_FLAGS", base_flags]]
            head_size = _NEST + _KEY + _U32 + _NEST
    if batch:
        yield batch


def remove_entries(public_keys: list[str],
                   budget: int = MAX_SET_MESSAGE) -> Iterator[list[dict[str, Any]]]:
    per_message = max(1, budget // (_NEST + _KEY + _U32))
    for i in range(0, len(public_keys), per_message):
        yield [{"attrs": [["WGPEER_A_PUBLIC_KEY", k], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]}
               for k in public_keys[i:i + per_message]]


class NetlinkDevice(WgDevice):
    backend = "netlink"

    def __init__(self, ifname: str, *, netns: str | None = None,
                 max_message: int = MAX_SET_MESSAGE) -> None:
        super().__init__(ifname)
        self.netns = netns
        self.max_message = max_message
        self._wg: WireGuard | None = None
        # pyroute2's sync socket is not safe for concurrent requests; the gateway
        # installs from the capture path while the eviction job dumps.
        self._lock = threading.Lock()

    def _sock(self) -> WireGuard:
        if self._wg is None:
            try:
                # Not WireGuard(netns=...): that forks (see nsenter).
                self._wg = (WireGuard(fileno=netlink_socket_fd(self.netns, NETLINK_GENERIC))
                            if self.netns else WireGuard())
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    raise BackendUnavailable(
                        "the kernel has no WireGuard generic netlink family: `modprobe "
                        "wireguard`, or use the uapi backend (wireguard-go)",
                        ifname=self.ifname, errno=e.code) from e
                raise netlink_error(e, self.ifname, "opening the WireGuard netlink socket") \
                    from e
        return self._wg

    def close(self) -> None:
        with self._lock:
            if self._wg is not None:
                self._wg.close()
                self._wg = None

    # -- reading ------------------------------------------------------------------

    def dump(self) -> DeviceDump:
        with self._lock:
            sock = self._sock()
            for _ in range(DUMP_ATTEMPTS):
                try:
                    messages = sock.info(self.ifname)
                except NetlinkError as e:
                    raise netlink_error(e, self.ifname, "reading the device") from e
                if not any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in messages):
                    return merge_dump(messages, self.ifname)
        raise ProtocolError(f"{self.ifname}: the peer list kept changing during {DUMP_ATTEMPTS} "
                            f"dumps in a row; try again", ifname=self.ifname)

    # -- writing ------------------------------------------------------------------

    def _send(self, attrs: list[list[Any]], doing: str) -> None:
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"] = [["WGDEVICE_A_IFNAME", self.ifname], *attrs]
        sock = self._sock()
        try:
            tuple(sock.nlm_request(msg, msg_type=sock.prid,
                                   msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as e:
            raise netlink_error(e, self.ifname, doing) from e

    def configure(self, *, private_key: str | None = None, listen_port: int | None = None,
                  fwmark: int | None = None) -> None:
        attrs: list[list[Any]] = []
        if private_key is not None:
            attrs.append(["WGDEVICE_A_PRIVATE_KEY", check_key(private_key, "private key")])
        if listen_port is not None:
            if not 0 <= int(listen_port) <= MAX_PORT:
                raise InvalidConfig(f"listen port {listen_port}: must be 0..{MAX_PORT}")
            attrs.append(["WGDEVICE_A_LISTEN_PORT", int(listen_port)])
        if fwmark is not None:
            attrs.append(["WGDEVICE_A_FWMARK", int(fwmark)])
        if attrs:
            with self._lock:
                self._send(attrs, "setting the interface")

    def set_peers(self, peers: Iterable[PeerConfig], *, update_only: bool = False) -> None:
        with self._lock:
            for entries in peer_entries(peers, update_only=update_only,
                                        budget=self.max_message):
                what = "the peer update" if len(entries) == 1 else \
                    f"{len(entries)} peer updates"
                self._send([["WGDEVICE_A_PEERS", entries]], what)

    def remove_peers(self, public_keys: Iterable[str]) -> None:
        keys = check_keys(public_keys)
        with self._lock:
            for entries in remove_entries(keys, budget=self.max_message):
                self._send([["WGDEVICE_A_PEERS", entries]], f"removing {len(entries)} peer(s)")


def create(ifname: str, *, private_key: str, listen_port: int | None = None,
           addresses: Iterable[str | IPInterface] = (), up: bool = True,
           netns: str | None = None) -> NetlinkDevice:
    """Create a kernel `wireguard` link and configure it; removed again on failure."""
    link.create_wireguard_link(ifname, netns=netns)
    dev = NetlinkDevice(ifname, netns=netns)
    try:
        dev.configure(private_key=private_key, listen_port=listen_port)
        link.configure_link(ifname, addresses=addresses, up=up, netns=netns)
    except BaseException:
        dev.close()
        link.delete_link(ifname, netns=netns)
        raise
    dev.created = True
    return dev


def open_netlink(ifname: str, *, netns: str | None = None) -> NetlinkDevice:
    """A handle on an existing kernel WireGuard interface."""
    kind = link.link_kind(ifname, netns=netns)
    if kind is None:
        raise InterfaceMissing(f"{ifname}: no such interface", ifname=ifname)
    if kind != "wireguard":
        raise NotWireGuard(f"{ifname}: is a {kind or 'plain'} link, not a kernel WireGuard "
                           f"interface", ifname=ifname)
    return NetlinkDevice(ifname, netns=netns)
