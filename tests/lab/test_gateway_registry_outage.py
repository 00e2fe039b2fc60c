"""The gateway daemon while the registry is down, and after it returns.

The registry (gunicorn) is stopped outright, so every pull fails at once with
a refused connection. The positive TTL is 1 s, so a known client's entry is
stale by the time it comes back: it is let in only because stale entries are
served while the registry cannot answer (stale-if-error), not because the cache
was still fresh.
"""

from __future__ import annotations

import json

import pytest

from appliance.gateway.cache import FEED_WINDOW_POLLS
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
FEED_INTERVAL = 0.25
LAB_SPEC = {"gateways": ["jit"], "clients": 3, "registry": "yes",
            "idle_timeout": 2, "evict_interval": 0.5,
            "daemon_args": {GW: ["--positive-ttl", "1", "--feed-interval", str(FEED_INTERVAL)]}}


def lookups(lab: Lab, outcome: str) -> float:
    return lab.metrics(GW).value("wgjit_gateway_cache_lookups_total", outcome=outcome)


def test_registry_outage_and_return(lab: Lab) -> None:
    c1, c2, c3 = (lab.client(n) for n in ("c1", "c2", "c3"))
    g = lab.gateway(GW)

    # Before the outage c1 connects once, goes quiet and is evicted.
    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    assert key_events(lab, GW, c1.public_key, "peer_pulled")[-1]["source"] == "registry"
    lab.disconnect("c1")
    wait_for(lambda: key_events(lab, GW, c1.public_key, "peer_evicted"), 10, "c1 evicted")
    assert c1.public_key not in installed(lab, GW)

    lab.stop_registry()
    try:
        assert not lab.registry().healthy()
        stale_before, errors_before = lookups(lab, "stale"), lab.metrics(GW).value(
            "wgjit_gateway_registry_errors_total")

        # While the feed was followed a cached peer stays valid past its TTL
        # (cache.py); once the feed has been silent for its window, only the
        # stale-if-error rule serves it.
        window = FEED_WINDOW_POLLS * FEED_INTERVAL
        wait_for(lambda: (json.loads(lab.status(GW, as_json=True))["feed"]
                          ["caught_up_seconds_ago"] or 0) > window + 0.5, window + 10,
                 "the feed window to lapse")

        # The cached client still gets in, from the stale entry, without the retry.
        lab.connect("c1", fresh=True)
        assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
        assert key_events(lab, GW, c1.public_key, "peer_pulled")[-1]["source"] == "stale"
        assert lookups(lab, "stale") == stale_before + 1
        assert lab.metrics(GW).value("wgjit_gateway_registry_errors_total") > errors_before

        # A registered client this gateway never saw has nothing to be served from.
        lab.connect("c2", fresh=True)
        [unknown] = wait_for(lambda: key_events(lab, GW, c2.public_key, "peer_unknown"), 5,
                             "peer_unknown for c2")
        assert unknown["reason"] == "unavailable"
        assert c2.public_key not in installed(lab, GW)
        assert replies(lab, "c2") == []

        # The daemon is up and says what is wrong.
        status, body = lab.health(GW)
        assert status == 200, body
        assert body["registry"] == "unavailable"
        assert procs.alive(g.daemon_pid)
        # c1 still pings through all this.
        n = len(replies(lab, "c1"))
        wait_for(lambda: len(replies(lab, "c1")) > n + 2, 5, "c1 still pinging")
    finally:
        lab.restart_registry()

    # Back: a client new to this gateway connects at once, pulled from the registry.
    lab.connect("c3", fresh=True)
    assert first_reply_after_start(lab, "c3") < JIT_CONNECT_LIMIT
    assert key_events(lab, GW, c3.public_key, "peer_pulled")[-1]["source"] == "registry"
    # c2 kept retrying every REKEY_TIMEOUT; "unavailable" was not remembered as a
    # "no", so its next retry gets it in.
    wait_for(lambda: replies(lab, "c2"), 12, "c2 in after the registry returned")
    assert key_events(lab, GW, c2.public_key, "peer_pulled")[-1]["source"] == "registry"
    wait_for(lambda: lab.health(GW)[1]["registry"] == "ok", 5, "healthz: registry ok")
    assert procs.alive(g.daemon_pid)
