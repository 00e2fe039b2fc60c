"""Re-injection (the default install mode) end to end: the client stays the initiator.

One lab for the module: a jit gateway running `wgjit gateway run` with its
defaults, the real registry, six wireguard-go clients (odd ones reach the
gateway over IPv4, even ones over IPv6). The gateway's namespace has strict
reverse-path filtering on, to show it does not drop re-injected packets.

    c1  IPv4: connects with no retry; the gateway only ever answers it
    c2  IPv6: the same
    c3  its captured initiation is replayed (from c1's host): never re-injected
    c4  IPv6, c5 IPv4: re-injection dropped by a firewall rule -> role inversion
    c6  a forged initiation claims its key: nothing re-injected; then it connects
    c7  IPv4, c8 IPv6: re-injection refused by the kernel (EPERM) -> role inversion

Which side initiated is read off the wire: a packet socket on the gateway's
underlay sees every handshake message; a gateway whose data plane answered the
client's own initiation sends a response (type 2) and never an initiation (1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from appliance.gateway.handshake import tai64n
from appliance.keys import decode_key, generate_private_key
from lab import gateway as lab_gateway
from lab.netns import sh, wg
from lab.topology import Lab
from tests.initiations import build_initiation
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    InitiationTap,
    WireTap,
    first_reply_after_start,
    installed,
    key_events,
    quiet_all,
    send_udp,
    wait_for,
    wait_for_evict_passes_after,
)

pytestmark = [pytest.mark.lab]

LAB_SPEC = {"gateways": ["jit"], "clients": 8, "endpoint_family": "mixed",
            "idle_timeout": 120, "evict_interval": 0.5, "registry": "yes"}
GW = "g1"
RP_FILTER = ("all", "default", "lo", "ul0")
FIREWALL = "wgjit_reinject_test"


@pytest.fixture(scope="module", autouse=True)
def _strict_rp_filter(lab: Lab) -> None:
    def strict() -> list[str]:
        for conf in RP_FILTER:
            with open(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter", "w") as f:
                f.write("1")
        return [open(f"/proc/sys/net/ipv4/conf/{c}/rp_filter").read().strip()
                for c in RP_FILTER]

    assert lab.worker(GW).call(strict) == ["1"] * len(RP_FILTER)


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab) -> Iterator[None]:
    yield
    quiet_all(lab)


@pytest.fixture
def wire(lab: Lab) -> Iterator[WireTap]:
    tap = WireTap(lab, GW)
    yield tap
    tap.close()


def listen_port(lab: Lab, name: str) -> int:
    return int(wg(["show", lab.client(name).ifname, "listen-port"]).strip())


def endpoint_of(lab: Lab, name: str) -> str:
    c = lab.client(name)
    if c.endpoint_family == 6:
        return f"[{c.underlay6}]:{listen_port(lab, name)}"
    return f"{c.underlay4}:{listen_port(lab, name)}"


def underlay_ip(lab: Lab, name: str) -> str:
    c = lab.client(name)
    return c.underlay6 if c.endpoint_family == 6 else c.underlay4


class Counters:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.before = lab.metrics(GW)

    def delta(self, name: str, **labels: str) -> float:
        now = self.lab.metrics(GW)
        return now.value(name, **labels) - self.before.value(name, **labels)

    def reinjections(self, outcome: str) -> float:
        return self.delta("wgjit_gateway_reinjections_total", outcome=outcome)


def events_of(lab: Lab, key: str) -> list[str]:
    return [e["event"] for e in key_events(lab, GW, key)]


def assert_client_initiated(lab: Lab, wire: WireTap, name: str) -> None:
    """Connected with no retry, through its own initiation, answered by the data plane."""
    c = lab.client(name)
    counters = Counters(lab)
    lab.connect(name, fresh=True)
    took = first_reply_after_start(lab, name)
    assert took < JIT_CONNECT_LIMIT, f"{name}: first reply after {took:.2f} s"
    wait_for(lambda: key_events(lab, GW, c.public_key, "handshake_completed"), 5,
             f"handshake_completed for {name}")

    evs = events_of(lab, c.public_key)
    order = ["identity_recovered", "peer_pulled", "peer_installed", "initiation_reinjected",
             "reinjection_answered", "handshake_completed"]
    assert [e for e in evs if e in order] == order, evs
    assert "reinjection_fallback" not in evs
    [inst] = key_events(lab, GW, c.public_key, "peer_installed")
    assert inst["mode"] == "reinject"
    assert counters.reinjections("sent") == 1
    assert counters.reinjections("answered") == 1
    assert counters.reinjections("unanswered") == counters.reinjections("failed") == 0

    # The daemon gave the peer no endpoint: the data plane took it from the
    # re-injected packet (the client's own address and port), with no keepalive.
    peer = installed(lab, GW)[c.public_key]
    assert peer.endpoint == endpoint_of(lab, name)
    assert peer.persistent_keepalive == 0
    assert sorted(peer.allowed_ips) == sorted([c.tunnel4, c.tunnel6])

    # On the wire: one initiation from the client (no retry), answered; the
    # gateway never initiated.
    msgs = wait_for(lambda: ("out", 2) in wire.messages(underlay_ip(lab, name))
                    and wire.messages(underlay_ip(lab, name)), 5, "the gateway's response")
    assert msgs.count(("in", 1)) == 1, msgs
    assert ("out", 1) not in msgs, msgs
    assert msgs.index(("in", 1)) < msgs.index(("out", 2)), msgs


def test_ipv4_client_connects_with_no_retry_and_stays_the_initiator(
        lab: Lab, wire: WireTap) -> None:
    assert lab.client("c1").endpoint_family == 4
    assert lab.client("c1").public_key not in installed(lab, GW)
    assert_client_initiated(lab, wire, "c1")


def test_ipv6_client_connects_with_no_retry_and_stays_the_initiator(
        lab: Lab, wire: WireTap) -> None:
    assert lab.client("c2").endpoint_family == 6
    assert_client_initiated(lab, wire, "c2")
    assert lab.ping("c2", family=6, wait=3.0)


def test_replayed_initiation_is_never_reinjected(lab: Lab, wire: WireTap) -> None:
    victim, g = lab.client("c3"), lab.gateway(GW)
    attacker_ip = lab.client("c1").underlay4
    tap = InitiationTap(lab, GW)
    try:
        lab.connect("c3", fresh=True)
        captured = tap.wait_initiation(victim.public_key)
    finally:
        tap.close()
    assert first_reply_after_start(lab, "c3") < JIT_CONNECT_LIMIT
    wait_for(lambda: key_events(lab, GW, victim.public_key, "handshake_completed"), 5,
             "c3's handshake")
    lab.disconnect("c3")
    endpoint = endpoint_of(lab, "c3")

    def replay(counters: Counters) -> None:
        send_udp(lab, "c1", g.underlay4, g.listen_port, [captured.payload])
        wait_for(lambda: counters.delta("wgjit_gateway_drops_total", reason="replay") >= 1,
                 5, "the replay drop")

    # 1. While installed: the daemon drops it before any re-injection, and the data
    #    plane, which saw the original (re-injected), refuses the copy it receives
    #    itself: no response to the replayer, and the endpoint stays the client's.
    counters = Counters(lab)
    replay(counters)
    for _ in range(6):
        assert installed(lab, GW)[victim.public_key].endpoint == endpoint
        time.sleep(0.05)
    assert counters.reinjections("sent") == 0
    assert not key_events(lab, GW, victim.public_key, "endpoint_restored")
    assert ("out", 2) not in wire.messages(attacker_ip)
    assert len(key_events(lab, GW, victim.public_key, "initiation_reinjected")) == 1

    # 2. After the peer is gone (removed by hand; the daemon keeps the timestamp):
    #    nothing is looked up, installed or re-injected.
    lab_gateway.remove_peer(g, victim.public_key)
    removed_at = time.time()
    wait_for_evict_passes_after(lab, GW, removed_at)
    counters = Counters(lab)
    replay(counters)
    assert counters.delta("wgjit_gateway_cache_lookups_total") == 0
    assert counters.delta("wgjit_gateway_installs_total") == 0
    assert counters.reinjections("sent") == 0
    assert victim.public_key not in installed(lab, GW)
    assert len(key_events(lab, GW, victim.public_key, "initiation_reinjected")) == 1
    assert ("out", 2) not in wire.messages(attacker_ip)


def test_forged_initiation_is_never_reinjected(lab: Lab, wire: WireTap) -> None:
    victim, g = lab.client("c6"), lab.gateway(GW)
    attacker = generate_private_key()
    forged = [build_initiation(attacker, decode_key(g.public_key),
                               claimed_static=decode_key(victim.public_key),
                               timestamp=tai64n(time.time() + 3600)) for _ in range(2)]
    counters = Counters(lab)
    send_udp(lab, "c1", g.underlay4, g.listen_port, forged[:1])
    send_udp(lab, "c1", g.underlay6, g.listen_port, forged[1:])
    wait_for(lambda: counters.delta("wgjit_gateway_drops_total", reason="timestamp_aead") >= 2,
             5, "2 timestamp_aead drops")
    assert counters.reinjections("sent") == 0
    assert not key_events(lab, GW, victim.public_key)
    assert victim.public_key not in installed(lab, GW)
    # The key's owner is not locked out, and is re-injected as usual.
    assert_client_initiated(lab, wire, "c6")


def _firewall(ns: str, rules: str) -> None:
    sh(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules)


def _dropped(ns: str) -> int:
    out = sh(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", FIREWALL]).stdout
    return int(out.split("packets ")[1].split()[0])


@pytest.mark.parametrize("hook, reason, outcome, clients", [
    # Dropped on input: the send succeeds, nothing answers, the deadline passes.
    ("input", "unanswered", "unanswered", ("c5", "c4")),
    # Dropped on output: netfilter fails the send itself (EPERM); no waiting.
    ("output", "send_failed", "failed", ("c7", "c8")),
])
def test_failed_reinjection_falls_back_to_role_inversion(
        lab: Lab, wire: WireTap, hook: str, reason: str, outcome: str,
        clients: tuple[str, str]) -> None:
    g = lab.gateway(GW)
    # Re-injected packets are looped back through lo; real clients arrive on ul0.
    iface = "iif" if hook == "input" else "oif"
    _firewall(g.ns, f"table inet {FIREWALL} {{\n  chain c {{\n    type filter hook {hook} "
                    f"priority 0;\n    {iface} \"lo\" udp dport {g.listen_port} counter drop\n"
                    "  }\n}\n")
    try:
        for name in clients:  # IPv4, then IPv6
            c = lab.client(name)
            counters = Counters(lab)
            dropped = _dropped(g.ns)
            lab.connect(name, fresh=True)
            took = first_reply_after_start(lab, name)
            assert took < JIT_CONNECT_LIMIT, f"{name}: first reply after {took:.2f} s"
            assert _dropped(g.ns) == dropped + 1  # the re-injected initiation, dropped
            evs = wait_for(lambda c=c: "handshake_completed" in events_of(lab, c.public_key)
                           and events_of(lab, c.public_key), 5, f"{name}'s handshake")
            assert evs.index("peer_installed") < evs.index("reinjection_fallback"), evs
            assert "reinjection_answered" not in evs
            assert ("initiation_reinjected" in evs) == (outcome == "unanswered")
            [fallback] = key_events(lab, GW, c.public_key, "reinjection_fallback")
            assert fallback["reason"] == reason
            assert counters.reinjections(outcome) == 1
            assert counters.reinjections("answered") == 0
            # Role inversion did it: the gateway initiated towards the client.
            msgs = wait_for(lambda name=name: wire.messages(underlay_ip(lab, name)), 5,
                            f"{name}'s handshake on the wire")
            assert ("out", 1) in msgs, msgs
            # ... and the trigger keepalive is cleared after the handshake.
            wait_for(lambda c=c: installed(lab, GW)[c.public_key].persistent_keepalive == 0,
                     5, f"{name}'s trigger keepalive cleared")
            assert installed(lab, GW)[c.public_key].endpoint == endpoint_of(lab, name)
            lab.disconnect(name)
    finally:
        _firewall(g.ns, f"delete table inet {FIREWALL}\n")
