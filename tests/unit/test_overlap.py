"""The gateway's overlap guard (appliance/gateway/overlap.py) and its hook in the
installer, against an in-memory device. The same refusal runs against real
wireguard-go and a registry database written behind the API's back in
tests/lab/test_gateway_overlap.py."""

from __future__ import annotations

import ipaddress
import json
import logging
import random

import pytest

from appliance.gateway import overlap
from appliance.gateway.events import JsonFormatter
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.overlap import LOG_EVERY, OverlapGuard, OverlapRefused
from appliance.gateway.pull import RegistryPeer
from tests.unit.test_evict import FakeDevice, key, sample

A, B, C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="


@pytest.mark.parametrize("held,new,clash", [
    ("198.18.1.2/32", "198.18.1.2/32", True),      # the same network
    ("198.18.1.2/32", "198.18.1.0/24", True),      # new covers held (held starts inside)
    ("198.18.1.0/24", "198.18.1.2/32", True),      # held covers new (a supernet)
    ("198.18.1.0/24", "198.18.1.0/25", True),      # same start, narrower
    ("198.18.1.0/25", "198.18.1.0/24", True),      # same start, wider
    ("198.18.1.0/25", "198.18.1.128/25", False),   # neighbours
    ("0.0.0.0/0", "203.0.113.9/32", True),
    ("fd00::/64", "fd00::1/128", True),
    ("fd00::1/128", "::/0", True),
    ("fd00::/64", "fd00:0:0:1::/64", False),
    ("198.18.0.0/15", "fd00::/8", False),         # families never overlap
    ("::/96", "0.0.0.0/0", False),
])
def test_clash(held, new, clash):
    g = OverlapGuard()
    g.hold(A, [held])
    found = g.clash(B, [new])
    assert (found is not None) == clash
    if clash:
        assert (found.public_key, found.network, found.other_key) == (B, new, A)
        assert found.other_network == str(ipaddress.ip_network(held))
    assert g.clash(A, [new]) is None  # a peer's own networks never count


def test_release_and_replace():
    g = OverlapGuard()
    g.hold(A, ["198.18.1.2/32", "fd00::1:2/128"])
    g.hold(B, ["198.18.2.0/24"])
    assert g.clash(C, ["fd00::1:0/112"]).other_key == A
    g.hold(A, ["198.18.3.0/24"])  # an update: the old networks are gone
    assert g.clash(C, ["fd00::1:0/112"]) is None and g.clash(C, ["198.18.3.9/32"]) is not None
    g.release([A, "never-held"])
    assert g.clash(C, ["198.18.0.0/16"]).other_key == B
    g.release([B])
    assert g.clash(C, ["0.0.0.0/0", "::/0"]) is None and len(g) == 0
    g.hold(C, None)  # adopted: networks unknown, nothing held
    assert g.clash(A, ["0.0.0.0/0"]) is None


def test_exact_even_when_held_networks_overlap_each_other():
    # Adopted peers learn their networks later; the registry may have let an
    # overlap through before. The check must not rely on held ranges being disjoint.
    g = OverlapGuard()
    g.hold(A, ["198.18.0.0/16"])
    g.hold(B, ["198.18.1.0/24"])
    assert g.clash(C, ["198.18.200.1/32"]).other_key == A
    assert {g.clash(C, ["198.18.1.7/32"]).other_key} <= {A, B}


def test_matches_brute_force():
    rng = random.Random(12)
    g = OverlapGuard()
    held: dict[str, list[ipaddress.IPv4Network]] = {}
    for i in range(300):
        p = rng.choice([18, 20, 24, 28, 32])
        addr = int(ipaddress.IPv4Address("198.18.0.0")) + rng.randrange(1 << 17)
        n = ipaddress.ip_network((addr, p), strict=False)
        k = f"k{i}"
        expect = any(n.overlaps(m) for nets in held.values() for m in nets)
        assert (g.clash(k, [str(n)]) is not None) == expect, n
        if not expect:
            g.hold(k, [str(n)])
            held[k] = [n]
        if i % 7 == 0 and held:
            gone = rng.choice(sorted(held))
            g.release([gone])
            del held[gone]


