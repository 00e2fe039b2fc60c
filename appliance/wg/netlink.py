"""The `netlink` backend: kernel WireGuard through pyroute2's generic netlink socket.

pyroute2's `WireGuard.set()` carries one peer per request (one netlink round trip
and one kernel rtnl_lock/device_update_lock section each), although
WG_CMD_SET_DEVICE takes any number of peers in its WGDEVICE_A_PEERS nest; and its
`info()` returns the dump messages unmerged (pyroute2 issue #1212). So this
module keeps pyroute2's socket (family lookup, sequence numbers, ACKs, errors)
and puts many peers in each message, encoded by netlink_wire, and merges dumps
(netlink_dump). bench/backends.py compares it with per-peer `WireGuard.set()`.
"""

from __future__ import annotations

import base64
import errno
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink import (
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_NAME,
    WG_GENL_VERSION,
    AsyncWireGuard,
)

from . import link
from . import netlink_wire as w
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
from .model import MAX_PORT, DeviceDump, IPInterface, PeerActivity, PeerConfig, check_key
from .netlink_dump import activity as dump_activity
from .netlink_dump import merge_dump
from .nsenter import netlink_socket_fd

# Bytes of peer attributes per WG_CMD_SET_DEVICE message. The kernel takes up to
# the socket's send buffer, but it holds rtnl_lock for a whole message, so a
# bounded message lets other netlink users (and our own installs) in between.
MAX_SET_MESSAGE = 32 * 1024
# A dump that overlaps a peer change is flagged NLM_F_DUMP_INTR; wg(8) retries it.
DUMP_ATTEMPTS = 5

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


def _family(version: int) -> int:
    return w.AF_INET if version == 4 else w.AF_INET6


def peer_batches(peers: Iterable[PeerConfig], *, update_only: bool = False,
                 budget: int = MAX_SET_MESSAGE) -> Iterator[list[bytes]]:
    """Encoded WGDEVICE_A_PEERS elements, grouped so that each group fits one message.

    A peer with more allowed IPs than fit is split the way wg(8) splits it: the
    first part carries its fields and REPLACE_ALLOWEDIPS, the following parts only
    the key and more allowed IPs (appended, as the kernel appends without that flag).
    """
    base_flags = w.WGPEER_F_UPDATE_ONLY if update_only else 0
    batch: list[bytes] = []
    used = 0
    for peer in peers:
        key = base64.b64decode(peer.public_key)
        flags = base_flags | (w.WGPEER_F_REPLACE_ALLOWEDIPS if peer.allowed_ips is not None
                              else 0)
        endpoint = None
        if peer.endpoint is not None:
            host = peer.endpoint.host
            endpoint = w.sockaddr(_family(host.version), host.packed, peer.endpoint.port)
        head = w.peer_head(
            key, flags, endpoint=endpoint, keepalive=peer.persistent_keepalive,
            preshared_key=(base64.b64decode(peer.preshared_key)
                           if peer.preshared_key is not None else None))
        pending = None if peer.allowed_ips is None else [
            w.allowed_ip(_family(n.version), n.network_address.packed, n.prefixlen)
            for n in peer.allowed_ips]
        i = 0
        while True:
            overhead = 4 + len(head) + (4 if pending is not None else 0)
            first = len(pending[i]) if pending and i < len(pending) else 0
            if batch and used + overhead + first > budget:
                yield batch
                batch, used = [], 0
            room = budget - used - overhead
            j, size = i, 0
            # At least one allowed IP per part, so that a tiny budget still progresses.
            while pending and j < len(pending) and (size + len(pending[j]) <= room or j == i):
                size += len(pending[j])
                j += 1
            element = w.peer(head, None if pending is None else pending[i:j])
            batch.append(element)
            used += len(element)
            i = j
            if pending is None or i >= len(pending):
                break
            # More allowed IPs than fit: continue the same peer in the next message.
            yield batch
            batch, used = [], 0
            head = w.peer_head(key, base_flags)
    if batch:
        yield batch


def remove_batches(public_keys: list[str],
                   budget: int = MAX_SET_MESSAGE) -> Iterator[list[bytes]]:
    elements = (w.peer(w.peer_head(base64.b64decode(k), w.WGPEER_F_REMOVE_ME), None)
                for k in public_keys)
    batch: list[bytes] = []
    used = 0
    for element in elements:
        if batch and used + len(element) > budget:
            yield batch
            batch, used = [], 0
        batch.append(element)
        used += len(element)
    if batch:
        yield batch


