"""Two registry servers over one database, a gateway given both, one server killed.

Registry servers 1 and 2 (gunicorn, `wgjit registry serve`) run in two
namespaces over the same SQLite file (the namespaces share the filesystem);
the JIT gateway is given both, server 1 first. Server 1 is killed with
SIGKILL, master and workers. Clients the gateway never saw still connect just
in time (server 2 answers in the same pull), a revocation made through server
2 reaches the gateway within two feed polls without a reconcile (one feed_id:
the cursor carries over), and once server 1 serves again the gateway's probe
finds it and lookups go back to it. Then server 1 hangs (SIGSTOP: connections
accepted, never answered): one pull waits out --registry-timeout once and is
answered by server 2, the next ones skip server 1.
tests/unit/test_registry_failover.py covers the same logic with a fake
transport, including resets, 5xx and 429.
"""

from __future__ import annotations

import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.registry.fastpath import RULE as LOOKUP_ROUTE
from lab import procs
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
# The default period: long beside a pull, so the pull right after the kill is
# what finds server 1 dead (the test kills it just after a poll).
FEED_EVERY = 5.0
# Short, so that a hung server costs well under the client's 5 s retry.
REGISTRY_TIMEOUT = 1.0
LAB_SPEC = {"gateways": ["jit"], "clients": 6, "registry": "yes", "registries": 2,
            "idle_timeout": 120, "evict_interval": 0.5,
            "daemon_args": {GW: ["--feed-interval", f"{FEED_EVERY:g}",
                                 "--registry-timeout", f"{REGISTRY_TIMEOUT:g}"]}}


def metric(lab: Lab, name: str, **labels: str) -> float:
    return lab.metrics(GW).value(name, **labels)


def lookups_served(lab: Lab, server: int) -> float:
    """Gateway peer lookups registry server `server` answered (its own counters)."""
    text = lab.registry(server).metrics_text()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "wgjit_registry_requests_total"
               and s.labels.get("route") == LOOKUP_ROUTE)


def connect_in_time(lab: Lab, name: str, limit: float = JIT_CONNECT_LIMIT) -> None:
    lab.connect(name, fresh=True)
    assert first_reply_after_start(lab, name) < limit, f"{name} waited for its own retry"
    assert key_events(lab, GW, lab.client(name).public_key,
                      "peer_pulled")[-1]["source"] == "registry"


