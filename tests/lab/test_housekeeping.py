"""Housekeeping end to end: idle eviction, revocation within seconds, restarts.

One lab for the module: a jit gateway (wireguard-go + `wgjit gateway run` with
an idle timeout of 3 s, passes every 0.5 s, the change feed polled every 1 s, a
3 s handshake grace), the real registry under gunicorn, wireguard-go clients
configured with `wg` only. Timeouts below 180 s leave an evicted client's
session keys alive, so a returning client starts a fresh session
(connect(fresh=True)), as one whose keys had expired would.

    c1  goes idle, is evicted, returns; later idle again after the restart
    c2  pings for the whole module: never evicted, not even across kill -9
    c3  revoked while pinging, refused, restored, back
    c4  its allowed IPs change while connected
    c5  revoked while the gateway cannot reach the registry
    c6  its packets to the gateway get through, the gateway's back do not

The tests run in file order and build on the clients' states; the kill -9
test is last. A cap on installed peers needs a lab of its own (the last test).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance.wg import open_device
from lab.netns import sh, wg
from lab.topology import Lab
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    first_reply_after_start,
    installed,
    key_events,
    replies,
    wait_for,
)

pytestmark = [pytest.mark.lab]

GW = "g1"
IDLE = 3.0
EVICT_EVERY = 0.5
FEED_EVERY = 1.0
GRACE = 3.0
LAB_SPEC = {"gateways": ["jit"], "clients": 6, "registry": "yes",
            "idle_timeout": IDLE, "evict_interval": EVICT_EVERY,
            "daemon_args": {GW: ["--feed-interval", f"{FEED_EVERY:g}",
                                 "--handshake-grace", f"{GRACE:g}"]}}
# How long to wait for an outcome before failing: generous, the machine is shared (2
# cores); the tests assert order and outcome, bench/ measures how soon.
WAIT = 30.0
EXTRA_IP = "198.18.2.4/32"  # in the tunnel range the clients route to the gateway


def metric(lab: Lab, name: str, **labels: str) -> float:
    return lab.metrics(GW).value(name, **labels)


def evicted(lab: Lab, name: str, reason: str | None = None) -> list[dict]:
    events = key_events(lab, GW, lab.client(name).public_key, "peer_evicted")
    return [e for e in events if reason is None or e["reason"] == reason]


def connect(lab: Lab, name: str) -> None:
    lab.connect(name, fresh=True)
    assert first_reply_after_start(lab, name) < JIT_CONNECT_LIMIT


def ping_from(lab: Lab, name: str, source: str, wait: float = 1.0) -> bool:
    """One echo from the client's tunnel with `source` as the sender address."""
    c, g = lab.client(name), lab.gateway(GW)
    p = subprocess.run(["ip", "netns", "exec", c.ns, "ping", "-n", "-c", "1", "-W", f"{wait:g}",
                        "-I", source, g.tunnel4_ip], capture_output=True, text=True,
                       timeout=wait + 10)
    return p.returncode == 0


def test_idle_client_is_evicted_and_returns_just_in_time(lab: Lab) -> None:
    connect(lab, "c1")
    connect(lab, "c2")  # and it keeps pinging to the end of the module
    thrash_before = metric(lab, "wgjit_gateway_reinstalls_after_eviction_total", reason="idle")
    lab.disconnect("c1")
    last_reply = replies(lab, "c1")[-1]
    # Generous: passes run every 0.5 s, but the machine may be loaded; how soon after
    # the timeout a pass evicts is bench/evict.py's business.
    [ev] = wait_for(lambda: evicted(lab, "c1"), IDLE + WAIT, "c1 evicted")
    assert ev["reason"] == "idle"
    # Never before the timeout (activity is counted per pass, so up to a pass early
    # relative to the last reply the client saw).
    assert ev["ts"] - last_reply >= IDLE - EVICT_EVERY
    assert lab.client("c1").public_key not in installed(lab, GW)
    assert metric(lab, "wgjit_gateway_evictions_total", reason="idle") >= 1

    # Its next packet brings it back at once, and the quick return is counted as thrash.
    connect(lab, "c1")
    assert lab.client("c1").public_key in installed(lab, GW)
    assert metric(lab, "wgjit_gateway_reinstalls_after_eviction_total",
                  reason="idle") == thrash_before + 1
    # c2 pinged through more than two idle timeouts without being touched.
    assert evicted(lab, "c2") == []
    n = len(replies(lab, "c2"))
    wait_for(lambda: len(replies(lab, "c2")) > n, WAIT, "c2 still getting replies")


