"""Under attack the gateway still lets real clients in (issue 13).

One lab: two jit gateways with the real registry, wireguard-go everywhere.
g1 runs with the default defences (cookies under load) and installs by role
inversion (`--install-mode invert`): there the data plane never saw the
initiation that brought a peer in, so a replay of it steals the endpoint and
the daemon must repair it (with re-injection the data plane refuses replays
itself, tests/lab/test_reinject.py). g2 runs the default install mode with
`--cookies always`, so every initiation must carry a valid mac2: the cookie
path with a stock wireguard-go client, without having to saturate a shared
machine.

    c1  registered: connects just in time while c3 floods random keys
    c2  registered: its initiation is captured and replayed by c3, 2,000 times
    c3  the attacker's host
    c4  registered, on g2: gets a cookie reply, retries with mac2, connects
    c5  registered: connects while the replay flood runs
    c6  registered: connects while c3 floods random keys from 250 forged addresses
    c7  re-keyed to a key registered after g1 loaded its known-key filter
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from appliance.gateway.handshake import OFFSET_MAC2
from appliance.gateway.provision import FEED_CATCH_UP_EVERY
from appliance.gateway.sourcelimit import PACKETS_BURSTABLE, PACKETS_PER_SECOND
from appliance.keys import decode_key, generate_keypair, generate_private_key
from appliance.secrets import write_secret
from lab import gateway as lab_gateway
from lab.netns import wg
from lab.topology import Lab
from tests.initiations import build_initiation
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    InitiationTap,
    first_reply_after_start,
    installed,
    key_events,
    quiet_all,
    send_udp,
    wait_for,
)

pytestmark = [pytest.mark.lab]

LAB_SPEC = {"gateways": ["jit", "jit"], "clients": 7,
            "client_gateways": ["g1", "g1", "g1", "g2", "g1", "g1", "g1"], "endpoint_family": "4",
            "idle_timeout": 120, "evict_interval": 0.5, "registry": "yes",
            # A long feed period on g1: only the on-demand feed read can let in a
            # key registered after the known-key filter was loaded (c7).
            "daemon_args": {"g1": ["--install-mode", "invert", "--feed-interval", "60"],
                            "g2": ["--cookies", "always"]}}
REKEY_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab):
    yield
    quiet_all(lab)


class Counters:
    """Differences of one gateway daemon's counters since construction."""

    def __init__(self, lab: Lab, gateway: str) -> None:
        self.lab, self.gateway = lab, gateway
        self.before = lab.metrics(gateway)

    def delta(self, name: str, **labels: str) -> float:
        now = self.lab.metrics(self.gateway)
        return now.value(name, **labels) - self.before.value(name, **labels)

    def drops(self, reason: str) -> float:
        return self.delta("wgjit_gateway_drops_total", reason=reason)


class Flood:
    """Send payloads from a lab host at `rate` a second in a thread, cycling over
    `sockets` source ports, until they run out or stop() is called."""

    def __init__(self, lab: Lab, host: str, dest: str, port: int, payloads: list[bytes],
                 rate: float, sockets: int = 1) -> None:
        self._stop = threading.Event()
        self.sent = 0
        self.started = self.ended = 0.0

        def send() -> None:
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
            try:
                self.started = start = time.monotonic()
                for i, p in enumerate(payloads):
                    if self._stop.is_set():
                        break
                    socks[i % sockets].sendto(p, (dest, port))
                    self.sent += 1
                    ahead = start + self.sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            finally:
                self.ended = time.monotonic()
                for s in socks:
                    s.close()

        worker = lab.worker(host)
        self._thread = threading.Thread(target=worker.call, args=(send,), daemon=True)
        self._thread.start()

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def random_key_initiations(lab: Lab, gateway: str, n: int) -> list[bytes]:
    """Valid initiations from n fresh keys the registry never saw."""
    responder_public = decode_key(lab.gateway(gateway).public_key)
    return [build_initiation(generate_private_key(), responder_public) for _ in range(n)]


