"""One cookie issuer: with the gateway's wireguard-go under load, a client gets in after
one cookie round (issue 13; cookie_learn.py).

The daemon runs with `--cookies always`, so every initiation needs a valid mac2
to reach it; wireguard-go is put under load by its own rule (its handshake queue
1/8 full, then for a second) with short bursts of initiations that pass mac1 and
nothing else, from another lab host. Before the fix both answered the client's
first initiation with a cookie, and whichever it kept, one of them refused its
retry. Now the daemon learns wireguard-go's cookie replies as they leave,
sends none of its own while they come, and takes a mac2 made with
wireguard-go's cookie: the client's retry is installed by the daemon and its
re-injected copy answered by wireguard-go. Once over IPv4, once over IPv6
(the two halves of the cookie-reply filter, and a re-injection over IPv6).
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from appliance.gateway.cookie import consume_cookie_reply
from appliance.gateway.handshake import HASH, LABEL_MAC1, MAC, OFFSET_MAC1, OFFSET_MAC2
from appliance.keys import decode_key
from lab.topology import Lab
from tests.lab.gateway_e2e import (
    WireTap,
    first_reply_after_start,
    installed,
    key_events,
    quiet_all,
    wait_for,
)

pytestmark = [pytest.mark.lab]

# c1 reaches the gateway over IPv4, c2 over IPv6 (the two halves of the cookie-reply
# filter); c3 floods over IPv4: wireguard-go's load is one state for both families.
# g2 runs with the default --cookies auto, for the re-injected copy's mac2; c4 is its client.
LAB_SPEC = {"gateways": ["jit", "jit"], "clients": 4, "endpoint_family": "mixed",
            "registry": "yes", "client_gateways": ["g1", "g1", "g1", "g2"],
            "daemon_args": {"g1": ["--cookies", "always"]}}
REKEY_TIMEOUT = 5.0
# wireguard-go is under load while its handshake queue (1,024 places) holds 128 or
# more, and for a second after. A burst of BURST initiations sent back to back
# arrives far faster than its two handshake goroutines do the Diffie-Hellman work
# an initiation costs when not under load, so each burst that finds it out of load
# puts it back; one every BURST_EVERY keeps it there with short gaps.
BURST = 400
BURST_EVERY = 0.1
SO_RCVBUFFORCE = 33


def mac1_only(responder_public: bytes, n: int) -> list[bytes]:
    """Initiations with a valid mac1 and random contents (fresh for every burst, as a
    flood's are): each costs wireguard-go, out of load, one X25519 and a failed open;
    under load, a cookie reply."""
    key = HASH(LABEL_MAC1 + responder_public)
    out = []
    for _ in range(n):
        body = struct.pack("<B3x", 1) + secrets.token_bytes(OFFSET_MAC1 - 4)
        out.append(body + MAC(key, body) + bytes(16))
    return out


class Bursts:
    def __init__(self, lab: Lab, host: str, dest: str, port: int,
                 payloads: Callable[[], list[bytes]]) -> None:
        self._stop = threading.Event()
        self.bursts = 0

        def run() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                while not self._stop.is_set():
                    for p in payloads():
                        try:
                            s.sendto(p, (dest, port))
                        except OSError:  # a full send buffer: the rest of this burst
                            break
                    self.bursts += 1
                    self._stop.wait(BURST_EVERY)

        self._thread = threading.Thread(target=lab.worker(host).call, args=(run,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class UnderLoad:
    """wireguard-go on `gateway` kept under load by bursts from c3, and a tap on its
    underlay read all along (the bursts would overflow it between reads)."""

    def __init__(self, lab: Lab, gateway: str) -> None:
        self.lab, self.gateway = lab, gateway
        g = lab.gateway(gateway)
        self.tap = WireTap(lab, gateway)
        self.tap.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.before = lab.metrics(gateway)
        self._reading = threading.Event()
        self._reader = threading.Thread(target=self._keep_reading, daemon=True)
        self._reader.start()
        public = decode_key(g.public_key)
        self._bursts = Bursts(lab, "c3", g.underlay4, g.listen_port,
                              lambda: mac1_only(public, BURST))

    def _keep_reading(self) -> None:
        while not self._reading.is_set():
            self.tap.read()
            time.sleep(0.01)

    def delta(self, name: str) -> float:
        return self.lab.metrics(self.gateway).value(name) - self.before.value(name)

    def stop(self) -> list:
        """Stop the bursts and the reader; every handshake message the tap saw."""
        self._bursts.stop()
        self._reading.set()
        self._reader.join(timeout=5)
        self.tap.read()  # what came since the reader's last read
        self.tap.close()
        return self.tap.seen


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab):
    yield
    quiet_all(lab)


@pytest.mark.parametrize("name", ["c1", "c2"], ids=["ipv4", "ipv6"])
def test_a_client_gets_in_after_one_cookie_round_while_wireguard_go_is_under_load(
        lab: Lab, name: str) -> None:
    g, c = lab.gateway("g1"), lab.client(name)
    client_ip = c.underlay4 if name == "c1" else c.underlay6
    gateway_public = decode_key(g.public_key)
    load = UnderLoad(lab, "g1")
    delta = load.delta
    try:
        # wireguard-go answers the bursts with cookies, the daemon sees them leave and
        # withholds its own.
        wait_for(lambda: delta("wgjit_gateway_dataplane_cookies_total") > 0
                 and delta("wgjit_gateway_cookie_replies_withheld_total") > 0, 20,
                 "wireguard-go's cookie replies, learned by the daemon")
        lab.connect(name, fresh=True)
        took = first_reply_after_start(lab, name, timeout=REKEY_TIMEOUT * 4)
    finally:
        seen = load.stop()

    msgs = [(direction, kind, d) for direction, kind, d in seen
            if client_ip in (d.src_ip, d.dst_ip)]
    seq = [(direction, kind) for direction, kind, _ in msgs]
    # wireguard-go answered the client's own handshake (re-injected), no role inversion:
    # before the fix, each try got two cookies, the retry was refused, and the gateway
    # fell back to initiating itself ("out", 1) after ~10 s.
    assert ("out", 2) in seq and ("out", 1) not in seq, seq
    first_response = seq.index(("out", 2))
    tries = [d.payload for direction, kind, d in msgs[:first_response]
             if (direction, kind) == ("in", 1)]
    cookies = [d.payload for direction, kind, d in msgs[:first_response]
               if (direction, kind) == ("out", 3)]
    # One cookie round: the first try without mac2, the retry with one, and answered.
    assert len(tries) == 2, seq
    assert not any(tries[0][OFFSET_MAC2:]) and any(tries[1][OFFSET_MAC2:])
    # One issuer: every cookie the client got holds the same tau (wireguard-go's; the
    # daemon's would differ), and the retry's mac2 is made with it.
    taus = {consume_cookie_reply(r, gateway_public, tries[0][OFFSET_MAC1:OFFSET_MAC2])
            for r in cookies}
    assert len(taus) == 1
    (tau,) = taus
    assert MAC(tau, tries[1][:OFFSET_MAC2]) == tries[1][OFFSET_MAC2:]
    # The daemon let it in on wireguard-go's cookie, and installed it once.
    assert delta("wgjit_gateway_dataplane_mac2_total") >= 1
    assert delta("wgjit_gateway_installs_total") == 1
    assert c.public_key in installed(lab, "g1")
    assert took > REKEY_TIMEOUT - 1  # it did need the round (a lower bound: no race)


def test_a_reinjected_copy_carries_the_data_planes_cookie_and_is_answered_at_once(
        lab: Lab) -> None:
    """The daemon is not under load (--cookies auto; the bursts come from one source,
    over its per-source limit), wireguard-go is. The client's first try needs no
    mac2 for the daemon, which installs the peer; wireguard-go refused the original
    with a cookie, and would refuse a byte-for-byte copy too. The copy goes in with
    its mac2 made under the cookie the daemon learned (cookie_learn.py) and is
    answered: the client is in on its first try, with no role inversion."""
    c = lab.client("c4")
    load = UnderLoad(lab, "g2")
    try:
        wait_for(lambda: load.delta("wgjit_gateway_dataplane_cookies_total") > 0, 20,
                 "wireguard-go under load, its cookie replies seen by the daemon")
        lab.connect("c4", fresh=True)
        took = first_reply_after_start(lab, "c4", timeout=REKEY_TIMEOUT * 4)
    finally:
        seen = load.stop()

    client_ip = c.underlay4 if c.endpoint_family == 4 else c.underlay6
    seq = [(direction, kind) for direction, kind, d in seen
           if client_ip in (d.src_ip, d.dst_ip)]
    assert ("out", 2) in seq and ("out", 1) not in seq, seq  # answered, not inverted
    first_response = seq.index(("out", 2))
    assert seq[:first_response].count(("in", 1)) == 1, seq  # the first try, no retry
    assert ("out", 3) in seq[:first_response], seq  # wireguard-go did refuse the original
    (reinjected,) = key_events(lab, "g2", c.public_key, "initiation_reinjected")
    assert reinjected["mac2"] == "dataplane", reinjected
    assert not key_events(lab, "g2", c.public_key, "reinjection_fallback")
    assert took < REKEY_TIMEOUT