def test_revoked_client_loses_the_tunnel_from_the_feed_and_restore_lets_it_back(
        lab: Lab) -> None:
    c3 = lab.client("c3")
    connect(lab, "c3")
    rc = lab.registry()
    revoked_at = time.time()
    rc.revoke_peer(c3.public_key)
    # c3 keeps pinging, so only the change feed can remove it: seconds here (a 1 s
    # poll), not the 3 s idle timeout, which its traffic keeps from ever running out.
    [ev] = wait_for(lambda: evicted(lab, "c3"), WAIT, "c3 removed after revoke")
    assert ev["reason"] == "revoked"
    assert ev["ts"] >= revoked_at
    assert c3.public_key not in installed(lab, GW)
    # The tunnel is gone: no reply later than the removal (plus one in flight), while
    # it kept pinging every 0.2 s for 2 s more.
    time.sleep(2.0)
    assert all(t < ev["ts"] + 0.5 for t in replies(lab, "c3"))

    # It cannot come back: a fresh session's initiation is refused.
    before = len(key_events(lab, GW, c3.public_key, "peer_unknown"))
    lab.connect("c3", fresh=True)
    unknown = wait_for(lambda: key_events(lab, GW, c3.public_key, "peer_unknown")[before:],
                       WAIT, "the revoked key refused")
    assert unknown[0]["reason"] in ("not_found", "negative_hit")
    time.sleep(1.5)
    assert replies(lab, "c3") == []
    assert c3.public_key not in installed(lab, GW)

    # Restored, it can: the feed drops the negative cache entry.
    cursor = metric(lab, "wgjit_gateway_feed_cursor")
    rc.restore_peer(c3.public_key)
    wait_for(lambda: metric(lab, "wgjit_gateway_feed_cursor") > cursor, WAIT,
             "the restore applied from the feed")
    connect(lab, "c3")
    assert c3.public_key in installed(lab, GW)
    # A restored peer's return is not eviction thrash.
    assert metric(lab, "wgjit_gateway_reinstalls_after_eviction_total",
                  reason="revoked") == 0
    lab.disconnect("c3")


def test_allowed_ip_change_reaches_the_installed_peer_without_reconnect(lab: Lab) -> None:
    c4 = lab.client("c4")
    connect(lab, "c4")
    sh(["ip", "-n", c4.ns, "address", "add", EXTRA_IP, "dev", c4.ifname])
    source = EXTRA_IP.split("/")[0]
    # The gateway drops what comes from an address the peer does not own.
    assert not ping_from(lab, "c4", source)
    installs = len(key_events(lab, GW, c4.public_key, "peer_installed"))

    lab.registry().update_peer(c4.public_key,
                               allowed_ips=[c4.tunnel4, c4.tunnel6, EXTRA_IP])
    [upd] = wait_for(lambda: key_events(lab, GW, c4.public_key, "peer_updated"),
                     WAIT, "peer_updated for c4")
    assert EXTRA_IP in upd["allowed_ips"]
    assert EXTRA_IP in installed(lab, GW)[c4.public_key].allowed_ips
    assert ping_from(lab, "c4", source, wait=2.0)
    # In place: never removed, never installed again, the ping never stopped.
    assert len(key_events(lab, GW, c4.public_key, "peer_installed")) == installs
    assert evicted(lab, "c4") == []
    # A removal would cost the client a new handshake: seconds of silence, not 0.2 s.
    gaps = [b - a for a, b in zip(replies(lab, "c4"), replies(lab, "c4")[1:], strict=False)]
    assert max(gaps) < 3.0
    lab.disconnect("c4")


