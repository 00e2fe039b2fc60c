"""Watch underlay interfaces for WireGuard handshake initiations.

An AF_PACKET socket per interface, with the classic BPF program from bpf.py
attached, sees a copy of each initiation sent to the WireGuard port; the kernel
(or wireguard-go) still receives the original, so the watcher only observes and
never answers. The filter drops everything else in the kernel, and the snap
length trims what is copied to what the parser needs.

Sockets are non-blocking; fileno() is an epoll descriptor that becomes readable
when any interface has a frame, so the daemon can put the capture in its own
selector or call recv(timeout). Frames that fail to parse are counted by reason
and dropped.

Why a packet socket per named interface rather than one for all: a socket bound
to no interface also sees interfaces without an Ethernet header (the WireGuard
interface itself, tun devices), where the filter's fixed offsets mean nothing.

With cookie_replies, each interface gets a second packet socket that sees only the
cookie replies the host itself sends from the WireGuard port (PACKET_OUTGOING
frames, bpf.cookie_reply_filter): the data plane's own cookies, which the daemon
learns so that it and the data plane do not hand a client two competing ones
(cookie_learn.py). Its datagrams come out of recv with outgoing=True.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import select
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from appliance.gateway.bpf import (
    DEFAULT_SNAPLEN,
    WIREGUARD_PORT,
    cookie_reply_filter,
    initiation_filter,
    pack,
)

# Linux ABI numbers missing from Python's socket module (linux/if_packet.h,
# asm-generic/socket.h, linux/if_ether.h, linux/if_arp.h, linux/sockios.h).
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+
PACKET_HOST = getattr(socket, "PACKET_HOST", 0)
PACKET_OUTGOING = getattr(socket, "PACKET_OUTGOING", 4)
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772  # loopback frames carry a (zeroed) Ethernet header
SIOCGIFHWADDR = 0x8927
SIOCGSTAMP = 0x8906  # the receive time of the last frame read (struct timeval)
IPPROTO_UDP = 17

ETH_HLEN = 14
VLAN_HLEN = 4
IPV4_MIN_HLEN = 20
IPV6_HLEN = 40
UDP_HLEN = 8

# The kernel queue in front of the capture thread (the kernel doubles it for its
# bookkeeping). A herd's initiations arrive faster than they are verified (~1,000/s
# on a loaded 2-core machine against 10,000 in one second, bench/herd.py), and each
# queued frame costs ~1 KB of skb truesize: at the former 1 MB, ~7,000 of 10,000
# first initiations were dropped and those clients came back only with their
# retry 5 s later. 8 MB holds the whole herd. Raising it above
# net.core.rmem_max needs SO_RCVBUFFORCE (CAP_NET_ADMIN, which the gateway has);
# without it the kernel caps the request at rmem_max.
DEFAULT_RCVBUF = 8 << 20
# The cookie-reply socket's queue: the data plane sends at most one reply per
# initiation it reads, and a reply lost here only costs the daemon one lesson.
COOKIE_REPLY_RCVBUF = 1 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# Every reason a frame can be dropped for, as counted in Capture.malformed.
DROP_REASONS = (
    "ethernet",  # shorter than an Ethernet header (or its VLAN tags)
    "ethertype",  # neither IPv4 nor IPv6
    "ip_header",  # bad version, header length, or truncated IP header
    "protocol",  # not UDP (IPv6: any extension header)
    "fragment",  # an IPv4 fragment
    "udp_header",  # truncated UDP header
    "udp_length",  # UDP length inconsistent with the IP length
    "port",  # not our destination port
    "pkttype",  # not addressed to this host (promiscuous copy) or our own output
)


class FrameError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"dropped frame: {reason}")
        self.reason = reason


class CaptureError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Datagram:
    """A UDP datagram seen on an underlay interface."""

    src_ip: str
    src_port: int
    payload: bytes  # cut at the snap length: longer than 148 bytes means "long"
    ifname: str
    dst_ip: str = ""
    dst_port: int = 0
    outgoing: bool = False  # sent by this host (a cookie reply), not received

    @property
    def endpoint(self) -> str:
        """host:port as WireGuard's endpoint setting spells it."""
        if ":" in self.src_ip:
            return f"[{self.src_ip}]:{self.src_port}"
        return f"{self.src_ip}:{self.src_port}"


