"""Send a UDP datagram from the WireGuard port without owning that port.

The daemon must answer some initiations itself (cookie replies, cookie.py), and
the answer has to come from the address and port the client sent to: NATs and
stateful firewalls on the client's path let back only what matches the flow,
and a client expects its peer at that port. The data plane (kernel WireGuard
or wireguard-go) holds that port, so:

- a UDP socket cannot bind it (EADDRINUSE; wireguard-go sets no SO_REUSEPORT,
  and with it the kernel would hand part of the data plane's traffic to us);
- IP_TRANSPARENT allows binding addresses that are not local, which does not
  help: the address is local, the port is what is taken;
- a raw socket binds no port. The whole packet is written here (udp_packet.py,
  shared with re-injection): source = the gateway's own address the initiation
  was sent to and the WireGuard port, destination = the initiation's source.
  IPPROTO_RAW sockets only send (the kernel never queues received packets on
  them), so nothing piles up unread. Root (CAP_NET_RAW) is needed, as for the
  capture. Checked against a stock wireguard-go client in the lab, which
  takes the cookie and answers with a valid mac2 (tests/lab/test_gateway_flood.py).
"""

from __future__ import annotations

import contextlib
import socket

from appliance.gateway.reinject import IPV6_HDRINCL
from appliance.gateway.udp_packet import udp_packet


class RawUdpSender:
    """Raw sockets (IPv4 and IPv6), opened lazily per family, sending whole packets."""

    def __init__(self) -> None:
        self._socks: dict[int, socket.socket] = {}

    def _sock(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            if family == socket.AF_INET6:  # implied by IPPROTO_RAW on kernels before 4.5
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
            sock.setblocking(False)
            self._socks[family] = sock
        return sock

    def send(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int,
             payload: bytes) -> None:
        """Send payload from src_ip:src_port (a local address) to dst_ip:dst_port.

        Raises OSError (e.g. EAGAIN or ENOBUFS when the socket buffer is full:
        the caller counts it and moves on; a cookie reply is never worth waiting for).
        """
        packet = udp_packet(src_ip, src_port, dst_ip, dst_port, payload)
        if ":" in dst_ip:
            self._sock(socket.AF_INET6).sendto(packet, (dst_ip, 0, 0, 0))
        else:
            self._sock(socket.AF_INET).sendto(packet, (dst_ip, 0))

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