def test_never_handshaken_peer_is_evicted_after_the_grace(lab: Lab) -> None:
    # The gateway hears c6's initiations, but what it sends back is lost, as with a
    # spoofed source address or a client that left: installed, never handshaken.
    # Dropped by a firewall rule on the way out: an `unreachable` route does not
    # stop the answer to a re-injected initiation (wireguard-go answers it, looped
    # back through lo, out of ul0 all the same: seen in this lab).
    c6, g = lab.client("c6"), lab.gateway(GW)
    nft = ["ip", "netns", "exec", g.ns, "nft", "-f", "-"]
    sh(nft, input=f"table ip lost_answers {{\n  chain out {{\n    type filter hook output "
                  f"priority 0;\n    ip daddr {c6.underlay4} udp sport {g.listen_port} drop\n"
                  "  }\n}\n")
    try:
        lab.connect("c6", fresh=True)
        [inst] = wait_for(lambda: key_events(lab, GW, c6.public_key, "peer_installed"), WAIT,
                          "c6 installed")
        [ev] = wait_for(lambda: evicted(lab, "c6"), GRACE + WAIT, "c6 evicted")
        assert ev["reason"] == "never_handshaken"
        # Never before the grace; how soon after it is the bench's business.
        assert ev["ts"] - inst["ts"] >= GRACE - EVICT_EVERY
        assert replies(lab, "c6") == []
    finally:
        sh(nft, input="delete table ip lost_answers\n", check=False)
    # Reachable again, its next retry (every REKEY_TIMEOUT) gets in.
    wait_for(lambda: replies(lab, "c6"), 12 + WAIT, "c6 in once the way back works")
    lab.disconnect("c6")


def test_registry_unreachable_eviction_runs_and_revocation_catches_up(lab: Lab) -> None:
    c5, g = lab.client("c5"), lab.gateway(GW)
    reg = lab.state.registry
    connect(lab, "c5")
    # Only the gateway loses the registry: the operator can still revoke.
    block = ["ip", "-n", g.ns, "route", "add", "unreachable", f"{reg.underlay4}/32"]
    unblock = ["ip", "-n", g.ns, "route", "del", "unreachable", f"{reg.underlay4}/32"]
    sh(block)
    try:
        errors = metric(lab, "wgjit_gateway_feed_errors_total")
        wait_for(lambda: metric(lab, "wgjit_gateway_feed_errors_total") > errors,
                 WAIT, "a failed feed poll")
        lab.registry().revoke_peer(c5.public_key)
        # Eviction does not need the registry: c1, quiet, goes as usual.
        lab.disconnect("c1")
        n = len(evicted(lab, "c1"))
        wait_for(lambda: evicted(lab, "c1")[n:], IDLE + WAIT, "c1 evicted during the outage")
        # The gateway cannot know about c5 yet: its tunnel stays, and it says so.
        assert evicted(lab, "c5") == []
        assert c5.public_key in installed(lab, GW)
        status, health = lab.health(GW)
        assert status == 200 and health["feed"] == "behind"
    finally:
        sh(unblock, check=False)
    returned = time.time()
    [ev] = wait_for(lambda: evicted(lab, "c5"), WAIT, "c5 removed once the registry is back")
    assert ev["reason"] == "revoked"
    assert ev["ts"] >= returned  # not before the registry could tell
    wait_for(lambda: lab.health(GW)[1]["feed"] == "ok", WAIT, "healthz: feed ok")
    assert evicted(lab, "c2") == []


