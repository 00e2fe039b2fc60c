"""Merging a kernel WireGuard dump that spans several netlink messages.

The messages here are built the way the kernel splits a dump (device fields in
the first message only; a peer whose allowed IPs do not fit continues at the top
of the next message with just its key and the rest of its allowed IPs) and
encoded by pyroute2's own WireGuard message class, so the hand-written decoder is
checked against an independent encoder; the set requests the other way round.
The real kernel path is tests/vm/test_wg_netlink.py.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from datetime import UTC, datetime

import pytest
from pyroute2.netlink import NLM_F_MULTI
from pyroute2.netlink.generic.wireguard import wgmsg

from appliance.keys import encode_key
from appliance.wg import Endpoint, ProtocolError
from appliance.wg.model import PeerConfig
from appliance.wg.netlink import MAX_SET_MESSAGE, peer_batches, remove_batches
from appliance.wg.netlink_dump import activity, merge_dump
from appliance.wg.netlink_wire import wg_request_msg

KEY_SIZE = 36
ALLOWED_SIZE = 28


def key() -> str:
    return encode_key(secrets.token_bytes(32))


def _allowed(net: str) -> dict:
    n = ipaddress.ip_network(net)
    fam = socket.AF_INET if n.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", fam],
                      ["WGALLOWEDIP_A_IPADDR", n.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen]]}


def _encode_decode(attrs: list) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["header"]["type"] = 0x20
    msg["header"]["flags"] = NLM_F_MULTI
    msg["attrs"] = attrs
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def kernel_dump(peers: list[dict], *, budget: int, private: str | None = None,
                port: int = 51820) -> list[bytes]:
    return [m.data for m in kernel_dump_msgs(peers, budget=budget, private=private, port=port)]


def kernel_dump_msgs(peers: list[dict], *, budget: int, private: str | None = None,
                     port: int = 51820) -> list[wgmsg]:
    """Split like the kernel's wg_get_device_dump: fill each message up to `budget`
    bytes of peers; a peer cut mid-allowed-IPs is repeated (key + the rest) next."""
    messages: list[wgmsg] = []
    first = True
    queue = [(p, list(p["allowed"]), True) for p in peers]
    while True:
        attrs: list = []
        if first:
            attrs += [["WGDEVICE_A_LISTEN_PORT", port], ["WGDEVICE_A_FWMARK", 0],
                      ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]]
            if private:
                attrs.append(["WGDEVICE_A_PRIVATE_KEY", private])
            first = False
        used = 0
        out = []
        while queue:
            peer, allowed, fresh = queue[0]
            head = [["WGPEER_A_PUBLIC_KEY", peer["key"]]]
            size = KEY_SIZE + 8
            if fresh:
                hs = peer.get("hs", 0)
                head += [["WGPEER_A_PRESHARED_KEY", peer.get("psk", encode_key(bytes(32)))],
                         ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": hs,
                                                          "tv_nsec": 500_000 if hs else 0}],
                         ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.get("keepalive", 0)],
                         ["WGPEER_A_TX_BYTES", peer.get("tx", 0)],
                         ["WGPEER_A_RX_BYTES", peer.get("rx", 0)],
                         ["WGPEER_A_PROTOCOL_VERSION", 1]]
                if "endpoint" in peer:
                    host, port_ = peer["endpoint"]
                    head.append(["WGPEER_A_ENDPOINT", {"addr": host, "port": port_}])
                size += 100
            if used + size > budget and out:
                break  # the header does not fit: the peer starts the next message
            used += size
            taken = []
            while allowed and used + ALLOWED_SIZE <= budget:
                taken.append(allowed.pop(0))
                used += ALLOWED_SIZE
            out.append({"attrs": [*head, ["WGPEER_A_ALLOWEDIPS", [_allowed(a) for a in taken]]]})
            if allowed:
                queue[0] = (peer, allowed, False)
                break
            queue.pop(0)
        attrs.append(["WGDEVICE_A_PEERS", out])
        messages.append(_encode_decode(attrs))
        if not queue:
            return messages


def make_peers(n: int, ips: int) -> list[dict]:
    return [{"key": key(), "allowed": [f"{ipaddress.IPv4Address('198.18.0.0') + i * ips + j}/32"
                                       for j in range(ips)],
             "keepalive": i % 60, "rx": 1000 + i, "tx": 2000 + i, "hs": 1_700_000_000 + i,
             "endpoint": (f"203.0.113.{1 + i % 200}", 1024 + i)} for i in range(n)]


def keys_per_message(messages: list[bytes]) -> list[list[str]]:
    decoded = []
    for raw in messages:
        m = wgmsg(raw)
        m.decode()
        decoded.append(m)
    return [[p.get_attr("WGPEER_A_PUBLIC_KEY").decode()
             for p in m.get_attr("WGDEVICE_A_PEERS") or ()] for m in decoded]


def test_peers_split_across_messages_are_merged_once_with_all_fields():
    peers = make_peers(40, 20)
    messages = kernel_dump(peers, budget=4096)
    per_message = keys_per_message(messages)
    crossing = [i for i in range(1, len(per_message))
                if per_message[i][0] == per_message[i - 1][-1]]
    # The fixture really produces the trap: flattening lists some peers twice.
    assert len(messages) > 5 and crossing
    assert sum(map(len, per_message)) > len(peers)

    dump = merge_dump(messages, "wg0")
    assert [p.public_key for p in dump.peers] == [p["key"] for p in peers]
    for want, got in zip(peers, dump.peers, strict=True):
        assert [str(a) for a in got.allowed_ips] == want["allowed"]
        # The continuation part carries no stats; they must survive from the first part.
        assert (got.rx_bytes, got.tx_bytes) == (want["rx"], want["tx"])
        assert got.persistent_keepalive == want["keepalive"]
        assert got.endpoint == Endpoint(ipaddress.ip_address(want["endpoint"][0]),
                                        want["endpoint"][1])
        assert got.last_handshake == datetime.fromtimestamp(want["hs"], UTC).replace(
            microsecond=500)
        assert got.preshared_key is None


def test_a_peer_spanning_three_messages():
    peers = make_peers(3, 400)
    messages = kernel_dump(peers, budget=4096)
    assert sum(k == peers[1]["key"] for keys in keys_per_message(messages) for k in keys) >= 3
    dump = merge_dump(messages, "wg0")
    assert len(dump.peers) == 3
    assert [len(p.allowed_ips) for p in dump.peers] == [400, 400, 400]
    assert dump.peers[1].rx_bytes == peers[1]["rx"]


def test_device_fields_come_from_the_first_message():
    private = encode_key(bytes([8] + [1] * 30 + [64]))
    messages = kernel_dump(make_peers(30, 20), budget=2048, private=private, port=51999)
    dump = merge_dump(messages, "ignored")
    info = dump.info
    assert (info.ifname, info.listen_port, info.backend) == ("wg0", 51999, "netlink")
    assert info.private_key == private and info.public_key is not None
    assert len(dump.peers) == 30


def test_no_handshake_psk_endpoint_or_peers():
    peer = {"key": key(), "allowed": ["fd00::1/128", "198.18.0.0/15"], "hs": 0}
    dump = merge_dump(kernel_dump([peer], budget=4096), "wg0")
    (p,) = dump.peers
    assert p.last_handshake is None and p.endpoint is None and p.preshared_key is None
    assert [str(a) for a in p.allowed_ips] == ["fd00::1/128", "198.18.0.0/15"]
    empty = merge_dump(kernel_dump([], budget=4096), "wg0")
    assert empty.peers == () and empty.info.private_key is None


def test_ipv6_endpoint_and_preshared_key():
    psk = key()
    peer = {"key": key(), "allowed": [], "psk": psk, "endpoint": ("2001:db8::5", 443)}
    (p,) = merge_dump(kernel_dump([peer], budget=4096), "wg0").peers
    assert str(p.endpoint) == "[2001:db8::5]:443" and p.preshared_key == psk


def test_malformed_dumps_are_protocol_errors():
    msg = _encode_decode([["WGDEVICE_A_PEERS", [{"attrs": [["WGPEER_A_RX_BYTES", 1]]}]]])
    with pytest.raises(ProtocolError, match="without a public key"):
        merge_dump([msg.data], "wg0")
    good = kernel_dump(make_peers(2, 3), budget=4096)[0]
    with pytest.raises(ProtocolError, match="malformed"):
        merge_dump([good[:-7]], "wg0")


# -- the other direction: splitting set requests ---------------------------------------

def _decode_set(batch: list[bytes]) -> list:
    """Our encoding, read back by pyroute2's WireGuard message class."""
    msg = wg_request_msg()
    msg["cmd"] = 1
    msg["version"] = 1
    msg["header"]["type"] = 0x20
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "wg0"], ["WGDEVICE_A_PEERS", b"".join(batch)]]
    msg.encode()
    assert len(msg.data) <= MAX_SET_MESSAGE + 64
    decoded = wgmsg(msg.data)
    decoded.decode()
    assert decoded.get_attr("WGDEVICE_A_IFNAME") == "wg0"
    return decoded.get_attr("WGDEVICE_A_PEERS")


