"""Eviction: take idle peers off the device; the next initiation brings them back.

Under just-in-time provisioning eviction costs one pull and install on the
client's return, so it can be aggressive. One pass reads the device once (its
cheap activity read: keys, handshakes, received bytes) and removes, in batches:
- idle peers: nothing received from them for the idle timeout. Activity is
  the later of the latest handshake and the last pass that saw the peer's
  received bytes grow: the handshake alone is refreshed only every
  REKEY_AFTER_TIME (120 s) under traffic, so with a shorter timeout it would
  evict a client in the middle of a transfer;
- peers installed but never handshaken within the grace period: the
  initiation that asked for them was spoofed or replayed, or the client left;
- when a cap on installed peers is set and reached, the least recently
  active first.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from appliance.gateway import events
from appliance.gateway.install import Installer
from appliance.gateway.metrics import EVICTION_REASONS, GatewayMetrics
from appliance.gateway.settings import default
from appliance.wg import PeerActivity

log = logging.getLogger(__name__)

REJECT_AFTER_TIME = 180.0  # whitepaper 6.1: session keys die this long after a handshake
REMOVE_BATCH = 500  # peers per device transaction: short enough not to hold up installs
THRASH_WINDOW = 600.0  # an install this soon after an eviction counts as thrash
POLICY_REASONS = frozenset(EVICTION_REASONS[:3])


@dataclass
class EvictionPolicy:
    idle_timeout: float = default("idle-timeout")
    handshake_grace: float = default("handshake-grace")
    max_peers: int = default("max-peers")  # 0: no cap


class Evictor:
    def __init__(self, installer: Installer, policy: EvictionPolicy,
                 metrics: GatewayMetrics, on_evict=None) -> None:
        self.installer = installer
        self.policy = policy
        self.metrics = metrics
        # (key, reason) for each removal, a pass's or not: what others remember per
        # installed peer goes with it (the daemon's served endpoints and repairs).
        self.on_evict = on_evict
        # key -> (evicted at, reason), oldest first; policy evictions only
        self._recent: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # key -> (rx_bytes at the last pass, when rx_bytes was last seen growing)
        self._rx: dict[str, tuple[int, float]] = {}
        self.last_pass: dict = {}

    def set_policy(self, policy: EvictionPolicy) -> None:
        """A new policy (a reload), used from the next pass on."""
        self.policy = policy

    def _last_active(self, p: PeerActivity, now: float) -> float:
        """The later of the handshake and the last pass where rx_bytes grew.

        A peer seen for the first time counts as active now: after a restart
        we cannot know, and evicting a live client costs more than waiting.
        """
        previous = self._rx.get(p.public_key)
        active = now if previous is None or p.rx_bytes != previous[0] else previous[1]
        self._rx[p.public_key] = (p.rx_bytes, active)
        return max(active, p.last_handshake or 0.0)

    def choose(self, peers: list[PeerActivity], now: float) -> dict[str, str]:
        """key -> reason for every peer this pass should remove."""
        chosen: dict[str, str] = {}
        installed = self.installer.snapshot()
        survivors: list[tuple[float, str]] = []
        present = set()
        for p in peers:
            present.add(p.public_key)
            entry = installed.get(p.public_key)
            if p.last_handshake is None:
                since = entry.installed_at if entry else now
                if now - since > self.policy.handshake_grace:
                    chosen[p.public_key] = "never_handshaken"
                    continue
                survivors.append((since, p.public_key))
                continue
            last = self._last_active(p, now)
            if now - last > self.policy.idle_timeout:
                chosen[p.public_key] = "idle"
            else:
                survivors.append((last, p.public_key))
        for key in [k for k in self._rx if k not in present or k in chosen]:
            del self._rx[key]
        cap = self.policy.max_peers
        if cap and len(survivors) > cap:
            survivors.sort()
            for _, key in survivors[: len(survivors) - cap]:
                chosen[key] = "cap"
        return chosen

    def run_pass(self) -> dict:
        started = time.monotonic()
        dumped_at = time.time()
        with self.installer.device_read() as peers:  # the pass's one read of the device
            return self._pass(peers, started, dumped_at)

    def _pass(self, peers: list[PeerActivity], started: float, dumped_at: float) -> dict:
        now = time.time()
        present = {p.public_key for p in peers}
        self.installer.forget_missing(present, dumped_at)
        # Peers put on the device by someone else are ours now.
        if any(key not in self.installer for key in present):
            for key in self.installer.adopt(peers):
                events.emit("peer_adopted", public_key=key)
        chosen = self.choose(peers, now)
        keys = list(chosen)
        for i in range(0, len(keys), REMOVE_BATCH):
            batch = keys[i:i + REMOVE_BATCH]
            self.installer.remove(batch)
            for key in batch:
                self._evicted(key, chosen[key], now)
        elapsed = time.monotonic() - started
        self.metrics.evict_pass.observe(elapsed)
        self.metrics.installed.set(len(self.installer))
        self.last_pass = {"at": now, "seconds": elapsed, "peers": len(peers),
                          "evicted": len(keys)}
        if keys:
            log.info("eviction pass: %d of %d peers removed in %.3f s", len(keys), len(peers),
                     elapsed)
        return self.last_pass

    def _evicted(self, key: str, reason: str, now: float) -> None:
        self.metrics.evictions.labels(reason).inc()
        events.emit("peer_evicted", public_key=key, reason=reason)
        # Only the policy's own choices can thrash; a revoked peer that is
        # restored and returns says nothing about the idle timeout or the cap.
        if reason in POLICY_REASONS:
            self._recent[key] = (now, reason)
            self._recent.move_to_end(key)
        while self._recent and next(iter(self._recent.values()))[0] < now - THRASH_WINDOW:
            self._recent.popitem(last=False)
        if self.on_evict:
            self.on_evict(key, reason)

    def removed_elsewhere(self, key: str, reason: str) -> None:
        """Account for a removal done outside a pass (revocation)."""
        self._evicted(key, reason, time.time())
        self.metrics.installed.set(len(self.installer))

    def note_install(self, key: str) -> None:
        """Count an install of a key this evictor removed within THRASH_WINDOW."""
        recent = self._recent.pop(key, None)
        if recent is not None and time.time() - recent[0] < THRASH_WINDOW:
            self.metrics.reinstalls.labels(recent[1]).inc()