def parse_frame(frame: bytes, ifname: str = "", port: int | None = None) -> Datagram:
    """An Ethernet frame (possibly cut at the snap length) -> the UDP datagram in it.

    Raises FrameError with a reason from DROP_REASONS. 802.1Q/802.1ad tags left in
    the data are skipped (Linux normally strips the outer one before we see it).
    """
    n = len(frame)
    if n < ETH_HLEN:
        raise FrameError("ethernet")
    off = 12
    (ethertype,) = struct.unpack_from("!H", frame, off)
    for _ in range(2):
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        off += VLAN_HLEN
        if n < off + 2:
            raise FrameError("ethernet")
        (ethertype,) = struct.unpack_from("!H", frame, off)
    ip = off + 2

    if ethertype == ETH_P_IP:
        if n < ip + IPV4_MIN_HLEN or frame[ip] >> 4 != 4:
            raise FrameError("ip_header")
        ihl = (frame[ip] & 0x0F) * 4
        if ihl < IPV4_MIN_HLEN or n < ip + ihl:
            raise FrameError("ip_header")
        total_length, frag = struct.unpack_from("!H2xH", frame, ip + 2)
        if total_length < ihl:
            raise FrameError("ip_header")
        if frame[ip + 9] != IPPROTO_UDP:
            raise FrameError("protocol")
        if frag & 0x3FFF:  # more-fragments flag or a fragment offset
            raise FrameError("fragment")
        src = socket.inet_ntop(socket.AF_INET, frame[ip + 12:ip + 16])
        dst = socket.inet_ntop(socket.AF_INET, frame[ip + 16:ip + 20])
        udp = ip + ihl
        ip_payload = total_length - ihl
    elif ethertype == ETH_P_IPV6:
        if n < ip + IPV6_HLEN or frame[ip] >> 4 != 6:
            raise FrameError("ip_header")
        (ip_payload,) = struct.unpack_from("!H", frame, ip + 4)
        if frame[ip + 6] != IPPROTO_UDP:
            raise FrameError("protocol")
        src = socket.inet_ntop(socket.AF_INET6, frame[ip + 8:ip + 24])
        dst = socket.inet_ntop(socket.AF_INET6, frame[ip + 24:ip + 40])
        udp = ip + IPV6_HLEN
    else:
        raise FrameError("ethertype")

    if n < udp + UDP_HLEN:
        raise FrameError("udp_header")
    sport, dport, ulen = struct.unpack_from("!HHH", frame, udp)
    if ulen < UDP_HLEN or ulen > ip_payload:
        raise FrameError("udp_length")
    if port is not None and dport != port:
        raise FrameError("port")
    payload = bytes(frame[udp + UDP_HLEN:udp + ulen])
    return Datagram(src, sport, payload, ifname, dst, dport)


def _hardware_type(sock: socket.socket, ifname: str) -> int:
    ifreq = struct.pack("16s16x", ifname.encode())
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, ifreq)
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise CaptureError(errno.ENODEV, f"no such interface: {ifname}") from None
        raise
    (family,) = struct.unpack_from("H", res, 16)
    return family


