"""Packets for re-injection: tcpdump finds their checksums right, and the capture's own
parser reads back what was built (addresses, ports, payload untouched)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from appliance.gateway.capture import parse_frame
from appliance.gateway.udp_packet import internet_checksum, udp_packet

LINKTYPE_RAW = 101  # pcap: the packet starts at the IP header (IPv4 or IPv6)
INITIATION = bytes([1, 0, 0, 0]) + bytes(range(144))  # 148 bytes, the shape that matters

CASES = [
    ("198.51.100.2", 41000, "192.0.2.11", 51820, INITIATION),
    ("203.0.113.7", 65535, "192.0.2.11", 51820, INITIATION),
    ("2001:db8:2::2", 44579, "2001:db8:1::b", 51820, INITIATION),
    ("198.51.100.2", 1, "192.0.2.11", 51820, b"odd"),  # odd length: the zero pad
    ("2001:db8:2::3", 2, "2001:db8:1::b", 51820, b""),
]

# Built once and checked with `tcpdump -r -vv` ("[udp sum ok]", no "bad cksum"), kept
# so that a change to the builder shows up as a change of bytes.
VECTOR4 = bytes.fromhex(
    "450000300000400040114e7cc6336402c000020b"  # DF, TTL 64, UDP, header checksum 4e7c
    "a0285a6c001cdf9f"  # 41000 -> 23148, length 28, checksum df9f
    "01000000000102030405060708090a0b0c0d0e0f")
VECTOR6 = bytes.fromhex(
    "60000000000c1140"  # version 6, payload 12, UDP, hop limit 64
    "20010db8000200000000000000000002"
    "20010db800010000000000000000000b"
    "ae23ca6c000c2ac4"  # 44579 -> 51820, length 12, checksum 2ac4
    "01000000")


def _pcap(packets: list[bytes]) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)]
    for i, p in enumerate(packets):
        out.append(struct.pack("<IIII", 1_700_000_000 + i, 0, len(p), len(p)) + p)
    return b"".join(out)


def test_tcpdump_finds_every_checksum_right(tmp_path: Path) -> None:
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is needed (Debian package tcpdump; ./run setup installs it)"
    packets = [udp_packet(*case) for case in CASES]
    # One with a broken UDP checksum proves tcpdump really checks.
    broken = bytearray(packets[0])
    broken[26] ^= 0xFF
    path = tmp_path / "built.pcap"
    path.write_bytes(_pcap([*packets, bytes(broken)]))
    out = subprocess.run([tcpdump, "-r", str(path), "-n", "-vv"], capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "UDP" in line or "udp" in line.lower()]
    assert out.count("udp sum ok") == len(CASES), out
    assert out.count("bad udp cksum") == 1, out
    assert "bad cksum" not in out, out  # the IPv4 header checksums
    for src, sport, dst, dport, _ in CASES:
        assert any(f"{src}.{sport} > {dst}.{dport}" in line for line in lines), (src, out)


@pytest.mark.parametrize("case", CASES)
def test_the_capture_reads_back_what_was_built(case: tuple) -> None:
    src, sport, dst, dport, payload = case
    packet = udp_packet(src, sport, dst, dport, payload)
    ethertype = 0x86DD if ":" in src else 0x0800
    frame = bytes(12) + struct.pack("!H", ethertype) + packet
    d = parse_frame(frame, "ul0", dport)
    assert (d.src_ip, d.src_port, d.dst_ip, d.dst_port, d.payload) == \
        (src, sport, dst, dport, payload)


@pytest.mark.parametrize("case", CASES)
def test_checksums_verify_to_zero(case: tuple) -> None:
    src, sport, dst, dport, payload = case
    packet = udp_packet(src, sport, dst, dport, payload)
    if ":" in src:
        from ipaddress import ip_address
        seg = packet[40:]
        pseudo = (ip_address(src).packed + ip_address(dst).packed
                  + struct.pack("!I3xB", len(seg), 17))
    else:
        assert internet_checksum(packet[:20]) == 0  # the header with its checksum in it
        seg = packet[20:]
        pseudo = packet[12:20] + struct.pack("!xBH", 17, len(seg))
    assert internet_checksum(pseudo + seg) == 0


def test_known_vectors() -> None:
    assert udp_packet("198.51.100.2", 41000, "192.0.2.11", 23148,
                      INITIATION[:20]) == VECTOR4
    assert udp_packet("2001:db8:2::2", 44579, "2001:db8:1::b", 51820,
                      INITIATION[:4]) == VECTOR6


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2; complement 220d.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("args, problem", [
    (("198.51.100.2", 1, "2001:db8::1", 2, b""), "different families"),
    (("198.51.100.2", 70000, "192.0.2.11", 2, b""), "source port"),
    (("198.51.100.2", 1, "192.0.2.11", -1, b""), "destination port"),
    (("198.51.100.2", 1, "192.0.2.11", 2, bytes(65_520)), "does not fit"),
    (("not an address", 1, "192.0.2.11", 2, b""), "does not appear"),
])
def test_bad_input_is_refused(args: tuple, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        udp_packet(*args)


def test_only_this_hosts_addresses_count_as_local() -> None:
    from appliance.gateway.reinject import _is_local

    assert _is_local("127.0.0.1") and _is_local("::1")
    # Documentation addresses no test machine holds: never re-injected towards.
    assert not _is_local("192.0.2.254") and not _is_local("2001:db8:ffff::1")


def test_a_local_address_is_trusted_for_a_second_and_a_foreign_one_never(monkeypatch) -> None:
    from appliance.gateway import reinject

    checks: list[str] = []
    local = {"127.0.0.1"}

    def is_local(ip: str, scope: int = 0) -> bool:
        checks.append(ip)
        return ip in local

    monkeypatch.setattr(reinject, "_is_local", is_local)
    now = [100.0]
    r = reinject.Reinjector(clock=lambda: now[0])  # raw sockets: root, as every test here
    assert r._local("127.0.0.1", 0) and r._local("127.0.0.1", 0)
    assert checks == ["127.0.0.1"]  # the second answer came from memory
    assert not r._local("192.0.2.254", 0) and not r._local("192.0.2.254", 0)
    assert checks.count("192.0.2.254") == 2  # a refusal is never remembered
    local.clear()  # the address is removed from the host
    now[0] += reinject.LOCAL_FOR + 0.01
    assert not r._local("127.0.0.1", 0)
    r.close()


def test_a_reinjected_copy_gets_the_data_planes_mac2_and_stays_the_clients_message() -> None:
    from appliance.gateway.handshake import MAC, OFFSET_MAC2, Responder
    from appliance.gateway.reinject import with_mac2
    from appliance.keys import generate_private_key, public_key
    from tests.initiations import build_initiation

    gateway, client = generate_private_key(), generate_private_key()
    packet = build_initiation(client, public_key(gateway))
    tau = bytes(range(16))
    copy = with_mac2(packet, tau)
    assert copy[:OFFSET_MAC2] == packet[:OFFSET_MAC2] and not any(packet[OFFSET_MAC2:])
    assert copy[OFFSET_MAC2:] == MAC(tau, packet[:OFFSET_MAC2])
    # The macs are outside the Noise message: the data plane reads the same handshake.
    responder = Responder(gateway)
    a, b = responder.consume_initiation(packet), responder.consume_initiation(copy)
    assert (a.initiator_static, a.timestamp, a.ephemeral) == \
        (b.initiator_static, b.timestamp, b.ephemeral)
    assert a.initiator_static == public_key(client)
    assert with_mac2(packet[:100], tau) == packet[:100]