def test_refusals_are_counted_every_time_and_logged_rate_limited(caplog):
    now = [100.0]
    counted: list[OverlapRefused] = []
    g = OverlapGuard(counted.append, clock=lambda: now[0])
    g.hold(A, ["198.18.1.2/32"])
    e = g.clash(B, ["198.18.1.2/32"])
    with caplog.at_level(logging.WARNING, logger="wgjit.events"):
        g.refuse(e)
        now[0] += 5  # the client's retry
        g.refuse(e)
        now[0] += LOG_EVERY
        g.refuse(e)
    assert len(counted) == 3
    logged = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert len(logged) == 2
    assert logged[0]["event"] == "peer_refused" and logged[0]["reason"] == overlap.DROP_REASON
    assert logged[0]["public_key"] == B and logged[0]["overlaps_key"] == A
    assert logged[0]["network"] == logged[0]["overlaps_network"] == "198.18.1.2/32"


# The hook in the installer: refused installs and updates leave the device alone.

def installer() -> tuple[Installer, FakeDevice, GatewayMetrics]:
    dev, metrics = FakeDevice(), GatewayMetrics()
    inst = Installer(dev, overlaps=OverlapGuard(
        lambda _e: metrics.drops.labels(overlap.DROP_REASON).inc()))
    return inst, dev, metrics


def test_installer_refuses_an_overlapping_peer_and_keeps_the_first():
    inst, dev, metrics = installer()
    first, evil = key(), key()
    assert sample(metrics.drops, reason="overlap") == 0  # the series exists from the start
    assert inst.install(RegistryPeer(first, ("198.18.1.2/32", "fd00::1:2/128"), None),
                        "192.0.2.10:40000")
    with pytest.raises(OverlapRefused) as e:
        inst.install(RegistryPeer(evil, ("198.18.9.9/32", "fd00::/64"), None), "192.0.2.66:1")
    assert e.value.other_key == first and e.value.network == "fd00::/64"
    assert evil not in dev.table and evil not in inst
    assert [str(n) for n in dev.table[first].allowed_ips] == ["198.18.1.2/32", "fd00::1:2/128"]
    assert sample(metrics.drops, reason="overlap") == 1
    # Once the first peer is gone (evicted), the other may come in.
    inst.remove([first])
    assert inst.install(RegistryPeer(evil, ("198.18.9.9/32", "fd00::/64"), None), "192.0.2.66:1")


def test_installer_refuses_an_update_into_another_peers_network():
    inst, dev, metrics = installer()
    first, second = key(), key()
    inst.install(RegistryPeer(first, ("198.18.1.2/32",), None), "192.0.2.10:40000")
    inst.install(RegistryPeer(second, ("198.18.1.3/32",), None), "192.0.2.11:40000")
    assert not inst.update(RegistryPeer(second, ("198.18.1.0/30",), None))
    assert [str(n) for n in dev.table[second].allowed_ips] == ["198.18.1.3/32"]
    assert sample(metrics.drops, reason="overlap") == 1
    assert inst.update(RegistryPeer(second, ("198.18.1.4/30",), None))
    # The released /32 is free for a third peer; the new /30 is not.
    assert inst.install(RegistryPeer(key(), ("198.18.1.3/32",), None), "192.0.2.12:1")
    with pytest.raises(OverlapRefused):
        inst.install(RegistryPeer(key(), ("198.18.1.5/32",), None), "192.0.2.13:1")


def test_peers_that_vanish_from_the_device_release_their_networks():
    inst, dev, _ = installer()
    first = key()
    inst.install(RegistryPeer(first, ("198.18.1.2/32",), None), "192.0.2.10:40000")
    dev.table.clear()  # removed by hand
    assert inst.forget_missing(set(), dumped_at=1e12) == [first]
    assert inst.install(RegistryPeer(key(), ("198.18.1.2/32",), None), "192.0.2.11:1")
