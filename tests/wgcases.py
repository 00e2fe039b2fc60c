"""Test cases for the WireGuard device backends, written once, run against both:
`uapi` (wireguard-go, tests/lab/test_wg_backend.py) and `netlink` (the kernel
module inside a qemu VM, tests/vm/wg_netlink_inner.py).

Each case takes a `Rig` (which backend, where to make interfaces) and builds what
it needs in network namespaces it registers for cleanup. Addresses are the
documentation ranges on the underlay and 198.18.0.0/15 / fd00::/8 in tunnels.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from appliance.keys import encode_key, generate_keypair, generate_preshared_key
from appliance.wg import (
    Endpoint,
    InterfaceMissing,
    InvalidConfig,
    NotWireGuard,
    PeerConfig,
    PermissionDenied,
    WgDevice,
    WgError,
    create_device,
    open_device,
    stop_wireguard_go,
)
from appliance.wg.uapi import socket_path
from lab.netns import Cleanup, Netns, create_netns, start_wireguard_go, veth

ZERO_KEY = encode_key(bytes(32))
CLONE_NEWNET = 0x40000000
TUNNEL4 = ipaddress.IPv4Network("198.18.0.0/15")
TUNNEL6 = ipaddress.IPv6Network("fd00::/16")


def tunnel4(i: int, prefix: int = 32) -> ipaddress.IPv4Network:
    """The i-th /32 (or wider) of 198.18.0.0/15 (131,072 of them)."""
    return ipaddress.ip_network(f"{TUNNEL4[i * 2 ** (32 - prefix)]}/{prefix}")


def tunnel6(i: int) -> ipaddress.IPv6Network:
    return ipaddress.ip_network(f"{TUNNEL6[(1 << 64) + i]}/128")


@dataclass
class Rig:
    """Where a case makes its interfaces: the backend under test, a per-run name
    prefix (UAPI sockets are shared by every namespace, so names must be unique on
    the machine) and the cleanup stack."""

    backend: str
    cleanup: Cleanup
    prefix: str = field(default_factory=lambda: f"wt{secrets.token_hex(2)}")
    _n: int = 0

    def name(self, tag: str) -> str:
        name = f"{self.prefix}{tag}"
        assert len(name) <= 15, name
        return name

    def netns(self, tag: str) -> Netns:
        return create_netns(f"{self.prefix}-{tag}-{secrets.token_hex(2)}", self.cleanup)

    def device(self, tag: str, *, listen_port: int | None = 51820,
               addresses: tuple[str, ...] = ("198.18.0.1/15", "fd00::1/64"),
               ns: Netns | None = None) -> tuple[WgDevice, Netns, str]:
        """A fresh interface of the backend under test in its own namespace.
        Returns (device, namespace, private key)."""
        ns = ns or self.netns(tag)
        ifname = self.name(tag)
        private, _ = generate_keypair()
        dev = create_device(ifname, private_key=private, listen_port=listen_port,
                            addresses=addresses, backend=self.backend, netns=ns.name,
                            output=subprocess.DEVNULL)
        self.track(dev)
        assert dev.backend == self.backend and dev.created
        return dev, ns, private

    def track(self, dev: WgDevice) -> None:
        self.cleanup.push(f"close {dev.ifname}", dev.close)
        if dev.process is not None:
            proc, ifname = dev.process, dev.ifname
            self.cleanup.push(f"wireguard-go {ifname}", lambda: stop_wireguard_go(proc, ifname))


def pubkey() -> str:
    """A peer's public key: any 32 bytes will do for configuration, and skipping
    the Curve25519 derivation keeps the 1,000-peer cases quick under emulation."""
    return encode_key(secrets.token_bytes(32))


def _peer(i: int, **kw: object) -> PeerConfig:
    return PeerConfig(pubkey(), **kw)  # type: ignore[arg-type]


def by_key(dev: WgDevice) -> dict:
    peers = dev.peers()
    keys = [p.public_key for p in peers]
    assert len(keys) == len(set(keys)), "a peer is listed twice"
    return {p.public_key: p for p in peers}


# -- cases ----------------------------------------------------------------------------

def case_device_fields(rig: Rig) -> None:
    """Private key, derived public key and listen port read back; open_device finds it."""
    dev, ns, private = rig.device("d", listen_port=51999)
    info = dev.info()
    assert info.private_key == private
    assert info.public_key == generate_public(private)
    assert info.listen_port == 51999
    assert info.backend == rig.backend and info.ifname == dev.ifname
    assert private not in repr(info), "a private key leaked into repr()"
    new_private, _ = generate_keypair()
    dev.configure(private_key=new_private, listen_port=51998)
    info = dev.info()
    assert (info.private_key, info.listen_port) == (new_private, 51998)
    assert info.public_key == generate_public(new_private)
    again = open_device(dev.ifname, "auto", netns=ns.name)
    rig.track(again)
    assert again.backend == rig.backend
    assert again.info().private_key == new_private


def generate_public(private_b64: str) -> str:
    import base64

    from appliance.keys import public_key
    return encode_key(public_key(base64.b64decode(private_b64)))


def case_peer_fields_round_trip(rig: Rig) -> None:
    """Every peer field written reads back; partial updates leave the rest alone."""
    dev, _, _ = rig.device("f")
    psk = generate_preshared_key()
    a = PeerConfig(pubkey(), allowed_ips=[tunnel4(10), tunnel6(10), tunnel4(3, 24)],
                   preshared_key=psk, endpoint=Endpoint.parse("192.0.2.7:51820"),
                   persistent_keepalive=25)
    dev.set_peer(a)
    (p,) = dev.peers()
    assert p.public_key == a.public_key
    assert set(p.allowed_ips) == {tunnel4(10), tunnel6(10), tunnel4(3, 24)}
    assert p.preshared_key == psk
    assert p.endpoint == Endpoint(ipaddress.ip_address("192.0.2.7"), 51820)
    assert str(p.endpoint) == "192.0.2.7:51820"
    assert p.persistent_keepalive == 25
    assert p.last_handshake is None
    assert p.rx_bytes == 0 and p.tx_bytes >= 0  # nothing can answer from 192.0.2.7
    assert psk not in repr(p)

    # An IPv6 endpoint, and the keepalive cleared, each touching nothing else.
    dev.set_endpoint(a.public_key, "[2001:db8::7]:51821")
    dev.clear_keepalive(a.public_key)
    (p,) = dev.peers()
    assert str(p.endpoint) == "[2001:db8::7]:51821"
    assert p.persistent_keepalive == 0
    assert p.preshared_key == psk
    assert set(p.allowed_ips) == {tunnel4(10), tunnel6(10), tunnel4(3, 24)}

    # allowed_ips replaces; host bits are dropped like the device drops them.
    dev.set_peer(PeerConfig(a.public_key, allowed_ips=["198.18.0.77/32", "fd00::1:5/128"]))
    (p,) = dev.peers()
    assert set(p.allowed_ips) == {ipaddress.ip_network("198.18.0.77/32"),
                                  ipaddress.ip_network("fd00::1:5/128")}
    # The all-zero preshared key clears it; an empty list clears allowed IPs.
    dev.set_peer(PeerConfig(a.public_key, preshared_key=ZERO_KEY, allowed_ips=[]))
    (p,) = dev.peers()
    assert p.preshared_key is None and p.allowed_ips == ()
    assert str(p.endpoint) == "[2001:db8::7]:51821"


def case_incremental_add_and_remove(rig: Rig) -> None:
    """Adding or removing one peer never touches the others."""
    dev, _, _ = rig.device("i")
    peers = [PeerConfig(pubkey(), allowed_ips=[tunnel4(100 + i)],
                        endpoint=f"198.51.100.{10 + i}:4000", persistent_keepalive=i)
             for i in range(5)]
    for peer in peers:
        dev.set_peer(peer)
    seen = by_key(dev)
    assert set(seen) == {p.public_key for p in peers}
    dev.set_peer(PeerConfig(peers[2].public_key, persistent_keepalive=0))
    dev.remove_peer(peers[0].public_key)
    seen = by_key(dev)
    assert set(seen) == {p.public_key for p in peers[1:]}
    for i, peer in enumerate(peers[1:], start=1):
        got = seen[peer.public_key]
        assert got.allowed_ips == (tunnel4(100 + i),)
        assert str(got.endpoint) == f"198.51.100.{10 + i}:4000"
        assert got.persistent_keepalive == (0 if i == 2 else i)
    # Removing a peer that is not there is a no-op, not an error.
    dev.remove_peer(peers[0].public_key)
    dev.remove_peers([pubkey(), peers[1].public_key])
    assert set(by_key(dev)) == {p.public_key for p in peers[2:]}


def case_update_only_does_not_create(rig: Rig) -> None:
    """A follow-up change (clearing the keepalive) must not resurrect an evicted peer."""
    dev, _, _ = rig.device("u")
    kept = _peer(0, allowed_ips=[tunnel4(1)], persistent_keepalive=1)
    dev.set_peer(kept)
    ghost = pubkey()
    dev.clear_keepalive(ghost)
    dev.set_endpoint(ghost, "192.0.2.9:9")
    dev.set_peers([PeerConfig(ghost, allowed_ips=[tunnel4(2)])], update_only=True)
    seen = by_key(dev)
    assert list(seen) == [kept.public_key]
    dev.clear_keepalive(kept.public_key)
    assert dev.peers()[0].persistent_keepalive == 0


def case_many_peers(rig: Rig, n: int = 1000, one_by_one: int = 100) -> None:
    """n peers in: the first one_by_one with set_peer, the rest batched; listed with
    their own allowed IPs; then removed (one_by_one singly, the rest batched)."""
    dev, _, _ = rig.device("m")
    peers = [PeerConfig(pubkey(), allowed_ips=[tunnel4(1000 + i), tunnel6(i)],
                        persistent_keepalive=0) for i in range(n)]
    for peer in peers[:one_by_one]:
        dev.set_peer(peer)
    dev.set_peers(peers[one_by_one:])
    seen = by_key(dev)
    assert len(seen) == n
    for i, peer in enumerate(peers):
        assert seen[peer.public_key].allowed_ips == (tunnel4(1000 + i), tunnel6(i)), i
    for peer in peers[:one_by_one]:
        dev.remove_peer(peer.public_key)
    assert len(dev.peers()) == n - one_by_one
    dev.remove_peers(p.public_key for p in peers[one_by_one:])
    assert dev.peers() == []


def case_big_dump(rig: Rig, n: int = 300, ips: int = 20) -> None:
    """A dump larger than one netlink message, with peers crossing message
    boundaries: each peer exactly once, with all its allowed IPs and its own fields."""
    dev, _, _ = rig.device("b")
    peers = [PeerConfig(pubkey(),
                        allowed_ips=[tunnel4(i * ips + j) for j in range(ips)],
                        endpoint=f"203.0.113.{1 + i % 250}:{1024 + i}",
                        persistent_keepalive=1 + i % 600)
             for i in range(n)]
    dev.set_peers(peers)
    seen = by_key(dev)
    assert len(seen) == n
    for i, peer in enumerate(peers):
        got = seen[peer.public_key]
        assert got.allowed_ips == peer.allowed_ips, f"peer {i}: allowed IPs lost or mixed"
        assert got.endpoint == peer.endpoint, f"peer {i}: endpoint lost"
        assert got.persistent_keepalive == peer.persistent_keepalive, f"peer {i}: keepalive"
    # Housekeeping's cheap read: each peer once here too, with its own keepalive.
    activity = dev.activity()
    assert sorted(a.public_key for a in activity) == sorted(seen)
    assert {a.public_key: a.persistent_keepalive for a in activity} == \
        {p.public_key: p.persistent_keepalive for p in peers}
    dev.remove_peers(seen)
    assert dev.peers() == []


def case_peer_with_many_allowed_ips(rig: Rig, ips: int = 2500) -> None:
    """One peer whose allowed IPs alone need several messages each way."""
    dev, _, _ = rig.device("a")
    nets = [tunnel4(i) for i in range(ips)] + [tunnel6(i) for i in range(ips // 5)]
    before = _peer(0, allowed_ips=[tunnel4(100_000)])
    after = _peer(1, allowed_ips=[tunnel4(100_001)])
    big = PeerConfig(pubkey(), allowed_ips=nets, persistent_keepalive=7)
    dev.set_peers([before, big, after])
    seen = by_key(dev)
    assert len(seen) == 3
    assert set(seen[big.public_key].allowed_ips) == set(nets)
    assert len(seen[big.public_key].allowed_ips) == len(nets)
    assert seen[big.public_key].persistent_keepalive == 7
    assert seen[before.public_key].allowed_ips == (tunnel4(100_000),)
    assert seen[after.public_key].allowed_ips == (tunnel4(100_001),)
    # Shrinking replaces the whole set.
    dev.set_peer(PeerConfig(big.public_key, allowed_ips=nets[:3]))
    assert by_key(dev)[big.public_key].allowed_ips == tuple(nets[:3])


def case_bad_input_is_refused_before_sending(rig: Rig) -> None:
    dev, _, _ = rig.device("v")
    bad = [
        lambda: PeerConfig("not-a-key"),
        lambda: PeerConfig(pubkey(), allowed_ips=["198.18.0.1"]),
        lambda: PeerConfig(pubkey(), allowed_ips="198.18.0.1/32"),
        lambda: PeerConfig(pubkey(), endpoint="192.0.2.1"),
        lambda: PeerConfig(pubkey(), persistent_keepalive=70000),
        lambda: dev.remove_peer("AAAA"),
        lambda: dev.configure(listen_port=70000),
    ]
    for make in bad:
        try:
            make()
        except InvalidConfig as e:
            assert str(e)
        else:
            raise AssertionError("invalid input accepted")
    assert dev.peers() == []


def case_missing_interface(rig: Rig) -> None:
    """Typed errors an operator can act on: no such interface, not WireGuard, gone."""
    missing = rig.name("zz")
    for backend in ("auto", rig.backend):
        try:
            open_device(missing, backend)
        except InterfaceMissing as e:
            assert missing in str(e) and e.ifname == missing
        else:
            raise AssertionError(f"open_device({missing!r}, {backend!r}) did not fail")
    # A link that is not WireGuard.
    ns = rig.netns("n")
    other = rig.name("ve")
    ns.ip("link", "add", other, "type", "veth", "peer", "name", rig.name("dp"))
    try:
        open_device(other, "auto", netns=ns.name)
    except NotWireGuard as e:
        assert other in str(e)
    else:
        raise AssertionError("a veth link was taken for WireGuard")
    # A handle whose interface disappears reports InterfaceMissing, not a traceback.
    dev, ns2, _ = rig.device("g")
    if dev.process is not None:
        stop_wireguard_go(dev.process, dev.ifname)
        assert not socket_path(dev.ifname).exists()
    else:
        ns2.ip("link", "del", dev.ifname)
    for op in (dev.peers, lambda: dev.set_peer(_peer(0, allowed_ips=[tunnel4(5)])),
               lambda: dev.remove_peer(pubkey())):
        try:
            op()
        except InterfaceMissing as e:
            assert dev.ifname in str(e)
        else:
            raise AssertionError("an operation on a vanished interface succeeded")


def case_permission_denied(rig: Rig) -> None:
    """An unprivileged process gets PermissionDenied, not a bare OSError/NetlinkError."""
    dev, ns, _ = rig.device("p")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            if rig.backend == "netlink":
                # Netlink talks to the caller's namespace: enter the device's while
                # still privileged (Python 3.11 has no os.setns).
                import ctypes
                fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    os._exit(3)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            from appliance.wg.netlink import NetlinkDevice
            from appliance.wg.uapi import UapiDevice
            cls = NetlinkDevice if rig.backend == "netlink" else UapiDevice
            cls(dev.ifname).peers()
            code = 1
        except PermissionDenied:
            code = 0
        except WgError:
            code = 2
        except BaseException:  # noqa: BLE001 - report, don't unwind into pytest
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, \
        f"unprivileged access: exit {os.waitstatus_to_exitcode(status)} " \
        "(1 allowed, 2 other WgError, 3 setup failed, 4 other exception)"


# -- the handshake case: a real client in another namespace ---------------------------

GW_UNDERLAY = "192.0.2.1"
CLIENT_UNDERLAY = "192.0.2.2"
GW_TUNNEL = "198.18.0.1"
CLIENT_TUNNEL = "198.18.0.2"


def client_link(rig: Rig, ns: Netns, ifname: str) -> None:
    """The client's interface: wireguard-go for the uapi rig, the kernel's for netlink.
    Either way it is configured with wg(8) inside its namespace."""
    if rig.backend == "uapi":
        start_wireguard_go(ns, ifname, rig.cleanup)
    else:
        ns.ip("link", "add", ifname, "type", "wireguard")


def wg_in(ns: Netns, *args: str) -> str:
    return ns.run(["wg", *args]).stdout


def secret_file(rig: Rig, value: str) -> str:
    """A 0600 file for a key handed to wg(8): never on argv, never in a traceback."""
    fd, path = tempfile.mkstemp(prefix=f"{rig.prefix}-", suffix=".key")
    rig.cleanup.push(f"remove {path}", lambda: os.unlink(path))
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def case_handshake(rig: Rig, timeout: float = 20.0) -> None:
    """A client configured with wg(8) handshakes with the device: last_handshake
    becomes an aware datetime close to now, bytes are counted, the endpoint is the
    client's; removing that peer leaves another one in place."""
    gw_ns = rig.netns("gw")
    cl_ns = rig.netns("cl")
    veth(gw_ns, "u0", cl_ns, "u0")
    gw_ns.ip("addr", "add", f"{GW_UNDERLAY}/24", "dev", "u0")
    cl_ns.ip("addr", "add", f"{CLIENT_UNDERLAY}/24", "dev", "u0")
    dev, _, gw_private = rig.device("hg", listen_port=51820, addresses=(f"{GW_TUNNEL}/24",),
                                    ns=gw_ns)
    gw_public = dev.info().public_key
    assert gw_public is not None
    cl_if = rig.name("hc")
    client_link(rig, cl_ns, cl_if)
    cl_private, cl_public = generate_keypair()
    wg_in(cl_ns, "set", cl_if, "listen-port", "51821", "peer", gw_public,
          "endpoint", f"{GW_UNDERLAY}:51820", "allowed-ips", f"{GW_TUNNEL}/32")
    wg_in(cl_ns, "set", cl_if, "private-key", secret_file(rig, cl_private))
    cl_ns.ip("addr", "add", f"{CLIENT_TUNNEL}/24", "dev", cl_if)
    cl_ns.ip("link", "set", cl_if, "up")

    bystander = _peer(0, allowed_ips=[tunnel4(500)], endpoint="198.51.100.9:9")
    dev.set_peers([bystander, PeerConfig(cl_public, allowed_ips=[f"{CLIENT_TUNNEL}/32"])])
    assert by_key(dev)[cl_public].last_handshake is None

    started = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    peer = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            cl_ns.run(["ping", "-c", "1", "-W", "1", GW_TUNNEL], timeout=5)
        peer = by_key(dev)[cl_public]
        if peer.last_handshake is not None and peer.rx_bytes > 0:
            break
    assert peer is not None and peer.last_handshake is not None, "no handshake"
    hs = peer.last_handshake
    assert hs.tzinfo is not None and hs.utcoffset() == timedelta(0)
    now = datetime.now(UTC)
    assert started - timedelta(seconds=2) <= hs <= now + timedelta(seconds=2), (started, hs, now)
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert peer.endpoint == Endpoint(ipaddress.ip_address(CLIENT_UNDERLAY), 51821)
    # The cheap read agrees: the handshake time to the microsecond, no fewer bytes.
    cheap = {a.public_key: a for a in dev.activity()}
    assert cheap[bystander.public_key].last_handshake is None
    assert abs(cheap[cl_public].last_handshake - hs.timestamp()) < 0.001 or \
        cheap[cl_public].last_handshake > hs.timestamp()  # a rekey since
    assert cheap[cl_public].rx_bytes >= peer.rx_bytes
    # The client's own view agrees (wg(8) reads it with the other backend's code).
    assert "latest handshake" in wg_in(cl_ns, "show", cl_if)

    dev.remove_peer(cl_public)
    seen = by_key(dev)
    assert list(seen) == [bystander.public_key]
    assert seen[bystander.public_key].allowed_ips == (tunnel4(500),)
    assert gw_private  # the device kept the key it was created with
    assert dev.info().private_key == gw_private


ALL_CASES = [
    case_device_fields,
    case_peer_fields_round_trip,
    case_incremental_add_and_remove,
    case_update_only_does_not_create,
    case_many_peers,
    case_big_dump,
    case_peer_with_many_allowed_ips,
    case_bad_input_is_refused_before_sending,
    case_missing_interface,
    case_permission_denied,
    case_handshake,
]