def test_set_messages_stay_under_the_budget_and_keep_every_allowed_ip():
    nets = [ipaddress.ip_network(f"{ipaddress.IPv4Address('198.18.0.0') + i}/32")
            for i in range(3000)] + [ipaddress.ip_network("fd00::/64")]
    small = [PeerConfig(key(), allowed_ips=[nets[i]], endpoint="192.0.2.1:1",
                        persistent_keepalive=1) for i in range(2000)]
    big = PeerConfig(key(), allowed_ips=nets, persistent_keepalive=7)
    batches = list(peer_batches([*small[:1000], big, *small[1000:]]))
    assert len(batches) > 3
    seen: dict[str, list] = {}
    flags_of_big = []
    for batch in batches:
        for p in _decode_set(batch):
            k = p.get_attr("WGPEER_A_PUBLIC_KEY").decode()
            seen.setdefault(k, []).extend(a["addr"] for a in p.get_attr("WGPEER_A_ALLOWEDIPS"))
            if k == big.public_key:
                flags_of_big.append(p.get_attr("WGPEER_A_FLAGS"))
    assert len(seen) == 2001
    assert seen[big.public_key] == [str(n) for n in nets]
    assert seen[small[5].public_key] == [str(nets[5])]
    # Only the first part replaces; later parts append.
    assert flags_of_big[0] == 2 and set(flags_of_big[1:]) == {0} and len(flags_of_big) > 1


