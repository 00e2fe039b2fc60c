"""The classic BPF program that lets only WireGuard handshake initiations through.

Attached to the capture socket (SO_ATTACH_FILTER) so the kernel drops everything
else -- above all the bulk of type-4 transport packets -- before it is copied to
user space. The program was compiled by tcpdump, not written by hand:

    tcpdump -dd -y EN10MB '(ip and udp dst port 51820 and udp[8] = 1) or
        (ip6 and ip6[6] = 17 and ip6[42:2] = 51820 and ip6[48] = 1)'

(tcpdump 4.99.3 / libpcap 1.10.3). It expects an Ethernet header. tcpdump's udp[]
cannot index past an IPv6 header, hence the fixed ip6[] offsets: IPv6 packets
with extension headers are not matched (WireGuard senders do not add any). IPv4
fragments other than the first are not matched either. Compiling the same
expression for other ports changes only the two instructions in
PORT_INSTRUCTIONS, and a different snap length (-s) only the accept return in
ACCEPT_INSTRUCTIONS; tests/unit/test_bpf.py recompiles with tcpdump and compares.

802.1Q: the Linux receive path moves a VLAN tag out of the frame into packet
metadata (skb_vlan_untag, core code, with or without the 8021q module) before
packet sockets see it, so a tagged frame arriving on the parent interface matches
this program as if untagged, and a VLAN sub-interface sees untagged frames anyway.
A 'vlan and ...' program would only add instructions that never match. The
inner tag of a double-tagged (QinQ) frame stays in the data: not matched.
tests/lab/test_capture.py writes tagged frames onto a veth to show both.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

WIREGUARD_PORT = 51820

FILTER_EXPRESSION = (
    "(ip and udp dst port {port} and udp[8] = 1) or "
    "(ip6 and ip6[6] = 17 and ip6[42:2] = {port} and ip6[48] = 1)"
)

# Bytes of a frame the capture keeps: Ethernet (14) + IPv4 with the largest header
# (60) + UDP (8) + MESSAGE_INITIATION_SIZE (148) = 230, IPv6 needs 210. A payload
# longer than 148 bytes still shows more than 148, so "long" stays detectable.
DEFAULT_SNAPLEN = 256


class Instruction(NamedTuple):
    """One struct sock_filter: opcode, jump if true, jump if false, constant."""

    code: int
    jt: int
    jf: int
    k: int


# tcpdump -dd output for port 51820 and the default snap length, with tcpdump -d
# alongside for reading.
_COMPILED_51820 = (
    (0x28, 0, 0, 0x0000000c),  # ldh [12]
    (0x15, 0, 9, 0x00000800),  # jeq #0x800 jt 2 jf 11
    (0x30, 0, 0, 0x00000017),  # ldb [23]
    (0x15, 0, 15, 0x00000011),  # jeq #0x11 jt 4 jf 19
    (0x28, 0, 0, 0x00000014),  # ldh [20]
    (0x45, 13, 0, 0x00001fff),  # jset #0x1fff jt 19 jf 6
    (0xb1, 0, 0, 0x0000000e),  # ldxb 4*([14]&0xf)
    (0x48, 0, 0, 0x00000010),  # ldh [x + 16]
    (0x15, 0, 10, 0x0000ca6c),  # jeq #0xca6c jt 9 jf 19
    (0x50, 0, 0, 0x00000016),  # ldb [x + 22]
    (0x15, 7, 8, 0x00000001),  # jeq #0x1 jt 18 jf 19
    (0x15, 0, 7, 0x000086dd),  # jeq #0x86dd jt 12 jf 19
    (0x30, 0, 0, 0x00000014),  # ldb [20]
    (0x15, 0, 5, 0x00000011),  # jeq #0x11 jt 14 jf 19
    (0x28, 0, 0, 0x00000038),  # ldh [56]
    (0x15, 0, 3, 0x0000ca6c),  # jeq #0xca6c jt 16 jf 19
    (0x30, 0, 0, 0x0000003e),  # ldb [62]
    (0x15, 0, 1, 0x00000001),  # jeq #0x1 jt 18 jf 19
    (0x6, 0, 0, 0x00040000),  # ret #262144
    (0x6, 0, 0, 0x00000000),  # ret #0
)
_COMPILED_PORT = 51820
_COMPILED_SNAPLEN = 262144

# Found by compiling for two ports (and two snap lengths) and diffing.
PORT_INSTRUCTIONS = (8, 15)  # jeq #port, IPv4 and IPv6 branch
ACCEPT_INSTRUCTIONS = (18,)  # ret #snaplen

BPF_MAXINSNS = 4096
_SOCK_FILTER = struct.Struct("=HBBI")


# The gateway's own cookie replies (whitepaper 5.4.7), as its data plane sends them:
# UDP from the WireGuard port, message type 3, UDP length 8 + 64. Attached to a
# second packet socket that sees only outgoing frames (capture.py), so the daemon
# learns the cookies wireguard-go hands out (cookie_learn.py). Same caveats as above
# (fixed IPv6 offsets, first fragments only); ip6[44:2] is the UDP length field.
COOKIE_REPLY_FILTER_EXPRESSION = (
    "(ip and udp src port {port} and udp[8] = 3 and udp[4:2] = 72) or "
    "(ip6 and ip6[6] = 17 and ip6[40:2] = {port} and ip6[48] = 3 and ip6[44:2] = 72)"
)

_COOKIE_REPLY_COMPILED_51820 = (
    (0x28, 0, 0, 0x0000000c),  # ldh [12]
    (0x15, 0, 11, 0x00000800),  # jeq #0x800 jt 2 jf 13
    (0x30, 0, 0, 0x00000017),  # ldb [23]
    (0x15, 0, 19, 0x00000011),  # jeq #0x11 jt 4 jf 23
    (0x28, 0, 0, 0x00000014),  # ldh [20]
    (0x45, 17, 0, 0x00001fff),  # jset #0x1fff jt 23 jf 6
    (0xb1, 0, 0, 0x0000000e),  # ldxb 4*([14]&0xf)
    (0x48, 0, 0, 0x0000000e),  # ldh [x + 14]
    (0x15, 0, 14, 0x0000ca6c),  # jeq #0xca6c jt 9 jf 23
    (0x50, 0, 0, 0x00000016),  # ldb [x + 22]
    (0x15, 0, 12, 0x00000003),  # jeq #0x3 jt 11 jf 23
    (0x48, 0, 0, 0x00000012),  # ldh [x + 18]
    (0x15, 9, 10, 0x00000048),  # jeq #0x48 jt 22 jf 23
    (0x15, 0, 9, 0x000086dd),  # jeq #0x86dd jt 14 jf 23
    (0x30, 0, 0, 0x00000014),  # ldb [20]
    (0x15, 0, 7, 0x00000011),  # jeq #0x11 jt 16 jf 23
    (0x28, 0, 0, 0x00000036),  # ldh [54]
    (0x15, 0, 5, 0x0000ca6c),  # jeq #0xca6c jt 18 jf 23
    (0x30, 0, 0, 0x0000003e),  # ldb [62]
    (0x15, 0, 3, 0x00000003),  # jeq #0x3 jt 20 jf 23
    (0x28, 0, 0, 0x0000003a),  # ldh [58]
    (0x15, 0, 1, 0x00000048),  # jeq #0x48 jt 22 jf 23
    (0x6, 0, 0, 0x00040000),  # ret #262144
    (0x6, 0, 0, 0x00000000),  # ret #0
)
COOKIE_REPLY_PORT_INSTRUCTIONS = (8, 17)  # jeq #port, IPv4 and IPv6 branch
COOKIE_REPLY_ACCEPT_INSTRUCTIONS = (22,)  # ret #snaplen


def _check_template(rows: tuple, ports: tuple[int, ...], accepts: tuple[int, ...]) -> None:
    # Guards against an edit of a table that moves the patched instructions.
    ok = (all(rows[i][3] == _COMPILED_PORT for i in ports)
          and all(rows[i] == (0x06, 0, 0, _COMPILED_SNAPLEN) for i in accepts))
    if not ok:
        raise RuntimeError("BPF template does not carry the port/snap length where expected")


_check_template(_COMPILED_51820, PORT_INSTRUCTIONS, ACCEPT_INSTRUCTIONS)
_check_template(_COOKIE_REPLY_COMPILED_51820, COOKIE_REPLY_PORT_INSTRUCTIONS,
                COOKIE_REPLY_ACCEPT_INSTRUCTIONS)


def _patched(rows: tuple, ports: tuple[int, ...], accepts: tuple[int, ...], port: int,
             snaplen: int) -> list[Instruction]:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if not 0 < snaplen <= _COMPILED_SNAPLEN:
        raise ValueError(f"snap length {snaplen} out of range")
    program = [Instruction(*row) for row in rows]
    for i in ports:
        program[i] = program[i]._replace(k=port)
    for i in accepts:
        program[i] = program[i]._replace(k=snaplen)
    return program


def initiation_filter(port: int = WIREGUARD_PORT,
                      snaplen: int = DEFAULT_SNAPLEN) -> list[Instruction]:
    """The program for UDP destination `port`, accepting `snaplen` bytes of a frame."""
    return _patched(_COMPILED_51820, PORT_INSTRUCTIONS, ACCEPT_INSTRUCTIONS, port, snaplen)


def cookie_reply_filter(port: int = WIREGUARD_PORT,
                        snaplen: int = DEFAULT_SNAPLEN) -> list[Instruction]:
    """The program for 64-byte type-3 messages from UDP source `port`."""
    return _patched(_COOKIE_REPLY_COMPILED_51820, COOKIE_REPLY_PORT_INSTRUCTIONS,
                    COOKIE_REPLY_ACCEPT_INSTRUCTIONS, port, snaplen)


def pack(program: list[Instruction]) -> bytes:
    """The program as an array of struct sock_filter, for struct sock_fprog."""
    if not 0 < len(program) <= BPF_MAXINSNS:
        raise ValueError("program length out of range")
    return b"".join(_SOCK_FILTER.pack(*ins) for ins in program)