def test_a_random_key_flood_from_one_source_does_not_keep_a_client_out(lab: Lab) -> None:
    g = lab.gateway("g1")
    wait_for(lambda: lab.metrics("g1").value("wgjit_gateway_known_keys") > 0, 40,
             "the known-key filter loaded")
    flood_packets = random_key_initiations(lab, "g1", 6000)
    counters = Counters(lab, "g1")
    flood = Flood(lab, "c3", g.underlay4, g.listen_port, flood_packets, rate=1000)
    try:
        # Well into the flood: the old gateway's queue was full within 2 s of 600/s.
        wait_for(lambda: flood.sent >= 2000 and counters.drops("ratelimited") > 1000, 15,
                 "two seconds of flood reaching the daemon")
        lab.connect("c1", fresh=True)
        took = first_reply_after_start(lab, "c1")
        still_flooding = flood.sent < len(flood_packets)
    finally:
        flood.stop()
    assert took < JIT_CONNECT_LIMIT, f"c1: first reply after {took:.2f} s under the flood"
    assert still_flooding

    # What the flood got through the per-source limit: the burst and 20 a second
    # (and a second's slack for the reading of the counters).
    allowed = PACKETS_BURSTABLE + PACKETS_PER_SECOND * (flood.seconds + 1)
    wait_for(lambda: counters.delta("wgjit_gateway_initiations_total") >= flood.sent * 0.9,
             10, "the daemon to have read the flood")
    verified = counters.delta("wgjit_gateway_initiations_verified_total")
    assert 1 <= verified <= allowed + 1  # + c1
    assert counters.drops("ratelimited") >= flood.sent * 0.9 - allowed
    # Registry calls caused by the flood: none (the known-key filter refuses its keys).
    assert counters.delta("wgjit_gateway_registry_calls_total") == 1  # c1's
    assert counters.delta("wgjit_gateway_cache_lookups_total", outcome="filtered") >= 1
    assert counters.delta("wgjit_gateway_installs_total") == 1
    # One source is no load: nothing was refused for want of mac2; what went over
    # its limit was answered with cookies (a forged source cannot lock a client out).
    assert counters.drops("mac2") == 0
    assert counters.delta("wgjit_gateway_cookie_replies_total") > 0


def test_a_real_wireguard_go_client_answers_our_cookie_reply_with_mac2(lab: Lab) -> None:
    """g2 requires mac2: c4's first initiation gets a cookie reply; wireguard-go keeps
    the cookie, its retry after REKEY_TIMEOUT carries a valid mac2, and it gets in."""
    c = lab.client("c4")
    counters = Counters(lab, "g2")
    tap = InitiationTap(lab, "g2")
    try:
        lab.connect("c4", fresh=True)
        took = first_reply_after_start(lab, "c4", timeout=REKEY_TIMEOUT * 3)
        seen = []
        wait_for(lambda: seen.extend(tap.worker.call(tap.capture.recv, 0.1)) or
                 any(any(d.payload[OFFSET_MAC2:]) for d in seen), 5, "an initiation with mac2")
    finally:
        tap.close()
    mine = []
    for d in seen:
        try:
            init = tap.responder.consume_initiation(d.payload)
        except ValueError:
            continue
        if init.initiator_static == decode_key(c.public_key):
            mine.append(init)
    # First without mac2 (answered with a cookie), then the retry with one.
    assert not mine[0].has_mac2 and any(i.has_mac2 for i in mine[1:])
    assert counters.delta("wgjit_gateway_cookie_replies_total") >= 1
    assert counters.drops("mac2") >= 1
    assert counters.delta("wgjit_gateway_installs_total") == 1
    assert c.public_key in installed(lab, "g2")
    # Only the retry after the cookie got the client in (a lower bound: no timing race).
    assert took > REKEY_TIMEOUT - 1


def test_a_replay_flood_costs_one_repair_and_delays_nobody(lab: Lab) -> None:
    victim, attacker, g = lab.client("c2"), lab.client("c3"), lab.gateway("g1")
    tap = InitiationTap(lab, "g1")
    try:
        lab.connect("c2", fresh=True)
        captured = tap.wait_initiation(victim.public_key)
    finally:
        tap.close()
    assert first_reply_after_start(lab, "c2") < JIT_CONNECT_LIMIT
    wait_for(lambda: installed(lab, "g1").get(victim.public_key), 5, "c2 installed")
    endpoint = captured.endpoint
    lab.disconnect("c2")

    counters = Counters(lab, "g1")
    # 2,000 copies from 50 source ports of the attacker's address, as fast as it goes.
    flood = Flood(lab, "c3", g.underlay4, g.listen_port, [captured.payload] * 2000,
                  rate=20_000, sockets=50)
    try:
        lab.connect("c5", fresh=True)
        took = first_reply_after_start(lab, "c5")
    finally:
        flood.stop()
    assert took < JIT_CONNECT_LIMIT, f"c5: first reply after {took:.2f} s under a replay flood"
    wait_for(lambda: key_events(lab, "g1", victim.public_key, "endpoint_restored"), 5,
             "c2's endpoint restored")
    wait_for(lambda: counters.delta("wgjit_gateway_initiations_total") >= flood.sent * 0.9, 10,
             "the daemon to have read the flood")
    time.sleep(0.5)  # a second repair, if one were coming, would be due by now
    restored = key_events(lab, "g1", victim.public_key, "endpoint_restored")
    assert len(restored) == 1
    assert restored[0]["endpoint"] == endpoint
    assert restored[0]["replayer"].startswith(f"{attacker.underlay4}:")
    assert installed(lab, "g1")[victim.public_key].endpoint == endpoint
    replays = counters.drops("replay")
    assert replays >= 1
    assert counters.delta("wgjit_gateway_endpoint_repairs_total", outcome="queued") == 1
    assert counters.delta("wgjit_gateway_endpoint_repairs_total", outcome="repeat") \
        == replays - 1
    assert counters.delta("wgjit_gateway_installs_total") == 1  # c5 only
    # Logged at most about once a second, not once a replay.
    logged = key_events(lab, "g1", victim.public_key, "initiation_replayed")
    assert len(logged) <= 10 + flood.seconds + 2

    # Restart keeps the replay memory: with c2 gone from the device, the old
    # capture installs nothing after a restart either.
    lab_gateway.remove_peer(g, victim.public_key)
    removed_at = time.time()
    wait_for(lambda: lab.health("g1")[1]["last_evict_pass"].get("at", 0) > removed_at + 0.6,
             5, "an eviction pass after the removal")
    lab.stop_daemon("g1")
    lab.start_daemon("g1")
    counters = Counters(lab, "g1")
    send_udp(lab, "c3", g.underlay4, g.listen_port, [captured.payload])
    wait_for(lambda: counters.drops("replay") >= 1, 5, "the replay refused after restart")
    assert counters.delta("wgjit_gateway_cache_lookups_total") == 0
    assert counters.delta("wgjit_gateway_installs_total") == 0
    assert victim.public_key not in installed(lab, "g1")