def test_every_field_encodes_as_pyroute2_reads_it():
    psk = key()
    peers = [PeerConfig(key(), allowed_ips=["198.18.0.0/15", "fd00::1/128"], preshared_key=psk,
                        endpoint="[2001:db8::9]:51820", persistent_keepalive=25),
             PeerConfig(key(), endpoint="192.0.2.3:4", allowed_ips=[])]
    (batch,) = peer_batches(peers)
    a, b = _decode_set(batch)
    assert a.get_attr("WGPEER_A_PUBLIC_KEY").decode() == peers[0].public_key
    assert a.get_attr("WGPEER_A_PRESHARED_KEY").decode() == psk
    assert a.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    ep = a.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["addr"], ep["port"]) == ("2001:db8::9", 51820)
    assert [x["addr"] for x in a.get_attr("WGPEER_A_ALLOWEDIPS")] == ["198.18.0.0/15",
                                                                       "fd00::1/128"]
    ep = b.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["addr"], ep["port"]) == ("192.0.2.3", 4)
    assert b.get_attr("WGPEER_A_ALLOWEDIPS") == [] and b.get_attr("WGPEER_A_FLAGS") == 2
    assert b.get_attr("WGPEER_A_PRESHARED_KEY") is None


def test_update_only_and_remove_flags():
    (batch,) = peer_batches([PeerConfig(key(), persistent_keepalive=0)], update_only=True)
    (p,) = _decode_set(batch)
    assert p.get_attr("WGPEER_A_FLAGS") == 4
    assert p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0
    assert p.get_attr("WGPEER_A_ALLOWEDIPS") is None
    keys = [key() for _ in range(2000)]
    batches = list(remove_batches(keys))
    assert len(batches) > 1
    decoded = [p for b in batches for p in _decode_set(b)]
    assert [p.get_attr("WGPEER_A_PUBLIC_KEY").decode() for p in decoded] == keys
    assert {p.get_attr("WGPEER_A_FLAGS") for p in decoded} == {1}



def test_activity_agrees_with_the_full_read_over_split_messages():
    peers = make_peers(40, 20)
    peers.append({"key": key(), "allowed": ["fd00::9/128"], "hs": 0})  # never handshook
    messages = kernel_dump(peers, budget=4096)
    full = merge_dump(messages, "wg0").peers
    got = activity(messages, "wg0")
    assert [a.public_key for a in got] == [p.public_key for p in full], "each peer once"
    for a, p in zip(got, full, strict=True):
        assert (a.rx_bytes, a.persistent_keepalive) == (p.rx_bytes, p.persistent_keepalive)
        if p.last_handshake is None:
            assert a.last_handshake is None
        else:
            assert abs(a.last_handshake - p.last_handshake.timestamp()) < 1e-5


def test_activity_refuses_malformed_dumps_like_the_full_read():
    msg = _encode_decode([["WGDEVICE_A_PEERS", [{"attrs": [["WGPEER_A_RX_BYTES", 1]]}]]])
    with pytest.raises(ProtocolError, match="without a public key"):
        activity([msg.data], "wg0")
    good = kernel_dump(make_peers(2, 3), budget=4096)[0]
    with pytest.raises(ProtocolError, match="malformed"):
        activity([good[:-7]], "wg0")