class _AsyncWgSocket(AsyncWireGuard):
    """pyroute2's WireGuard socket, with dump replies left undecoded (wg_raw_msg)."""

    async def setup_endpoint(self) -> None:
        if getattr(self.local, "transport", None) is not None:
            return
        await super(AsyncWireGuard, self).setup_endpoint()
        await self.bind(WG_GENL_NAME, w.wg_raw_msg)


class WgSocket(WireGuard):
    async_class = _AsyncWgSocket


class NetlinkDevice(WgDevice):
    backend = "netlink"

    def __init__(self, ifname: str, *, netns: str | None = None,
                 max_message: int = MAX_SET_MESSAGE) -> None:
        super().__init__(ifname)
        self.netns = netns
        self.max_message = max_message
        # pyroute2 (0.9) keeps a socket's transport per thread: a second thread using
        # the same socket sets up a second transport on its file descriptor and the
        # requests of both fail with ECONNRESET (seen with the gateway under systemd,
        # whose installs, eviction and handshake jobs run on different threads). So
        # each thread gets a socket of its own.
        self._local = threading.local()
        self._socks: list[WgSocket] = []
        # pyroute2's sync socket is not safe for concurrent requests; the gateway
        # installs from the capture path while the eviction job dumps.
        self._lock = threading.Lock()

    @property
    def _wg(self) -> WgSocket | None:
        return getattr(self._local, "sock", None)

    def _sock(self) -> WgSocket:
        if self._wg is None:
            try:
                # Not WireGuard(netns=...): that forks (see nsenter).
                self._local.sock = (
                    WgSocket(fileno=netlink_socket_fd(self.netns, NETLINK_GENERIC))
                    if self.netns else WgSocket())
                self._socks.append(self._local.sock)
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
            for sock in self._socks:
                sock.close()
            self._socks.clear()
            self._local = threading.local()

    # -- reading ------------------------------------------------------------------

    def dump(self) -> DeviceDump:
        return merge_dump(self.dump_messages(), self.ifname)

    def activity(self) -> list[PeerActivity]:
        """The same dump from the kernel (it has no smaller one), decoded only as far
        as housekeeping needs (netlink_dump.activity)."""
        return dump_activity(self.dump_messages(), self.ifname)

    def dump_messages(self) -> list[bytes]:
        """The raw messages of one consistent WG_CMD_GET_DEVICE dump."""
        with self._lock:
            sock = self._sock()
            for _ in range(DUMP_ATTEMPTS):
                msg = w.wg_request_msg()
                msg["cmd"] = WG_CMD_GET_DEVICE
                msg["version"] = WG_GENL_VERSION
                msg["attrs"] = [["WGDEVICE_A_IFNAME", self.ifname]]
                try:
                    replies = tuple(sock.nlm_request(msg, msg_type=sock.prid,
                                                     msg_flags=NLM_F_REQUEST | NLM_F_DUMP))
                except NetlinkError as e:
                    raise netlink_error(e, self.ifname, "reading the device") from e
                if not any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in replies):
                    return [m["raw"] for m in replies]
        raise ProtocolError(f"{self.ifname}: the peer list kept changing during {DUMP_ATTEMPTS} "
                            f"dumps in a row; try again", ifname=self.ifname)

    # -- writing ------------------------------------------------------------------

    def _send(self, attrs: list[list[Any]], doing: str) -> None:
        msg = w.wg_request_msg()
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
            attrs.append(["WGDEVICE_A_PRIVATE_KEY",
                          base64.b64decode(check_key(private_key, "private key"))])
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
            for batch in peer_batches(peers, update_only=update_only,
                                      budget=self.max_message):
                what = "the peer update" if len(batch) == 1 else f"{len(batch)} peer updates"
                self._send([["WGDEVICE_A_PEERS", b"".join(batch)]], what)

    def remove_peers(self, public_keys: Iterable[str]) -> None:
        keys = check_keys(public_keys)
        with self._lock:
            for batch in remove_batches(keys, budget=self.max_message):
                self._send([["WGDEVICE_A_PEERS", b"".join(batch)]],
                           f"removing {len(batch)} peer(s)")


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
