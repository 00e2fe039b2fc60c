"""Hand a captured initiation back to the local data plane, as the client sent it.

Why: the client's first initiation reached the gateway before its peer existed,
so the data plane dropped it. Role inversion answers with the gateway's own
handshake, which costs the client a round trip (it must wait, as responder, for
the gateway's first data packet): 3 RTT + install against 2 RTT pre-provisioned.
Re-injection keeps the client the initiator: once the peer is installed, the
captured datagram is delivered again, byte for byte, with the client's address
and port as its source, to the address and port it was sent to. The data plane
answers the client's own handshake: 2 RTT + install (bench/connect.py).

Why the data plane accepts it: a peer just installed has no previous handshake
timestamp (wireguard-go and the kernel both compare the TAI64N timestamp with
the latest one *that peer* accepted, and a fresh peer has none) and no recent
initiation to rate-limit against, so the same bytes that were dropped for want
of a peer are now a valid first initiation. It is re-injected only after the
daemon verified it (mac1, the Noise first leg, the timestamp decrypting) and
found its timestamp newer than any it saw for that key (replay.py): a forged or
replayed initiation never gets here. When the data plane is under load it may
demand a cookie (mac2) instead of answering; that, or any other refusal, shows
as no handshake by the deadline, and the daemon falls back to role inversion.

Why reverse-path filtering does not drop it: the packet is generated locally
(raw socket, header included) and addressed to one of this host's own
addresses, so it is routed through the loopback device and arrives with the
output route it already has. The input route lookup, where rp_filter runs, is
skipped for such packets (IPv4 and IPv6 alike). Checked in the lab with
net.ipv4.conf.{all,lo,<underlay>}.rp_filter=1 (tests/lab/test_reinject.py).
The packet never leaves the host, and the capture (bound to the underlay
interfaces, never lo) does not see it again.

Needs CAP_NET_RAW, like the capture.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable

from appliance.gateway.capture import Datagram
from appliance.gateway.handshake import MAC, MESSAGE_INITIATION_SIZE, OFFSET_MAC2
from appliance.gateway.udp_packet import udp_packet

IPV6_HDRINCL = 36  # linux/in6.h; implied by IPPROTO_RAW, set anyway for older kernels
# How long a "this is one of our addresses" answer is trusted. The check costs a
# socket and a bind (10-30 us, ~8% of a lookup worker's time in a 10,000-client
# herd), and a gateway's clients arrive on one or two addresses; an address
# removed is noticed within this time.
LOCAL_FOR = 1.0


class Reinjector:
    """Raw sockets, one per family, that send whole IP packets as written."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._local_until: dict[tuple[str, int], float] = {}  # (address, scope) -> deadline
        self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError:
            self._v4.close()
            raise
        # Kernels before 4.5 lack the option and imply it for IPPROTO_RAW.
        with contextlib.suppress(OSError):
            self._v6.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)

    def send(self, d: Datagram, cookie: bytes | None = None) -> None:
        """Deliver `d` (a captured datagram) to where it was addressed, from its source.

        `cookie`: the data plane's tau for the client's address (cookie_learn.py):
        the copy's mac2 is made under it, so that a data plane under load answers
        the copy instead of demanding a cookie. The Noise part, which the client
        checks the response against, does not cover the macs.

        Raises OSError if the destination is not an address of this host (the
        capture also sees datagrams this host only forwards; re-injecting one
        would put a packet with the client's source address on the network)
        or if the kernel refuses the send.
        """
        six = ":" in d.dst_ip
        scope = socket.if_nametoindex(d.ifname) if six and d.dst_ip.lower().startswith(
            "fe80:") and d.ifname else 0
        if not self._local(d.dst_ip, scope):
            raise OSError(errno.EADDRNOTAVAIL,
                          f"{d.dst_ip} is not an address of this host: not re-injected")
        payload = d.payload if cookie is None else with_mac2(d.payload, cookie)
        packet = udp_packet(d.src_ip, d.src_port, d.dst_ip, d.dst_port, payload)
        if six:
            self._v6.sendto(packet, (d.dst_ip, 0, 0, scope))
        else:
            self._v4.sendto(packet, (d.dst_ip, 0))

    def _local(self, ip: str, scope: int) -> bool:
        now = self._clock()
        if self._local_until.get((ip, scope), 0.0) > now:
            return True
        if not _is_local(ip, scope):
            self._local_until.pop((ip, scope), None)
            return False
        self._local_until[(ip, scope)] = now + LOCAL_FOR
        return True

    def close(self) -> None:
        self._v4.close()
        self._v6.close()


def with_mac2(initiation: bytes, cookie: bytes) -> bytes:
    """The initiation with msg.mac2 = MAC(cookie, msg up to mac2) (whitepaper 5.4.4);
    anything but a 148-byte initiation is returned as it is."""
    if len(initiation) != MESSAGE_INITIATION_SIZE:
        return initiation
    return initiation[:OFFSET_MAC2] + MAC(cookie, initiation[:OFFSET_MAC2])


def _is_local(ip: str, scope: int = 0) -> bool:
    """Can a socket bind to `ip`? True only for this host's own addresses (10-30 us)."""
    six = ":" in ip
    with socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0, 0, scope) if six else (ip, 0))
        except OSError:
            return False
    return True