def test_kill_9_and_restart_loses_nothing(lab: Lab) -> None:
    c1, c2, c4 = lab.client("c1"), lab.client("c2"), lab.client("c4")
    g = lab.gateway(GW)
    if not lab.connected("c2"):  # run on its own
        connect(lab, "c2")
    connect(lab, "c1")
    connect(lab, "c4")
    before = set(installed(lab, GW))
    assert {c1.public_key, c2.public_key, c4.public_key} <= before
    cursor = metric(lab, "wgjit_gateway_feed_cursor")

    lab.stop_daemon(GW, signal.SIGKILL)
    mark = len(lab.events(GW))  # the log is appended to across the restart

    def since_restart() -> list[dict]:
        return lab.events(GW)[mark:]

    # The data plane does not need the daemon.
    n = len(replies(lab, "c2"))
    wait_for(lambda: len(replies(lab, "c2")) > n + 3, WAIT, "c2's pings while the daemon is dead")
    # Meanwhile: c4 is revoked, and c1's peer is left as if the daemon had died
    # between an install and clearing its trigger keepalive.
    lab.registry().revoke_peer(c4.public_key)
    wg(["set", g.ifname, "peer", c1.public_key, "persistent-keepalive", "25"])

    lab.start_daemon(GW)
    run = since_restart()
    adopted = {e["public_key"] for e in run if e["event"] == "peer_adopted"}
    assert adopted == before
    # Adopted, not installed again: the clients never noticed.
    assert not [e for e in run if e["event"] == "peer_installed"]
    # The feed resumed from the saved cursor (no full reconcile) and caught the revoke.
    [ev] = wait_for(lambda: [e for e in since_restart() if e["event"] == "peer_evicted"
                             and e["public_key"] == c4.public_key], WAIT,
                    "c4 removed after the restart")
    assert ev["reason"] == "revoked"
    assert metric(lab, "wgjit_gateway_reconciles_total") == 0
    # The gauge is set once the page is applied, just after the eviction's event.
    wait_for(lambda: metric(lab, "wgjit_gateway_feed_cursor") > cursor, WAIT,
             "the feed cursor past the one before the restart")
    # The leftover trigger keepalive is cleared, so c1 can go idle.
    wait_for(lambda: installed(lab, GW)[c1.public_key].persistent_keepalive == 0, WAIT,
             "c1's keepalive cleared")
    # Traffic went on throughout: no gap (a lost tunnel would cost the client at
    # least its 15 s of silence before it initiates again), no duplicate replies.
    got = replies(lab, "c2")
    assert max(b - a for a, b in zip(got, got[1:], strict=False)) < 10.0
    for name in ("c1", "c2"):
        assert "DUP!" not in Path(lab.client(name).ping_log).read_text()
    keys = [p.public_key for p in lab.peers(GW)]
    assert len(keys) == len(set(keys))
    # Eviction resumes: c1 goes quiet and is evicted by the new daemon.
    lab.disconnect("c1")
    wait_for(lambda: [e for e in since_restart() if e["event"] == "peer_evicted"
                      and e["public_key"] == c1.public_key], IDLE + 5, "c1 evicted again")
    assert c2.public_key in installed(lab, GW)
    assert evicted(lab, "c2") == []


def test_device_reads_agree_on_a_real_wireguard_go(lab: Lab) -> None:
    # The cheap reads housekeeping uses, against the full one, on the live gateway.
    with open_device(lab.gateway(GW).ifname, "uapi") as dev:
        full = dev.dump()
        activity = {a.public_key: a for a in dev.activity()}
        assert dev.info() == full.info
    assert set(activity) == {p.public_key for p in full.peers}
    for p in full.peers:
        a = activity[p.public_key]
        assert a.persistent_keepalive == p.persistent_keepalive
        assert a.rx_bytes >= p.rx_bytes
        if p.last_handshake is None:
            assert a.last_handshake is None
        else:
            assert a.last_handshake >= p.last_handshake.timestamp() - 0.001


def test_cap_evicts_the_least_recently_active_first(lab_factory) -> None:
    lab = lab_factory(gateways=["jit"], clients=3, registry="yes", idle_timeout=300,
                      evict_interval=EVICT_EVERY, daemon_args={GW: ["--max-peers", "2"]})
    c1, c2, c3 = (lab.client(n) for n in ("c1", "c2", "c3"))
    for name in ("c1", "c2"):
        lab.connect(name, fresh=True)
        assert first_reply_after_start(lab, name) < JIT_CONNECT_LIMIT
    lab.disconnect("c1")
    time.sleep(2 * EVICT_EVERY + 0.5)  # passes see c1 quiet, c2 busy
    lab.connect("c3", fresh=True)
    assert first_reply_after_start(lab, "c3") < JIT_CONNECT_LIMIT
    [ev] = wait_for(lambda: key_events(lab, GW, c1.public_key, "peer_evicted"), 5,
                    "c1 evicted at the cap")
    assert ev["reason"] == "cap"
    time.sleep(3 * EVICT_EVERY)
    assert set(installed(lab, GW)) == {c2.public_key, c3.public_key}
    assert key_events(lab, GW, c2.public_key, "peer_evicted") == []
    assert key_events(lab, GW, c3.public_key, "peer_evicted") == []