def spoofed_sender(dest: str, port: int, payloads: list[bytes], rate: float,
                   stop: threading.Event, sources: int = 250) -> int:
    """Send payloads from forged sources (203.0.113.1..sources, a lab range no host
    uses) through a raw socket, at `rate` a second until stopped; how many were sent."""
    from appliance.gateway.udp_packet import udp_packet

    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        start = time.monotonic()
        while not stop.is_set() and sent < len(payloads):
            src = f"203.0.113.{1 + sent % sources}"
            with contextlib.suppress(OSError):
                s.sendto(udp_packet(src, 40000 + sent % 7, dest, port, payloads[sent]),
                         (dest, 0))
            sent += 1
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return sent


def test_a_random_key_flood_from_many_forged_sources_does_not_keep_a_client_out(
        lab: Lab) -> None:
    """2,000 initiations a second from 250 forged addresses, each within its own
    per-source limit: the known-key filter refuses their keys without a registry
    call, and a registered client connects (at worst after one retry, should the
    gateway find itself under load and answer it with a cookie)."""
    g = lab.gateway("g1")
    wait_for(lambda: lab.metrics("g1").value("wgjit_gateway_known_keys") > 0, 40,
             "the known-key filter loaded")
    packets = random_key_initiations(lab, "g1", 8000)
    counters = Counters(lab, "g1")
    stop = threading.Event()
    sent: list[int] = []
    flood = threading.Thread(target=lambda: sent.append(lab.worker("c3").call(
        spoofed_sender, g.underlay4, g.listen_port, packets, 2000.0, stop)), daemon=True)
    flood.start()
    try:
        wait_for(lambda: counters.delta("wgjit_gateway_initiations_total") > 2000, 15,
                 "a second of the forged flood reaching the daemon")
        lab.connect("c6", fresh=True)
        took = first_reply_after_start(lab, "c6", timeout=REKEY_TIMEOUT * 3)
    finally:
        stop.set()
        flood.join(30)
    assert sent and sent[0] > 2000
    assert took < REKEY_TIMEOUT + JIT_CONNECT_LIMIT, f"c6: first reply after {took:.2f} s"
    assert counters.drops("ratelimited") < sent[0] / 10  # each forged source is within limit
    assert counters.delta("wgjit_gateway_registry_calls_total") == 1  # c6's, none for the flood
    # Once the workers had read the feed for the first of them, forged keys were
    # refused after one X25519 (intake.py), before the second.
    assert counters.drops("unknown_key") > 0
    assert counters.delta("wgjit_gateway_installs_total") == 1


def test_a_key_registered_after_the_filter_loaded_gets_in_just_in_time(lab: Lab) -> None:
    """The filter does not know the new key yet; the change feed, read on demand
    (g1 polls it only every 60 s here), adds it before the lookup."""
    c = lab.client("c7")
    wait_for(lambda: lab.metrics("g1").value("wgjit_gateway_known_keys") > 0, 40,
             "the known-key filter loaded")
    private, public = generate_keypair()
    admin = lab.registry()
    admin.delete_peer(c.public_key)  # its allowed IPs go to the new key
    admin.add_peer(public_key=public, allowed_ips=[c.tunnel4, c.tunnel6], name="c7-new")
    key_file = write_secret(Path(lab.state.dir) / "keys" / "c7-new.key", private)
    wg(["set", c.ifname, "private-key", str(key_file)])
    time.sleep(FEED_CATCH_UP_EVERY * 1.1)  # an earlier on-demand read cannot stand in
    counters = Counters(lab, "g1")
    try:
        lab.connect("c7", fresh=True)
        took = first_reply_after_start(lab, "c7")
    finally:
        wg(["set", c.ifname, "private-key", c.private_key_file])
    assert took < JIT_CONNECT_LIMIT, f"c7: first reply after {took:.2f} s"
    assert counters.delta("wgjit_gateway_cache_lookups_total", outcome="filtered") == 0
    assert counters.delta("wgjit_gateway_registry_calls_total") == 1
    assert counters.delta("wgjit_gateway_feed_polls_total") >= 1
    assert public in installed(lab, "g1")
