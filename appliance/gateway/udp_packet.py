"""A UDP datagram as a whole IPv4 or IPv6 packet (headers and checksums): bytes out.

Re-injection (reinject.py) hands a captured initiation back to the local data
plane through a raw socket, with the client's address and port as the source.
The kernel takes such a packet as written, so the headers are built here, with
no I/O, and tests feed this module bytes and check it against tcpdump.
"""

from __future__ import annotations

import ipaddress
import struct

IPPROTO_UDP = 17
IPV4_HLEN = 20
IPV6_HLEN = 40
UDP_HLEN = 8
DEFAULT_TTL = 64
IP_DF = 0x4000  # "don't fragment", as Linux sets it on its own UDP sends
MAX_UDP_PAYLOAD = 0xFFFF - UDP_HLEN


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp(pseudo: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = UDP_HLEN + len(payload)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    csum = internet_checksum(pseudo + header + payload)
    # RFC 768: a computed zero is sent as all ones (zero means "no checksum").
    return struct.pack("!HHHH", sport, dport, length, csum or 0xFFFF) + payload


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes, *,
               ttl: int = DEFAULT_TTL, ident: int = 0) -> bytes:
    """An IPv4 or IPv6 packet (by the addresses' family) carrying one UDP datagram.

    IPv4: DF set, no options, `ident` as the identification (Linux fills in a
    zero one on raw sends). IPv6: traffic class and flow label zero, `ttl` as
    the hop limit. Raises ValueError on mixed families, bad ports or a payload
    too long for one datagram.
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"source {src} and destination {dst} are of different families")
    for name, port in (("source", sport), ("destination", dport)):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} port {port} outside 0..65535")
    if len(payload) > MAX_UDP_PAYLOAD - (IPV4_HLEN if s.version == 4 else 0):
        raise ValueError(f"payload of {len(payload)} bytes does not fit one datagram")
    length = UDP_HLEN + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!xBH", IPPROTO_UDP, length)
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, IPV4_HLEN + length, ident, IP_DF,
                             ttl, IPPROTO_UDP, 0, s.packed, d.packed)
        header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
        return header + _udp(pseudo, sport, dport, payload)
    pseudo = s.packed + d.packed + struct.pack("!I3xB", length, IPPROTO_UDP)
    header = struct.pack("!IHBB16s16s", 6 << 28, length, IPPROTO_UDP, ttl, s.packed, d.packed)
    return header + _udp(pseudo, sport, dport, payload)