def open_packet_socket(ifname: str, port: int = WIREGUARD_PORT,
                       snaplen: int = DEFAULT_SNAPLEN,
                       rcvbuf: int = DEFAULT_RCVBUF, *,
                       cookie_replies: bool = False) -> socket.socket:
    """A non-blocking packet socket on one Ethernet interface, filter attached: the
    initiation filter, or with cookie_replies the filter for this host's own cookie
    replies (which keeps outgoing frames).

    Created with protocol 0, which receives nothing, and bound only after the
    filter is in place, so no unfiltered frame is ever queued.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        hwtype = _hardware_type(sock, ifname)
        if hwtype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
            raise CaptureError(f"{ifname} has no Ethernet header (ARPHRD {hwtype}); "
                               "capture on the underlay interface instead")
        program = (cookie_reply_filter if cookie_replies else initiation_filter)(port, snaplen)
        code = ctypes.create_string_buffer(pack(program))
        fprog = struct.pack("HP", len(code.raw) // 8, ctypes.addressof(code))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        if not cookie_replies:
            # Our own sends (wireguard-go's responses leave from the same port) are of
            # no interest; on kernels without the option the pkttype check drops them.
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # The first SIOCGSTAMP turns receive stamps on (and fails: none yet); from then
        # on it gives the kernel's receive time of the frame read last (capture lag).
        # Stamps are then taken for every packet the host receives, a clock read each.
        # The kernel switches them on from a work item, moments later: a frame that
        # arrives before reads as not waiting at all, which only makes lag err low.
        with contextlib.suppress(OSError):
            fcntl.ioctl(sock, SIOCGSTAMP, bytes(16))
        sock.bind((ifname, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _age_of_last_frame(sock: socket.socket) -> float:
    """Seconds since the kernel received the frame read last from `sock` (one ioctl,
    ~5 us); 0.0 if the kernel keeps no stamp."""
    try:
        sec, usec = struct.unpack("qq", fcntl.ioctl(sock, SIOCGSTAMP, bytes(16)))
    except OSError:
        return 0.0
    return max(0.0, time.time() - (sec + usec / 1e6))


class Capture:
    """Initiation-candidate datagrams from one or more underlay interfaces."""

    def __init__(self, interfaces: Sequence[str], port: int = WIREGUARD_PORT, *,
                 snaplen: int = DEFAULT_SNAPLEN, rcvbuf: int = DEFAULT_RCVBUF,
                 cookie_replies: bool = False) -> None:
        if not interfaces:
            raise ValueError("at least one interface")
        self.port = port
        self.snaplen = snaplen
        self.received = 0  # frames read from the kernel
        self.malformed: Counter[str] = Counter()
        # How long the newest frame of the last recv waited in the kernel's buffer,
        # seconds (0.0: it read nothing). Growing: the reader no longer keeps up,
        # and a real client's initiation waits behind the whole backlog (load.py).
        self.lag = 0.0
        # fd -> (socket, interface, whether it carries our own outgoing cookie replies)
        self._socks: dict[int, tuple[socket.socket, str, bool]] = {}
        self._epoll = select.epoll()
        try:
            for ifname in dict.fromkeys(interfaces):
                self._add(open_packet_socket(ifname, port, snaplen, rcvbuf), ifname, False)
                if cookie_replies:
                    self._add(open_packet_socket(ifname, port, snaplen, COOKIE_REPLY_RCVBUF,
                                                 cookie_replies=True), ifname, True)
        except BaseException:
            self.close()
            raise

    def _add(self, sock: socket.socket, ifname: str, outgoing: bool) -> None:
        self._socks[sock.fileno()] = (sock, ifname, outgoing)
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    @property
    def interfaces(self) -> list[str]:
        return [name for _, name, outgoing in self._socks.values() if not outgoing]

    def recv(self, timeout: float | None = None, max_frames: int = 256) -> list[Datagram]:
        """Wait up to `timeout` seconds (None: forever) for frames, then read them."""
        events = self._epoll.poll(-1 if timeout is None else timeout)
        out: list[Datagram] = []
        self.lag = 0.0
        for fd, _ in events:
            sock, ifname, outgoing = self._socks[fd]
            if outgoing:
                self._drain_replies(sock, ifname, max_frames, out)
            elif self._drain(sock, ifname, max_frames, out):
                self.lag = max(self.lag, _age_of_last_frame(sock))
        return out

    def _frames(self, sock: socket.socket, max_frames: int) -> Iterator[tuple[bytes, int]]:
        """(frame, packet type) for up to max_frames frames queued on `sock` now."""
        for _ in range(max_frames):
            try:
                frame, addr = sock.recvfrom(self.snaplen)
            except (BlockingIOError, InterruptedError):
                return
            yield frame, addr[2]

    def _drain(self, sock: socket.socket, ifname: str, max_frames: int,
               out: list[Datagram]) -> int:
        """Read up to max_frames frames into `out`; how many were read."""
        n = 0
        for frame, pkttype in self._frames(sock, max_frames):
            n += 1
            self.received += 1
            if pkttype != PACKET_HOST:
                self.malformed["pkttype"] += 1
                continue
            try:
                out.append(parse_frame(frame, ifname, self.port))
            except FrameError as e:
                self.malformed[e.reason] += 1
        return n

    def _drain_replies(self, sock: socket.socket, ifname: str, max_frames: int,
                       out: list[Datagram]) -> None:
        """Our own outgoing cookie replies: not counted as received nor as malformed
        (the initiation counters stay what they were)."""
        for frame, pkttype in self._frames(sock, max_frames):
            if pkttype != PACKET_OUTGOING:
                continue
            try:
                d = parse_frame(frame, ifname)
            except FrameError:
                continue
            if d.src_port == self.port:
                out.append(dataclasses.replace(d, outgoing=True))

    def kernel_stats(self) -> dict[str, tuple[int, int]]:
        """Per interface (frames passed by the filter, frames dropped) since the last call.

        The kernel resets its counters on each read.
        """
        stats = {}
        for sock, ifname, outgoing in self._socks.values():
            if outgoing:
                continue
            packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            stats[ifname] = (packets, drops)
        return stats

    def close(self) -> None:
        for sock, _, _ in self._socks.values():
            sock.close()
        self._socks.clear()
        self._epoll.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Iterable[str] | None = None) -> int:
    """Print each captured datagram as a JSON line: a diagnostic for operators and tests."""
    ap = argparse.ArgumentParser(prog="python -m appliance.gateway.capture",
                                 description="Show WireGuard handshake initiations arriving "
                                             "on underlay interfaces (needs root).")
    ap.add_argument("-i", "--interface", action="append", required=True)
    ap.add_argument("--port", type=int, default=WIREGUARD_PORT)
    ap.add_argument("--count", type=int, default=0, help="stop after N datagrams (0: never)")
    ap.add_argument("--timeout", type=float, default=None, help="stop after N idle seconds")
    args = ap.parse_args(list(argv) if argv is not None else None)
    seen = 0
    with Capture(args.interface, args.port) as cap:
        print(json.dumps({"listening": cap.interfaces, "port": args.port}), flush=True)
        last_received, idle_since = 0, time.monotonic()
        while not args.count or seen < args.count:
            for d in cap.recv(0.2):
                seen += 1
                print(json.dumps({"ifname": d.ifname, "src": d.src_ip, "sport": d.src_port,
                                  "payload": d.payload.hex()}), flush=True)
            now = time.monotonic()
            if cap.received != last_received:
                last_received, idle_since = cap.received, now
            elif args.timeout is not None and now - idle_since > args.timeout:
                break
        print(json.dumps({"received": cap.received, "malformed": dict(cap.malformed)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
