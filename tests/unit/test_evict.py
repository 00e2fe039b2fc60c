"""Eviction policy and pass bookkeeping, against an in-memory device.

The same paths run against real wireguard-go in tests/lab/test_housekeeping.py
(idle eviction, adoption after kill -9) and bench/evict.py (50,000 peers).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import pytest

from appliance.gateway.evict import REMOVE_BATCH, EvictionPolicy, Evictor
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import RegistryPeer
from appliance.keys import encode_key
from appliance.wg import Peer, PeerConfig, WgDevice
from appliance.wg.model import DeviceDump, DeviceInfo

T0 = time.time()  # "now" for the policy (installs stamp the real clock)


def key() -> str:
    return encode_key(os.urandom(32))


def hs(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class FakeDevice(WgDevice):
    """Peers in a dict; counts reads and remove transactions."""

    backend = "fake"

    def __init__(self) -> None:
        super().__init__("fake0")
        self.table: dict[str, Peer] = {}
        self.dumps = 0
        self.removals: list[list[str]] = []
        self.during_dump = None  # called while "reading" (to race an install)

    def dump(self) -> DeviceDump:
        self.dumps += 1
        snapshot = tuple(self.table.values())
        if self.during_dump:
            self.during_dump()
        return DeviceDump(DeviceInfo("fake0", "fake", None, None, 51820), snapshot)

    def configure(self, **kw: object) -> None:
        pass

    def set_peers(self, peers: Iterable[PeerConfig], *, update_only: bool = False) -> None:
        for cfg in peers:
            old = self.table.get(cfg.public_key)
            if old is None and update_only:
                continue
            old = old or Peer(cfg.public_key)
            self.table[cfg.public_key] = Peer(
                cfg.public_key,
                allowed_ips=cfg.allowed_ips if cfg.allowed_ips is not None else old.allowed_ips,
                endpoint=cfg.endpoint or old.endpoint,
                preshared_key=cfg.preshared_key or old.preshared_key,
                persistent_keepalive=(cfg.persistent_keepalive
                                      if cfg.persistent_keepalive is not None
                                      else old.persistent_keepalive),
                last_handshake=old.last_handshake, rx_bytes=old.rx_bytes)

    def remove_peers(self, public_keys: Iterable[str]) -> None:
        keys = list(public_keys)
        self.removals.append(keys)
        for k in keys:
            self.table.pop(k, None)

    # test helpers
    def put(self, k: str, *, handshake: float | None = None, rx: int = 0,
            keepalive: int = 0) -> None:
        self.table[k] = Peer(k, last_handshake=hs(handshake) if handshake else None,
                             rx_bytes=rx, persistent_keepalive=keepalive)

    def traffic(self, k: str, rx: int) -> None:
        p = self.table[k]
        self.table[k] = Peer(k, last_handshake=p.last_handshake, rx_bytes=p.rx_bytes + rx,
                             persistent_keepalive=p.persistent_keepalive)


def sample(metric, **labels) -> float:
    return metric.labels(**labels)._value.get() if labels else metric._value.get()


@pytest.fixture
def dev() -> FakeDevice:
    return FakeDevice()


def make(dev: FakeDevice, *, idle: float = 300, grace: float = 15, cap: int = 0,
         on_evict=None) -> tuple[Evictor, Installer, GatewayMetrics]:
    inst = Installer(dev)
    metrics = GatewayMetrics()
    return Evictor(inst, EvictionPolicy(idle, grace, cap), metrics, on_evict), inst, metrics


def test_idle_peer_goes_and_a_fresh_one_stays(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev, idle=60)
    stale, fresh = key(), key()
    dev.put(stale, handshake=T0 - 400)
    dev.put(fresh, handshake=T0 - 10)
    inst.adopt()
    # First sight counts as activity (after a restart we cannot know better) ...
    assert ev.choose(dev.activity(), T0) == {}
    # ... so the stale one goes one idle timeout later, the fresh one too by then.
    assert ev.choose(dev.activity(), T0 + 59) == {}
    assert ev.choose(dev.activity(), T0 + 61) == {stale: "idle", fresh: "idle"}


def test_received_bytes_keep_a_peer_between_handshakes(dev: FakeDevice) -> None:
    # Handshakes come only every REKEY_AFTER_TIME under traffic; a shorter
    # timeout must look at rx_bytes or it would evict a client mid-transfer.
    ev, inst, _ = make(dev, idle=30)
    busy, quiet = key(), key()
    dev.put(busy, handshake=T0, rx=100)
    dev.put(quiet, handshake=T0, rx=100)
    inst.adopt()
    for t in range(0, 100, 10):
        dev.traffic(busy, 64)
        chosen = ev.choose(dev.activity(), T0 + t)
        if quiet in chosen:
            break
    assert chosen == {quiet: "idle"}
    assert T0 + t - T0 > 30  # not before the timeout
    dev.traffic(busy, 64)
    assert busy not in ev.choose(dev.activity(), T0 + 200)


def test_never_handshaken_after_grace_counts_from_install(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev, grace=15)
    k = key()
    inst.install(RegistryPeer(k, ("198.18.1.1/32",), None), "192.0.2.50:40000")
    at = inst.get(k).installed_at
    assert ev.choose(dev.activity(), at + 14) == {}
    assert ev.choose(dev.activity(), at + 16) == {k: "never_handshaken"}


def test_cap_removes_the_least_recently_active_first(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev, idle=1000, cap=3)
    keys = [key() for _ in range(5)]
    for i, k in enumerate(keys):
        dev.put(k, handshake=T0 - 500 + i, rx=1)
    inst.adopt()
    ev.choose(dev.activity(), T0 - 600)  # first sight, long ago
    for k in keys[2:]:
        dev.traffic(k, 1)  # the last three are active now
    assert ev.choose(dev.activity(), T0) == {keys[0]: "cap", keys[1]: "cap"}


def test_cap_counts_pending_installs_by_install_time(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev, idle=1000, cap=1, grace=100)
    old = key()
    dev.put(old, handshake=T0 - 50, rx=1)
    inst.adopt()
    ev.choose(dev.activity(), T0 - 50)
    new = key()
    inst.install(RegistryPeer(new, ("198.18.1.2/32",), None), "192.0.2.50:40000")
    # The new install (no handshake yet, within grace) is more recent than the old peer.
    assert ev.choose(dev.activity(), inst.get(new).installed_at + 1) == {old: "cap"}


def test_a_pass_reads_once_removes_in_batches_and_reports(dev: FakeDevice) -> None:
    removed: list[tuple[str, str]] = []
    ev, inst, metrics = make(dev, grace=0.001, on_evict=lambda k, r: removed.append((k, r)))
    n = 2 * REMOVE_BATCH + 17
    for _ in range(n):
        dev.put(key())  # adopted by the pass itself, never handshaken
    keep = key()
    dev.put(keep, handshake=T0)
    result = ev.run_pass()  # adoption: installed_at = now, within grace
    assert result["evicted"] == 0 and len(inst) == n + 1
    time.sleep(0.01)
    dev.dumps = 0
    result = ev.run_pass()
    assert dev.dumps == 1, "one device read per pass"
    assert result["evicted"] == n and result["peers"] == n + 1
    assert [len(b) for b in dev.removals] == [REMOVE_BATCH, REMOVE_BATCH, 17]
    assert set(dev.table) == {keep} and len(inst) == 1
    assert len(removed) == n and {r for _, r in removed} == {"never_handshaken"}
    assert sample(metrics.evictions, reason="never_handshaken") == n
    assert sample(metrics.installed) == 1


def test_a_pass_adopts_strangers_from_its_own_read(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev)
    k = key()
    dev.put(k, handshake=T0)
    ev.run_pass()
    assert k in inst and inst.get(k).adopted
    assert inst.get(k).allowed_ips is None  # not in the cheap read: the feed fills it in
    assert dev.dumps == 1


def test_a_peer_installed_during_the_dump_is_not_forgotten(dev: FakeDevice) -> None:
    ev, inst, _ = make(dev)
    late = key()
    dev.during_dump = lambda: inst.install(RegistryPeer(late, ("198.18.1.3/32",), None),
                                           "192.0.2.50:40000")
    ev.run_pass()
    dev.during_dump = None
    assert late in inst, "forgetting it would lose its trigger bookkeeping"
    # A peer removed by hand (gone from the device, installed before the dump) is forgotten.
    dev.table.pop(late)
    ev.run_pass()
    assert late not in inst


def test_reinstall_soon_after_a_policy_eviction_counts_as_thrash(dev: FakeDevice) -> None:
    ev, inst, metrics = make(dev)
    a, b = key(), key()
    dev.put(a, handshake=T0)
    dev.put(b, handshake=T0)
    inst.adopt()
    inst.remove([a, b])
    ev.removed_elsewhere(a, "cap")
    ev.removed_elsewhere(b, "revoked")
    ev.note_install(a)
    ev.note_install(b)  # restored after a revocation: not the policy's doing
    ev.note_install(a)  # counted once per eviction
    assert sample(metrics.reinstalls, reason="cap") == 1
    assert sample(metrics.reinstalls, reason="idle") == 0
    assert sample(metrics.evictions, reason="revoked") == 1
    text = metrics.exposition().decode()
    assert 'wgjit_gateway_reinstalls_after_eviction_total{reason="cap"} 1.0' in text
    assert 'wgjit_gateway_evictions_total{reason="idle"} 0.0' in text


def test_adoption_keeps_a_leftover_trigger_keepalive_pending(dev: FakeDevice) -> None:
    # Killed between install and clearing the trigger: the keepalive would make the
    # device rekey forever and the peer never look idle.
    inst = Installer(dev)
    live, plain = key(), key()
    dev.put(live, handshake=T0, keepalive=25)
    dev.put(plain, handshake=T0)
    assert sorted(inst.adopt()) == sorted([live, plain])
    assert inst.pending_triggers() == [live]
    inst.handshake_done([live])
    assert dev.table[live].persistent_keepalive == 0
    assert inst.pending_triggers() == []


def test_differs_compares_normalised_networks_and_psk(dev: FakeDevice) -> None:
    inst = Installer(dev)
    k = key()
    psk = encode_key(os.urandom(32))
    inst.install(RegistryPeer(k, ("198.18.1.4/32", "fd00::1:4/128"), psk), "192.0.2.50:1")
    assert not inst.differs(RegistryPeer(k, ("fd00::1:4/128", "198.18.1.4/32"), psk))
    assert inst.differs(RegistryPeer(k, ("198.18.1.4/32",), psk))
    assert inst.differs(RegistryPeer(k, ("198.18.1.4/32", "fd00::1:4/128"), None))
    assert not inst.differs(RegistryPeer(key(), ("198.18.1.9/32",), None))  # not installed
    adopted = key()
    dev.put(adopted)
    inst.adopt()
    assert inst.differs(RegistryPeer(adopted, (), None)), "unknown config is written once"


def test_a_simulated_day_through_the_policy(tmp_path) -> None:
    # bench/day.py on a small population: push only grows, JIT follows the clients.
    from bench import day

    result = day.simulate(day.Params(clients=1500, signups=150, seed=7))
    m = result["minutes"]
    assert len(m) == 24 * 60
    push = [x["registered_push"] for x in m]
    jit = [x["installed_jit"] for x in m]
    assert push == sorted(push) and push[-1] == 1650
    assert max(jit) < push[0] / 3
    # Installed tracks active: never fewer (active clients are all installed), and
    # above it only by those idle less than the timeout.
    assert all(x["installed_jit"] >= x["active"] for x in m)
    peak_hour = max(range(24), key=lambda h: m[h * 60]["active"])
    night = min(range(24), key=lambda h: m[h * 60]["active"])
    assert m[peak_hour * 60]["installed_jit"] > 1.5 * m[night * 60]["installed_jit"]
    assert result["counts"]["evicted_idle"] > 0
    assert day.main(["--clients", "300", "--signups", "10", "--out", str(tmp_path),
                     "--json", str(tmp_path / "day.json")]) == 0
    assert (tmp_path / "day.md").read_text().count("| ") > 24
    assert (tmp_path / "day.csv").exists()
    doc = json.loads((tmp_path / "day.json").read_text())
    assert doc["bench"] == "day" and doc["params"]["clients"] == 300
    assert len(doc["results"]["hourly"]) == 24
    assert doc["results"]["push_installed_at_end"] == 310
    assert doc["results"]["jit_peak"] >= doc["results"]["active_peak"]
