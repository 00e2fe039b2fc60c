"""The gateway daemon end to end: who gets in just in time, and who does not.

This module runs the daemon with `--install-mode invert` (role inversion); the
default, re-injection, has the same checks in test_reinject.py. What happens
before the install (identity, forgeries, garbage) is the same in both modes.

One lab for the module: a jit gateway (wireguard-go + `wgjit gateway run`), the
real registry under gunicorn, six wireguard-go clients configured with `wg` only,
odd ones reaching the gateway over IPv4, even ones over IPv6. Each test uses its
own clients, and every client is quiet again after each test. Counters are read
from the daemon's /metrics as differences across a test.

    c1  registered, IPv4: connects just in time
    c2  registered, IPv6: connects just in time, IPv6 endpoint
    c3  re-keyed to a key the registry never saw; also the attacker's host
    c4  registered: the key the forger claims; connects afterwards
    c5  registered: its real initiation is captured and replayed from c3
    c6  registered: connects after the garbage
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from appliance.gateway.handshake import tai64n
from appliance.gateway.provision import FEED_CATCH_UP_EVERY
from appliance.keys import decode_key, generate_keypair, generate_private_key
from appliance.secrets import write_secret
from lab import gateway as lab_gateway
from lab import procs
from lab.netns import wg
from lab.registry import wgjit_argv
from lab.topology import Lab
from tests.initiations import build_initiation
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    InitiationTap,
    first_reply_after_start,
    installed,
    key_events,
    quiet_all,
    replies,
    send_udp,
    wait_for,
    wait_for_evict_passes_after,
)

pytestmark = [pytest.mark.lab]

LAB_SPEC = {"gateways": ["jit"], "clients": 6, "endpoint_family": "mixed",
            # Nobody goes idle within the module; passes often, so a peer removed by
            # hand is noticed quickly (the replay test).
            "idle_timeout": 120, "evict_interval": 0.5, "registry": "yes",
            "daemon_args": {"g1": ["--install-mode", "invert"]}}
GW = "g1"


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab):
    yield
    quiet_all(lab)


def listen_port(lab: Lab, name: str) -> int:
    return int(wg(["show", lab.client(name).ifname, "listen-port"]).strip())


class Counters:
    """Differences of the daemon's counters since construction."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.before = lab.metrics(GW)
        self.now = self.before

    def delta(self, name: str, **labels: str) -> float:
        self.now = self.lab.metrics(GW)
        return self.now.value(name, **labels) - self.before.value(name, **labels)


def drops(c: Counters, reason: str) -> float:
    return c.delta("wgjit_gateway_drops_total", reason=reason)


def assert_just_in_time(lab: Lab, name: str, endpoint: str) -> None:
    """The peer arrived as the issue describes: first reply well under REKEY_TIMEOUT,
    allowed IPs from the registry, endpoint = the initiation's source, and the
    daemon's events in causal order for this key and endpoint."""
    c = lab.client(name)
    took = first_reply_after_start(lab, name)
    assert took < JIT_CONNECT_LIMIT, f"{name}: first reply after {took:.2f} s"

    peer = wait_for(lambda: installed(lab, GW).get(c.public_key), 5, f"{name} on {GW}")
    registered = lab.registry().gateway_peer(c.public_key)
    assert registered is not None
    assert sorted(peer.allowed_ips) == sorted(registered["allowed_ips"]) \
        == sorted([c.tunnel4, c.tunnel6])
    assert peer.endpoint == endpoint

    evs = lab.events(GW)
    idx = {e["event"]: i for i, e in reversed(list(enumerate(evs)))
           if e.get("public_key") == c.public_key}  # first of each for this key
    for name_ in ("identity_recovered", "peer_pulled", "peer_installed"):
        assert name_ in idx, f"no {name_} for {name}: {[e['event'] for e in evs]}"
    seen = [i for i, e in enumerate(evs[:idx["identity_recovered"]])
            if e["event"] == "initiation_seen" and e["endpoint"] == endpoint]
    assert seen, f"no initiation_seen from {endpoint}"
    assert seen[-1] < idx["identity_recovered"] < idx["peer_pulled"] < idx["peer_installed"]
    assert evs[idx["identity_recovered"]]["endpoint"] == endpoint
    assert evs[idx["peer_pulled"]]["source"] == "registry"
    inst = evs[idx["peer_installed"]]
    assert inst["endpoint"] == endpoint
    assert sorted(inst["allowed_ips"]) == sorted(registered["allowed_ips"])
    assert inst["ts"] - evs[seen[-1]]["ts"] < JIT_CONNECT_LIMIT

    # The trigger keepalive did its job and is gone: an idle peer really goes idle.
    wait_for(lambda: key_events(lab, GW, c.public_key, "handshake_completed"), 5,
             f"handshake_completed for {name}")
    wait_for(lambda: installed(lab, GW)[c.public_key].persistent_keepalive == 0, 5,
             f"{name}'s trigger keepalive cleared")


