"""/metrics counts peers from a cache: scrapes, which need no token, cannot make
the registry scan the peers table back to back."""

from __future__ import annotations

from appliance.registry import metrics
from tests.registry.conftest import new_key


def peers_gauge(client) -> str:
    text = client.get("/metrics").get_data(as_text=True)
    return next(line for line in text.splitlines()
                if line.startswith('wgjit_registry_peers{state="active"}'))


def test_scrapes_within_the_ttl_scan_once(app, client, admin, tenant, monkeypatch):
    store = app.extensions["wgjit_store"]
    scans = []
    real = store.stats

    def counted():
        scans.append(1)
        return real()

    monkeypatch.setattr(store, "stats", counted)
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    assert peers_gauge(client).endswith(" 0.0")
    body = {"tenant": tenant, "public_key": new_key(), "allowed_ips": ["198.18.0.2/32"]}
    assert client.post("/v1/peers", json=body, headers=admin).status_code == 201
    for _ in range(5):
        assert peers_gauge(client).endswith(" 0.0")  # cached
    assert len(scans) == 1
    now[0] += metrics.STATS_TTL
    assert peers_gauge(client).endswith(" 1.0")
    assert len(scans) == 2