def test_two_servers_one_killed(lab: Lab) -> None:
    s1, s2 = lab.state.registries
    assert s1.db == s2.db and s1.ns != s2.ns and s1.url != s2.url
    c1, c2, c3, c4 = (lab.client(n) for n in ("c1", "c2", "c3", "c4"))
    wait_for(lambda: lab.health(GW)[1]["feed"] == "ok", 10, "the feed's first poll")

    # Both up: server 1 is preferred.
    served1 = lookups_served(lab, 1)
    connect_in_time(lab, "c1")
    assert lookups_served(lab, 1) == served1 + 1
    assert lookups_served(lab, 2) == 0
    status, health = lab.health(GW)
    assert [(s["url"], s["up"]) for s in health["registry_servers"]] == \
        [(s1.url, True), (s2.url, True)]
    assert metric(lab, "wgjit_gateway_registry_up", server=s1.url) == 1
    reconciles = metric(lab, "wgjit_gateway_reconciles_total")
    feed_errors = metric(lab, "wgjit_gateway_feed_errors_total")

    polls = metric(lab, "wgjit_gateway_feed_polls_total")
    wait_for(lambda: metric(lab, "wgjit_gateway_feed_polls_total") > polls,
             3 * FEED_EVERY, "a feed poll")
    lab.stop_registry(1, signal.SIGKILL)
    assert not lab.registry(1).healthy()

    # A client the gateway never saw: its pull finds server 1 dead and is answered
    # by server 2 in the same pull, without waiting for the client's 5 s retry.
    connect_in_time(lab, "c2")
    names = [(e["event"], e.get("public_key")) for e in lab.events(GW)]
    assert names.index(("identity_recovered", c2.public_key)) \
        < names.index(("registry_server_down", None)) \
        < names.index(("peer_pulled", c2.public_key))
    # The next one goes straight to server 2.
    connect_in_time(lab, "c3")
    assert lookups_served(lab, 2) == 2
    assert metric(lab, "wgjit_gateway_registry_up", server=s1.url) == 0
    assert metric(lab, "wgjit_gateway_registry_up", server=s2.url) == 1
    assert metric(lab, "wgjit_gateway_registry_failovers_total") == 1
    assert metric(lab, "wgjit_gateway_registry_server_failures_total", server=s1.url) >= 1
    status, health = lab.health(GW)
    assert status == 200 and health["registry"] == "ok", health
    [h1, h2] = health["registry_servers"]
    assert (h1["url"], h1["up"], h2["url"], h2["up"]) == (s1.url, False, s2.url, True)
    assert h1["last_error"]
    [down] = [e for e in lab.events(GW) if e["event"] == "registry_server_down"]
    assert down["server"] == s1.url

    # A revocation through the surviving server reaches the gateway within two polls.
    assert c1.public_key in installed(lab, GW)
    lab.registry(2).revoke_peer(c1.public_key)
    polls = metric(lab, "wgjit_gateway_feed_polls_total")

    def removed_at_poll() -> float | None:
        gone = c1.public_key not in installed(lab, GW)  # the device first, then the count
        return metric(lab, "wgjit_gateway_feed_polls_total") if gone else None

    at = wait_for(removed_at_poll, 30 * FEED_EVERY, "c1 removed after its revocation")
    # A poll in flight at the revocation may miss it; the next one started after it.
    # (One more for a poll that may start between our two reads.)
    assert at <= polls + 2, (at, polls)
    [ev] = [e for e in key_events(lab, GW, c1.public_key, "peer_evicted")]
    assert ev["reason"] == "revoked"
    assert metric(lab, "wgjit_gateway_reconciles_total") == reconciles, \
        "the cursor carried over to server 2: no reconcile"
    assert metric(lab, "wgjit_gateway_feed_errors_total") == feed_errors, \
        "no feed poll failed: each one failed over within itself"
    # The others kept their tunnels.
    assert {c2.public_key, c3.public_key} <= set(installed(lab, GW))
    n = len(replies(lab, "c2"))
    wait_for(lambda: len(replies(lab, "c2")) > n + 1, 5, "c2 still pinging")

    # Server 1 serves again: the probe finds it, and it is preferred again.
    lab.restart_registry(1)
    wait_for(lambda: metric(lab, "wgjit_gateway_registry_up", server=s1.url) == 1, 40,
             "the probe finding server 1 back")
    assert [s["up"] for s in lab.health(GW)[1]["registry_servers"]] == [True, True]
    served2 = lookups_served(lab, 2)
    connect_in_time(lab, "c4")
    assert lookups_served(lab, 1) == 1  # a fresh server counts from 0
    assert lookups_served(lab, 2) == served2
    assert procs.alive(lab.gateway(GW).daemon_pid)


def test_a_hung_server_costs_one_timeout(lab: Lab) -> None:
    """Server 1 stops answering but still accepts connections (SIGSTOP): the
    pull waits out --registry-timeout once, then server 2 answers it."""
    s1 = lab.state.registries[0]
    c5 = lab.client("c5")
    wait_for(lambda: [s["up"] for s in lab.health(GW)[1]["registry_servers"]] == [True, True],
             40, "both servers up")
    failovers = metric(lab, "wgjit_gateway_registry_failovers_total")
    polls = metric(lab, "wgjit_gateway_feed_polls_total")
    wait_for(lambda: metric(lab, "wgjit_gateway_feed_polls_total") > polls,
             3 * FEED_EVERY, "a feed poll")
    lab.pause_registry(1)
    try:
        # One timeout, then the answer, and the install: still before the 5 s retry.
        connect_in_time(lab, "c5", REGISTRY_TIMEOUT + JIT_CONNECT_LIMIT)
        names = [(e["event"], e.get("public_key")) for e in lab.events(GW)]
        downs = [i for i, n in enumerate(names) if n == ("registry_server_down", None)]
        assert names.index(("identity_recovered", c5.public_key)) < downs[-1] \
            < names.index(("peer_pulled", c5.public_key))
        assert "timed out" in lab.events(GW)[downs[-1]]["error"]
        assert metric(lab, "wgjit_gateway_registry_failovers_total") == failovers + 1
        assert metric(lab, "wgjit_gateway_registry_up", server=s1.url) == 0
        # The next client does not wait on the hung server at all.
        connect_in_time(lab, "c6")
        assert metric(lab, "wgjit_gateway_registry_failovers_total") == failovers + 1
    finally:
        lab.pause_registry(1, pause=False)
    wait_for(lambda: metric(lab, "wgjit_gateway_registry_up", server=s1.url) == 1, 40,
             "the probe finding server 1 answering again")