def test_registered_client_connects_just_in_time(lab: Lab) -> None:
    c = lab.client("c1")
    assert c.public_key not in installed(lab, GW)  # the gateway starts empty
    counters = Counters(lab)
    lab.connect("c1", fresh=True)
    assert_just_in_time(lab, "c1", f"{c.underlay4}:{listen_port(lab, 'c1')}")
    assert counters.delta("wgjit_gateway_installs_total") == 1
    assert counters.delta("wgjit_gateway_registry_calls_total") == 1
    assert counters.delta("wgjit_gateway_registry_lookup_keys_total") == 1
    assert counters.delta("wgjit_gateway_cache_lookups_total", outcome="fetched") == 1
    assert counters.now.value("wgjit_gateway_installed_peers") >= 1


def test_the_gateway_holds_a_credential_of_its_own(lab: Lab) -> None:
    """As the deploy does: a gateway token named after the gateway (0600), not the
    lab's shared one (the connects in this module are made with it)."""
    argv = lab.gateway(GW).daemon_argv
    token_file = argv[argv.index("--token-file") + 1]
    reg = lab.state.registries[0]
    assert token_file != reg.gateway_token_file and Path(token_file).stat().st_mode & 0o077 == 0
    out = subprocess.run([*wgjit_argv(), "token", "list", "--db", reg.db, "--json"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    mine = [t for t in json.loads(out) if t.get("name") == GW]
    assert len(mine) == 1 and mine[0]["scope"] == "gateway" and not mine[0]["revoked_at"]


def test_ipv6_underlay_client_connects_just_in_time(lab: Lab) -> None:
    c = lab.client("c2")
    assert c.endpoint_family == 6
    lab.connect("c2", fresh=True)
    endpoint = f"[{c.underlay6}]:{listen_port(lab, 'c2')}"
    assert_just_in_time(lab, "c2", endpoint)
    # Inside the tunnel both families work too.
    assert lab.ping("c2", family=6, wait=3.0)


def test_unknown_key_is_not_installed_and_never_asks_the_registry(lab: Lab) -> None:
    """The known-key filter (loaded from the registry's snapshot at start) refuses
    a key the registry never saw, after a look at the change feed: no peer lookup."""
    c, g = lab.client("c3"), lab.gateway(GW)
    private, public = generate_keypair()
    assert lab.registry().gateway_peer(public) is None
    wait_for(lambda: lab.metrics(GW).value("wgjit_gateway_known_keys") > 0, 40,
             "the known-key filter loaded")
    key_file = write_secret(Path(lab.state.dir) / "keys" / "c3-unregistered.key", private)
    wg(["set", c.ifname, "private-key", str(key_file)])
    counters = Counters(lab)
    try:
        lab.connect("c3", fresh=True)

        def unknown() -> list[dict]:
            return key_events(lab, GW, public, "peer_unknown")

        wait_for(unknown, 5, "peer_unknown for the unregistered key")

        def refused() -> int:  # by a worker after its feed read, or before the second DH
            return len(unknown()) + int(counters.delta("wgjit_gateway_drops_total",
                                                       reason="unknown_key"))

        # More fresh initiations of the same key (new timestamps, so not replays),
        # one at a time so that none is folded into a lookup still running. Within a
        # second of the first, with the feed just read, they are refused by the
        # filter before the second X25519 (intake.refuses_unknown)...
        for n in range(2, 5):
            send_udp(lab, "c3", g.underlay4, g.listen_port,
                     [build_initiation(decode_key(private), decode_key(g.public_key))])
            wait_for(lambda n=n: refused() >= n, 5, f"refusal #{n}")
        # ... and the client's own retry after REKEY_TIMEOUT (5 s).
        wait_for(lambda: refused() >= 5, 10, "the client's retry")

        assert {e["reason"] for e in unknown()} == {"filtered"} and refused() == 5
        assert counters.delta("wgjit_gateway_registry_calls_total") == 0
        assert counters.delta("wgjit_gateway_cache_lookups_total", outcome="filtered") \
            == len(unknown())
        assert counters.delta("wgjit_gateway_installs_total") == 0
        assert public not in installed(lab, GW)
        assert not key_events(lab, GW, public, "peer_pulled", "peer_installed")
        assert replies(lab, "c3") == []
    finally:
        wg(["set", c.ifname, "private-key", c.private_key_file])


def test_forged_initiation_installs_nothing(lab: Lab) -> None:
    """Someone claims c4's (registered) key without its private key."""
    victim, g = lab.client("c4"), lab.gateway(GW)
    attacker = generate_private_key()
    # Timestamps an hour ahead: if the daemon recorded an unproven timestamp, the
    # real client would be locked out as a "replay" afterwards.
    forged = [build_initiation(attacker, decode_key(g.public_key),
                               claimed_static=decode_key(victim.public_key),
                               timestamp=tai64n(time.time() + 3600)) for _ in range(3)]
    counters = Counters(lab)
    send_udp(lab, "c3", g.underlay4, g.listen_port, forged[:2])
    send_udp(lab, "c3", g.underlay6, g.listen_port, forged[2:])

    wait_for(lambda: drops(counters, "timestamp_aead") >= 3, 5, "3 timestamp_aead drops")
    assert drops(counters, "timestamp_aead") == 3
    assert counters.delta("wgjit_gateway_initiations_total") == 3
    assert counters.delta("wgjit_gateway_initiations_verified_total") == 0
    assert counters.delta("wgjit_gateway_registry_calls_total") == 0
    assert not key_events(lab, GW, victim.public_key)
    assert victim.public_key not in installed(lab, GW)

    # The real owner of the key is not locked out.
    lab.connect("c4", fresh=True)
    assert first_reply_after_start(lab, "c4") < JIT_CONNECT_LIMIT


def test_initiation_with_a_low_order_static_key_is_dropped_as_static(lab: Lab) -> None:
    """A static field that opens (the sender knows our public key) to a point whose
    shared secret is all zeros: dropped under its own label, nothing looked up."""
    g = lab.gateway(GW)
    bad = [build_initiation(generate_private_key(), decode_key(g.public_key),
                            claimed_static=bytes(32)) for _ in range(2)]
    counters = Counters(lab)
    # An unknown key queued within the last second (the test before) would have
    # these refused as unknown_key before the second X25519 (intake.py), where a
    # low-order key is found out.
    time.sleep(FEED_CATCH_UP_EVERY + 0.1)
    send_udp(lab, "c3", g.underlay4, g.listen_port, bad)
    wait_for(lambda: drops(counters, "static") >= 2, 10, "2 static drops")
    assert drops(counters, "static") == 2
    assert counters.delta("wgjit_gateway_initiations_verified_total") == 0
    assert counters.delta("wgjit_gateway_registry_calls_total") == 0
    assert counters.delta("wgjit_gateway_installs_total") == 0


def test_replayed_initiation_from_elsewhere_installs_nothing(lab: Lab) -> None:
    victim, attacker, g = lab.client("c5"), lab.client("c3"), lab.gateway(GW)
    assert victim.endpoint_family == attacker.endpoint_family == 4
    tap = InitiationTap(lab, GW)
    try:
        lab.connect("c5", fresh=True)
        captured = tap.wait_initiation(victim.public_key)
    finally:
        tap.close()
    endpoint = f"{victim.underlay4}:{listen_port(lab, 'c5')}"
    assert captured.endpoint == endpoint
    assert first_reply_after_start(lab, "c5") < JIT_CONNECT_LIMIT
    wait_for(lambda: installed(lab, GW).get(victim.public_key), 5, "c5 installed")

    def endpoint_now() -> str | None:
        peer = installed(lab, GW).get(victim.public_key)
        return peer.endpoint if peer else None

    def replay(counters: Counters, n: int = 1) -> str:
        port = send_udp(lab, "c3", g.underlay4, g.listen_port, [captured.payload])
        wait_for(lambda: drops(counters, "replay") >= n, 5, f"replay drop #{n}")
        return f"{attacker.underlay4}:{port}"

    # 1. Replayed while the peer is installed: counted and reported, nothing new
    #    installed. wireguard-go accepts this first replay (role inversion: it never
    #    saw the original) and aims the peer at the replayer; the daemon puts the
    #    endpoint back although the client stays quiet, and the session is intact.
    lab.disconnect("c5")
    counters = Counters(lab)
    source = replay(counters)
    [event] = key_events(lab, GW, victim.public_key, "initiation_replayed")
    assert (event["endpoint"], event["installed"]) == (source, True)
    wait_for(lambda: key_events(lab, GW, victim.public_key, "endpoint_restored"), 3,
             "the daemon restoring c5's endpoint")
    [restored] = key_events(lab, GW, victim.public_key, "endpoint_restored")
    assert (restored["endpoint"], restored["replayer"]) == (endpoint, source)
    assert endpoint_now() == endpoint
    lab.connect("c5")  # same session: transport packets, no handshake
    assert first_reply_after_start(lab, "c5") < 1.0
    # Replayed again: the data plane now knows that timestamp too; the endpoint
    # stays even though the client is quiet and would not move it back.
    lab.disconnect("c5")
    replay(counters, 2)
    for _ in range(6):
        assert endpoint_now() == endpoint
        time.sleep(0.05)
    assert drops(counters, "already_installed") == 0
    assert counters.delta("wgjit_gateway_initiations_verified_total") == 0
    assert counters.delta("wgjit_gateway_installs_total") == 0
    assert len(key_events(lab, GW, victim.public_key, "peer_installed")) == 1

    # 2. Replayed after the peer is gone (removed by hand, so the daemon keeps the
    #    key's last timestamp): nothing is installed.
    lab_gateway.remove_peer(g, victim.public_key)
    removed_at = time.time()
    wait_for_evict_passes_after(lab, GW, removed_at)

    counters = Counters(lab)
    source = replay(counters)
    event = key_events(lab, GW, victim.public_key, "initiation_replayed")[-1]
    assert (event["endpoint"], event["installed"]) == (source, False)
    assert counters.delta("wgjit_gateway_cache_lookups_total") == 0
    assert counters.delta("wgjit_gateway_installs_total") == 0
    assert victim.public_key not in installed(lab, GW)

    # 3. The real client, starting a new session, gets in at once.
    lab.connect("c5", fresh=True)
    assert first_reply_after_start(lab, "c5") < JIT_CONNECT_LIMIT
    assert endpoint_now() == endpoint


def test_garbage_is_counted_and_the_daemon_keeps_serving(lab: Lab) -> None:
    g = lab.gateway(GW)
    rnd = secrets.token_bytes

    def type1(size: int, reserved: bytes = b"\0\0\0") -> bytes:
        return b"\x01" + reserved + rnd(size - 4)

    candidates = {  # pass the capture's filter (type 1 to our port), then rejected
        "short": [type1(147), type1(147), type1(4), b"\x01"],
        "long": [type1(149), type1(149), type1(1400)],
        "reserved": [type1(148, b"\0\x01\0")],
        "mac1": [type1(148), type1(148), type1(148)],
    }
    # Never reach the daemon: the capture's BPF program keeps only type 1.
    filtered = [b"", b"\x04\0\0\0" + rnd(28), b"\x04\0\0\0" + rnd(200), b"\x02" + rnd(91),
                b"\x03" + rnd(63)] + [bytes([b]) + rnd(n) for b, n in
                                      [(0, 147), (5, 10), (0xFF, 500), (0x41, 1200)]]
    counters = Counters(lab)
    for dest in (g.underlay4, g.underlay6):
        for packets in candidates.values():
            send_udp(lab, "c3", dest, g.listen_port, packets)
        send_udp(lab, "c6", dest, g.listen_port, filtered)

    expected = {reason: 2 * len(p) for reason, p in candidates.items()}
    wait_for(lambda: all(drops(counters, r) >= n for r, n in expected.items()), 5,
             f"drops {expected}")
    assert {r: drops(counters, r) for r in expected} == expected
    assert counters.delta("wgjit_gateway_initiations_total") == sum(expected.values())
    assert counters.delta("wgjit_gateway_initiations_verified_total") == 0
    assert counters.delta("wgjit_gateway_cache_lookups_total") == 0

    status, body = lab.health(GW)
    assert status == 200 and body["capture"] and body["scheduler"], body
    assert procs.alive(g.daemon_pid)
    # wireguard-go got the same packets; both it and the daemon still serve a newcomer.
    lab.connect("c6", fresh=True)
    c6 = lab.client("c6")
    assert_just_in_time(lab, "c6", f"[{c6.underlay6}]:{listen_port(lab, 'c6')}")


def test_gateway_status_reports_what_the_daemon_holds(lab: Lab) -> None:
    """`wgjit gateway status --json`, run in the gateway's namespace, against the
    device and the daemon's own /healthz."""
    lab.connect("c1")
    report = json.loads(lab.status(GW, as_json=True))
    assert report["status"] == "ok"
    assert report["peers"]["installed"] == len(installed(lab, GW))
    assert report["peers"]["installed"] >= 1
    assert report["interface"] == lab.gateway(GW).ifname
    assert [s["up"] for s in report["registry_servers"]] == [True]
    assert report["feed"]["healthy"] is True
    assert report["feed"]["caught_up_seconds_ago"] is not None
    assert report["known_keys"] >= len(lab.state.clients)
    assert report["cache"]["found"] >= 1
