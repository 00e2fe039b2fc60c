"""A client moving between two just-in-time gateways.

Each gateway has its own key, so moving means the client replaces its peer (key
and endpoint) with `wg set`: a new session with the new gateway. The old gateway
keeps the peer until its eviction pass finds it idle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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

LAB_SPEC = {"gateways": ["jit", "jit"], "clients": 1, "client_gateways": ["g1"],
            "registry": "yes", "idle_timeout": 3, "evict_interval": 0.5}


def test_client_moves_to_another_gateway(lab: Lab) -> None:
    c = lab.client("c1")
    a, b = lab.gateway("g1"), lab.gateway("g2")

    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    assert c.public_key in installed(lab, "g1")
    assert c.public_key not in installed(lab, "g2")

    lab.move("c1", "g2")
    assert c.gateway == "g2"
    lab.connect("c1")
    # At once on B: B pulled and installed it from B's own first initiation.
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    assert installed(lab, "g2")[c.public_key].endpoint.startswith(c.underlay4 + ":")
    assert key_events(lab, "g2", c.public_key, "peer_installed")
    # The replies come from B's tunnel address, not A's.
    log = Path(c.ping_log).read_text()
    assert f"from {b.tunnel4_ip}:" in log and f"from {a.tunnel4_ip}:" not in log

    # A no longer hears from the client and evicts it as idle ...
    [evicted] = wait_for(lambda: key_events(lab, "g1", c.public_key, "peer_evicted"), 15,
                         "eviction from g1")
    assert evicted["reason"] == "idle"
    assert c.public_key not in installed(lab, "g1")
    # ... while B, which the client keeps talking to, holds it: pings go on for 3 s
    # more, past the idle timeout since B's handshake, so only the traffic keeps it.
    n = len(replies(lab, "c1"))
    wait_for(lambda: len(replies(lab, "c1")) > n + 15, 10, "c1 still pinging via g2")
    assert c.public_key in installed(lab, "g2")
    assert not key_events(lab, "g2", c.public_key, "peer_evicted")
