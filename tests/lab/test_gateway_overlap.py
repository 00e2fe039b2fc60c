"""Tenant isolation on the gateway (issue 12): a peer whose networks overlap an
installed peer's is refused, whatever the registry says.

The registry refuses such a peer through its API (tests/registry/test_isolation.py),
so here it is written straight into the registry's SQLite database, as a bug,
an old database or someone with file access could: c2 moves to tenant "evil"
and takes c1's exact networks. The real gateway daemon (wireguard-go, the real
registry under gunicorn) must refuse to install c2, count the drop and log it,
while c1's client keeps pinging through the tunnel.
"""

from __future__ import annotations

import sqlite3

import pytest

from appliance.registry import cidr
from lab.topology import Lab
from tests.lab.gateway_e2e import installed, key_events, quiet_all, replies, wait_for

pytestmark = [pytest.mark.lab]

LAB_SPEC = {"gateways": ["jit"], "clients": 2, "registry": "yes",
            # Nobody goes idle within the test.
            "idle_timeout": 120, "evict_interval": 1}
GW = "g1"


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab):
    yield
    quiet_all(lab)


def take_networks(db: str, public_key: str, tenant: str, networks: list[str]) -> None:
    """Behind the API's back: move a peer to `tenant` and give it `networks`."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?, '2026-01-01')",
                     (tenant,))
        (tid,) = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
        (pid,) = conn.execute("SELECT id FROM peers WHERE public_key = ?",
                              (public_key,)).fetchone()
        conn.execute("UPDATE peers SET tenant_id = ? WHERE id = ?", (tid, pid))
        conn.execute("DELETE FROM allowed_ips WHERE peer_id = ?", (pid,))
        for position, text in enumerate(networks):
            n = cidr.parse(text)
            conn.execute("INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family,"
                         " lo, hi) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (pid, tid, position, n.cidr, n.family, n.lo, n.hi))
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_gateway_refuses_a_peer_overlapping_another_tenants(lab: Lab) -> None:
    c1, c2 = lab.client("c1"), lab.client("c2")
    before = lab.metrics(GW)

    lab.connect("c1", fresh=True)
    wait_for(lambda: replies(lab, "c1"), 10, "c1's first reply through the tunnel")
    wait_for(lambda: c1.public_key in installed(lab, GW), 5, "c1 on the gateway")

    theirs = [c1.tunnel4, c1.tunnel6]
    take_networks(lab.state.registry.db, c2.public_key, "evil", theirs)
    served = lab.registry().gateway_peer(c2.public_key)
    assert served is not None and served["tenant"] == "evil"
    assert served["allowed_ips"] == [cidr.parse(n).cidr for n in theirs]

    lab.connect("c2", fresh=True)
    refused = wait_for(lambda: key_events(lab, GW, c2.public_key, "peer_refused"), 15,
                       "the gateway refusing c2")
    assert refused[0]["reason"] == "overlap"
    assert refused[0]["overlaps_key"] == c1.public_key
    now = lab.metrics(GW)
    assert now.value("wgjit_gateway_drops_total", reason="overlap") \
        - before.value("wgjit_gateway_drops_total", reason="overlap") >= 1
    assert now.value("wgjit_gateway_installs_total") \
        - before.value("wgjit_gateway_installs_total") == 1  # c1 only

    # c2's retries (every 5 s) are refused too; meanwhile c1 keeps its networks
    # and its ping keeps getting replies through the tunnel.
    seen = len(replies(lab, "c1"))
    wait_for(lambda: len(replies(lab, "c1")) >= seen + 6, 15, "c1's replies to go on")
    wait_for(lambda: now.value("wgjit_gateway_drops_total", reason="overlap")
             < lab.metrics(GW).value("wgjit_gateway_drops_total", reason="overlap"),
             15, "c2's retry refused again")
    peers = installed(lab, GW)
    assert c2.public_key not in peers
    assert sorted(str(n) for n in peers[c1.public_key].allowed_ips) == \
        sorted(cidr.parse(n).cidr for n in theirs)
    assert not key_events(lab, GW, c2.public_key, "peer_installed")
    # Logged once, not once per retry.
    assert len(key_events(lab, GW, c2.public_key, "peer_refused")) == 1
    assert lab.ping("c1")
