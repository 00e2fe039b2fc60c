"""Helpers for the gateway daemon's end-to-end tests (tests/lab/test_gateway_*.py).

Everything here waits by polling against a deadline: the daemon, wireguard-go
and ping run in other processes, and a fixed sleep is either too short on a
busy machine or wastes time on an idle one.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

from appliance.gateway.capture import Capture, Datagram, FrameError, parse_frame
from appliance.gateway.handshake import Responder
from appliance.keys import decode_key, encode_key
from appliance.secrets import read_secret
from lab import client as lab_client
from lab.addressing import UNDERLAY_IF
from lab.topology import Lab

T = TypeVar("T")

# WireGuard's REKEY_TIMEOUT is 5 s: a first reply before it means the client's
# first initiation was answered (re-injected, or the gateway handshook back)
# rather than its retry. Not a speed bound (bench/connect.py measures speed):
# 2 s failed at 2.48 s on a shared machine at load 6 with nothing wrong.
JIT_CONNECT_LIMIT = 4.5

_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """check()'s first truthy result; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def wait_for_evict_passes_after(lab: Lab, gateway: str, since: float) -> None:
    """Wait until the daemon's view of its device is newer than wall-clock `since`.

    The first eviction pass stamped after `since` may have read the device just
    before it; the pass after that one cannot have."""

    def last_pass() -> float:
        return lab.health(gateway)[1]["last_evict_pass"].get("at", 0.0)

    first = wait_for(lambda: last_pass() > since and last_pass(), 5, "an eviction pass")
    wait_for(lambda: last_pass() > first, 5, "a second eviction pass")


def replies(lab: Lab, name: str) -> list[float]:
    """Unix times of the echo replies in the client's current ping run."""
    text = Path(lab.client(name).ping_log).read_text(errors="replace")
    return [float(m.group(1)) for m in map(_REPLY.match, text.splitlines()) if m]


def first_reply_after_start(lab: Lab, name: str, timeout: float = 10.0) -> float:
    """Seconds from the ping's start to its first reply through the tunnel."""
    c = lab.client(name)
    got = wait_for(lambda: replies(lab, name), timeout, f"{name}'s first ping reply")
    return got[0] - c.ping_started


def key_events(lab: Lab, gateway: str, key: str, *names: str) -> list[dict]:
    return [e for e in lab.events(gateway)
            if e.get("public_key") == key and (not names or e["event"] in names)]


def installed(lab: Lab, gateway: str) -> dict[str, object]:
    """public key -> PeerInfo of what the gateway's device holds now."""
    return {p.public_key: p for p in lab.peers(gateway)}


def quiet_all(lab: Lab) -> None:
    """Stop every client's ping and forget its session, so nothing it queued retries.

    A client whose initiation went unanswered keeps retrying every 5 s for 90 s
    (REKEY_ATTEMPT_TIME); that would leak into the next test's counters.
    """
    for c in lab.state.clients:
        lab.disconnect(c.name)
        lab_client.reset_session(c, lab.gateway(c.gateway))


def send_udp(lab: Lab, host: str, dest: str, port: int, payloads: Iterable[bytes],
             gap: float = 0.0) -> int:
    """Send datagrams from a lab namespace (e.g. a client's) to dest:port; their source port."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET

    def send() -> int:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind(("", 0))
            for p in payloads:
                s.sendto(p, (dest, port))
                if gap:
                    time.sleep(gap)
            return s.getsockname()[1]

    return lab.worker(host).call(send)


def gateway_responder(lab: Lab, gateway: str) -> Responder:
    """A reader for initiations addressed to the gateway (the test holds its key file)."""
    g = lab.gateway(gateway)
    return Responder(decode_key(read_secret(g.private_key_file, what="gateway key")))


class InitiationTap:
    """A second capture in the gateway's namespace, beside the daemon's: records the
    initiations that reach it, e.g. to replay one later. Packet sockets each get a
    copy, so the daemon sees the same packets."""

    def __init__(self, lab: Lab, gateway: str) -> None:
        self.worker = lab.worker(gateway)
        self.capture = self.worker.call(Capture, [UNDERLAY_IF], port=lab.gateway(gateway)
                                        .listen_port)
        self.responder = gateway_responder(lab, gateway)
        self.seen: list[Datagram] = []

    def wait_initiation(self, public_key: str, timeout: float = 10.0) -> Datagram:
        """The first captured initiation whose sender proves `public_key`."""
        def check() -> Datagram | None:
            self.seen += self.worker.call(self.capture.recv, 0.1)
            for d in self.seen:
                try:
                    init = self.responder.consume_initiation(d.payload)
                except ValueError:
                    continue
                if encode_key(init.initiator_static) == public_key:
                    return d
            return None
        return wait_for(check, timeout, f"an initiation from {public_key[:8]}")

    def close(self) -> None:
        self.worker.call(self.capture.close)


class WireTap:
    """Every WireGuard handshake message (types 1-3) crossing a host's underlay, both
    directions, as (direction, message type, datagram): "out" = sent by that host.

    A plain packet socket without the capture's filter (which keeps only incoming
    initiations); it shows which side of a session initiated it: a gateway whose
    data plane answered the client's own initiation sends a type 2, never a type 1.
    """

    def __init__(self, lab: Lab, host: str, port: int = 51820) -> None:
        self.port = port
        self.sock = lab.worker(host).call(self._open)
        self.seen: list[tuple[str, int, Datagram]] = []

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((UNDERLAY_IF, 0))
        s.setblocking(False)
        return s

    def read(self) -> list[tuple[str, int, Datagram]]:
        while True:
            try:
                frame, addr = self.sock.recvfrom(256)
            except BlockingIOError:
                return self.seen
            try:
                d = parse_frame(frame, UNDERLAY_IF)
            except FrameError:
                continue
            if self.port not in (d.src_port, d.dst_port) or not d.payload \
                    or d.payload[0] not in (1, 2, 3):
                continue
            direction = "out" if addr[2] == socket.PACKET_OUTGOING else "in"
            self.seen.append((direction, d.payload[0], d))

    def messages(self, peer_ip: str) -> list[tuple[str, int]]:
        """(direction, type) of the handshake messages to or from peer_ip, in order."""
        return [(direction, kind) for direction, kind, d in self.read()
                if peer_ip in (d.src_ip, d.dst_ip)]

    def close(self) -> None:
        self.sock.close()
