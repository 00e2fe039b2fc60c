"""The capture filter and frame parser: tcpdump agrees, and crafted frames behave.

The filter is run here by a small classic-BPF interpreter (the kernel's
semantics for the instructions tcpdump emits: a load past the end rejects the
frame). The same frames go through parse_frame, so filter and parser are checked
to agree on what an initiation looks like. The real kernel runs the program in
tests/lab/test_capture.py.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import struct
import subprocess

import pytest

from appliance.gateway.bpf import (
    COOKIE_REPLY_FILTER_EXPRESSION,
    DEFAULT_SNAPLEN,
    FILTER_EXPRESSION,
    PORT_INSTRUCTIONS,
    Instruction,
    cookie_reply_filter,
    initiation_filter,
    pack,
)
from appliance.gateway.capture import DROP_REASONS, Datagram, FrameError, parse_frame

# --- tcpdump compiles the same program ----------------------------------------------

ROW = re.compile(r"\{\s*(0x[0-9a-f]+),\s*(\d+),\s*(\d+),\s*(0x[0-9a-f]+)\s*\}")


def tcpdump_compile(port: int, snaplen: int) -> list[Instruction]:
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is needed (Debian package tcpdump; ./run setup installs it)"
    out = subprocess.run(
        [tcpdump, "-dd", "-y", "EN10MB", "-s", str(snaplen), FILTER_EXPRESSION.format(port=port)],
        capture_output=True, text=True, check=True, timeout=30).stdout
    rows = [Instruction(*(int(v, 0) for v in m.groups())) for m in ROW.finditer(out)]
    assert len(rows) == len(out.strip().splitlines())
    return rows


@pytest.mark.parametrize("port,snaplen", [(51820, DEFAULT_SNAPLEN), (1, 256), (4242, 1500),
                                          (65535, 96), (51821, 262144)])
def test_embedded_program_is_what_tcpdump_compiles(port, snaplen):
    assert initiation_filter(port, snaplen) == tcpdump_compile(port, snaplen)


def test_program_shape():
    prog = initiation_filter(4242)
    assert len(prog) == 20
    assert [prog[i].k for i in PORT_INSTRUCTIONS] == [4242, 4242]
    assert len(pack(prog)) == 8 * len(prog)
    assert pack(prog)[:8] == struct.pack("=HBBI", 0x28, 0, 0, 12)
    for bad in ({"port": 0}, {"port": 65536}, {"snaplen": 0}):
        with pytest.raises(ValueError):
            initiation_filter(**bad)


# --- a classic BPF interpreter -------------------------------------------------------

def run_bpf(program: list[Instruction], pkt: bytes) -> int:
    """Return value of the filter for a frame: bytes to keep, 0 to drop."""
    a = x = 0
    pc = 0
    sizes = {0x00: 4, 0x08: 2, 0x10: 1}

    def load(off: int, size: int) -> int | None:
        if off < 0 or off + size > len(pkt):
            return None
        return int.from_bytes(pkt[off:off + size], "big")

    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls, mode = code & 0x07, code & 0xE0
        if cls == 0x00:  # LD
            size = sizes[code & 0x18]
            if mode == 0x00:
                a = k
            elif mode in (0x20, 0x40):  # ABS, IND
                v = load(k + (x if mode == 0x40 else 0), size)
                if v is None:
                    return 0
                a = v
            elif mode == 0x80:
                a = len(pkt)
            else:
                raise NotImplementedError(hex(code))
        elif cls == 0x01:  # LDX
            if mode == 0x00:
                x = k
            elif mode == 0xA0:  # MSH: 4 * (P[k] & 0xf)
                v = load(k, 1)
                if v is None:
                    return 0
                x = 4 * (v & 0x0F)
            else:
                raise NotImplementedError(hex(code))
        elif cls == 0x05:  # JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
                continue
            cond = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if cond else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:
            raise NotImplementedError(hex(code))


# --- crafted frames ------------------------------------------------------------------

MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
INITIATION = b"\x01\x00\x00\x00" + bytes(144)
TRANSPORT = b"\x04\x00\x00\x00" + bytes(60)


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(payload: bytes, *, proto: int = 17, options: bytes = b"", frag: int = 0,
         src: str = "192.0.2.2", dst: str = "192.0.2.1") -> bytes:
    ihl = (20 + len(options)) // 4
    return (struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1,
                        frag, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
            + options + payload)


def ipv6(payload: bytes, *, nh: int = 17, src: str = "2001:db8::2",
         dst: str = "2001:db8::1") -> bytes:
    return (struct.pack("!IHBB", 0x60000000, len(payload), nh, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


def eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return MAC + tag + struct.pack("!H", ethertype) + payload


V4 = eth(0x0800, ipv4(udp(40000, 51820, INITIATION)))
V6 = eth(0x86DD, ipv6(udp(40001, 51820, INITIATION)))

FRAMES = {
    # name: (frame, passes the filter for port 51820)
    "ipv4 initiation": (V4, True),
    "ipv6 initiation": (V6, True),
    "ipv4 with options": (eth(0x0800, ipv4(udp(1, 51820, INITIATION), options=bytes(8))), True),
    "ipv4 transport": (eth(0x0800, ipv4(udp(40000, 51820, TRANSPORT))), False),
    "ipv6 transport": (eth(0x86DD, ipv6(udp(40001, 51820, TRANSPORT))), False),
    "ipv4 response": (eth(0x0800, ipv4(udp(40000, 51820, b"\x02" + bytes(91)))), False),
    "ipv4 other port": (eth(0x0800, ipv4(udp(40000, 51821, INITIATION))), False),
    "ipv6 other port": (eth(0x86DD, ipv6(udp(40000, 4242, INITIATION))), False),
    "ipv4 source port 51820": (eth(0x0800, ipv4(udp(51820, 40000, INITIATION))), False),
    "ipv4 tcp": (eth(0x0800, ipv4(udp(40000, 51820, INITIATION), proto=6)), False),
    "ipv6 hop-by-hop": (eth(0x86DD, ipv6(bytes([17, 0]) + bytes(6)
                                         + udp(1, 51820, INITIATION), nh=0)), False),
    "ipv4 later fragment": (eth(0x0800, ipv4(udp(1, 51820, INITIATION), frag=0x0010)), False),
    "arp": (eth(0x0806, bytes(28)), False),
    "vlan tag left in data": (eth(0x0800, ipv4(udp(1, 51820, INITIATION)), vlan=100), False),
    "runt": (MAC, False),
    "empty": (b"", False),
    "ipv4 cut before udp": (V4[:40], False),
}


@pytest.mark.parametrize("name", FRAMES)
def test_filter_on_crafted_frames(name):
    frame, passes = FRAMES[name]
    prog = initiation_filter(51820, DEFAULT_SNAPLEN)
    assert run_bpf(prog, frame) == (DEFAULT_SNAPLEN if passes else 0)
    if passes:
        # The same frame is dropped by a program for another port.
        assert run_bpf(initiation_filter(51821), frame) == 0


@pytest.mark.parametrize("name", [n for n, (_, passes) in FRAMES.items() if passes])
def test_parser_reads_what_the_filter_passes(name):
    frame, _ = FRAMES[name]
    d = parse_frame(frame[:DEFAULT_SNAPLEN], "eth0", 51820)
    assert d.payload == INITIATION and d.dst_port == 51820 and d.ifname == "eth0"


def test_parse_fields():
    d = parse_frame(V4, "veth0", 51820)
    assert d == Datagram("192.0.2.2", 40000, INITIATION, "veth0", "192.0.2.1", 51820)
    assert d.endpoint == "192.0.2.2:40000"
    d = parse_frame(V6, "veth0")
    assert (d.src_ip, d.src_port, d.dst_ip) == ("2001:db8::2", 40001, "2001:db8::1")
    assert d.endpoint == "[2001:db8::2]:40001"
    # A tag that the kernel did leave in the data is skipped by the parser.
    tagged = eth(0x86DD, ipv6(udp(7, 51820, INITIATION)), vlan=5)
    assert parse_frame(tagged).src_port == 7
    # Ethernet padding after a short datagram is not payload.
    assert parse_frame(eth(0x0800, ipv4(udp(7, 51820, b"\x01"))) + bytes(20)).payload == b"\x01"


def test_a_long_payload_stays_long_after_the_snap_length():
    for ip in (ipv4, ipv6):
        frame = eth(0x0800 if ip is ipv4 else 0x86DD, ip(udp(9, 51820, b"\x01" + bytes(173))))
        assert run_bpf(initiation_filter(), frame) == DEFAULT_SNAPLEN
        assert len(parse_frame(frame[:DEFAULT_SNAPLEN]).payload) > 148


MALFORMED = {
    "ethernet": [b"", MAC, eth(0x8100, b"")[:15]],
    "ethertype": [eth(0x0806, bytes(28))],
    "ip_header": [eth(0x0800, bytes(10)), eth(0x0800, b"\x65" + V4[15:]),
                  eth(0x0800, b"\x44" + V4[15:]), eth(0x86DD, b"\x40" + bytes(60)),
                  eth(0x0800, ipv4(b"", options=bytes(40)))[:40]],
    "protocol": [eth(0x0800, ipv4(udp(1, 51820, INITIATION), proto=6)),
                 eth(0x86DD, ipv6(bytes(8) + udp(1, 51820, INITIATION), nh=0))],
    "fragment": [eth(0x0800, ipv4(udp(1, 51820, INITIATION), frag=0x2000)),
                 eth(0x0800, ipv4(udp(1, 51820, INITIATION), frag=0x0001))],
    "udp_header": [V4[:38], V6[:60]],
    "udp_length": [eth(0x0800, ipv4(struct.pack("!HHHH", 1, 51820, 4, 0))),
                   eth(0x0800, ipv4(struct.pack("!HHHH", 1, 51820, 400, 0) + INITIATION))],
    "port": [eth(0x0800, ipv4(udp(40000, 51821, INITIATION)))],
}


def test_malformed_frames_raise_their_reason():
    assert set(MALFORMED) | {"pkttype"} == set(DROP_REASONS)
    for reason, frames in MALFORMED.items():
        for frame in frames:
            with pytest.raises(FrameError) as info:
                parse_frame(frame, "x", 51820)
            assert info.value.reason == reason, (reason, frame.hex())


def test_parser_survives_every_truncation_and_junk():
    rng = random.Random(1)
    for frame in (V4, V6):
        for cut in range(len(frame)):
            try:
                parse_frame(frame[:cut], "x", 51820)
            except FrameError as e:
                assert e.reason in DROP_REASONS
    for _ in range(2000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        with pytest.raises(FrameError):
            parse_frame(MAC + rng.choice([b"\x08\x00", b"\x86\xdd"]) + junk, "x", 51820)


# --- the cookie-reply program (outgoing type-3 messages from our port) -----------------

def tcpdump_compile_cookie_replies(port: int, snaplen: int) -> list[Instruction]:
    out = subprocess.run(
        [shutil.which("tcpdump") or "tcpdump", "-dd", "-y", "EN10MB", "-s", str(snaplen),
         COOKIE_REPLY_FILTER_EXPRESSION.format(port=port)],
        capture_output=True, text=True, check=True, timeout=30).stdout
    return [Instruction(*(int(v, 0) for v in m.groups())) for m in ROW.finditer(out)]


@pytest.mark.parametrize("port,snaplen", [(51820, DEFAULT_SNAPLEN), (4242, 1500), (65535, 96)])
def test_embedded_cookie_reply_program_is_what_tcpdump_compiles(port, snaplen):
    assert cookie_reply_filter(port, snaplen) == tcpdump_compile_cookie_replies(port, snaplen)


COOKIE_REPLY = b"\x03\x00\x00\x00" + bytes(60)
COOKIE_FRAMES = {
    "ipv4 cookie reply": (eth(0x0800, ipv4(udp(51820, 40000, COOKIE_REPLY))), True),
    "ipv6 cookie reply": (eth(0x86DD, ipv6(udp(51820, 40000, COOKIE_REPLY))), True),
    "ipv4 with options": (eth(0x0800, ipv4(udp(51820, 1, COOKIE_REPLY), options=bytes(8))),
                          True),
    "to our port, not from it": (eth(0x0800, ipv4(udp(40000, 51820, COOKIE_REPLY))), False),
    "ipv6 from another port": (eth(0x86DD, ipv6(udp(51821, 40000, COOKIE_REPLY))), False),
    "ipv4 response": (eth(0x0800, ipv4(udp(51820, 40000, b"\x02" + bytes(91)))), False),
    "ipv4 initiation": (eth(0x0800, ipv4(udp(51820, 40000, INITIATION))), False),
    "ipv4 type 3, 65 bytes": (eth(0x0800, ipv4(udp(51820, 40000, COOKIE_REPLY + b"x"))),
                              False),
    "ipv6 type 3, 63 bytes": (eth(0x86DD, ipv6(udp(51820, 40000, COOKIE_REPLY[:63]))), False),
    "ipv4 later fragment": (eth(0x0800, ipv4(udp(51820, 1, COOKIE_REPLY), frag=0x0010)),
                            False),
}


@pytest.mark.parametrize("name", COOKIE_FRAMES)
def test_cookie_reply_filter_on_crafted_frames(name):
    frame, passes = COOKIE_FRAMES[name]
    assert (run_bpf(cookie_reply_filter(51820), frame) > 0) == passes
