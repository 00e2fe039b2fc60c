"""Eviction: take idle peers off the device; the next initiation brings them back.

Under just-in-time provisioning eviction costs one pull and install on the
client's return, so it can be aggressive. One pass reads the device once and
removes, in batches:
- idle peers: latest handshake older than the idle timeout. WireGuard
  re-handshakes every REKEY_AFTER_TIME (120 s) while traffic flows, so a
  handshake older than that means the peer has been quiet;
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
from appliance.gateway.metrics import GatewayMetrics
from appliance.wg import Peer

log = logging.getLogger(__name__)

REJECT_AFTER_TIME = 180.0  # whitepaper 6.1: session keys die this long after a handshake
REMOVE_BATCH = 500  # peers per device transaction: short enough not to hold up installs
THRASH_WINDOW = 600.0  # an install this soon after an eviction counts as thrash


@dataclass
class EvictionPolicy:
    idle_timeout: float = 300.0
    handshake_grace: float = 15.0
    max_peers: int = 0  # 0: no cap


class Evictor:
    def __init__(self, installer: Installer, policy: EvictionPolicy,
                 metrics: GatewayMetrics, on_evict=None) -> None:
        self.installer = installer
        self.policy = policy
        self.metrics = metrics
        self.on_evict = on_evict  # called with each removed key (cache/replay cleanup)
        self._recent: OrderedDict[str, float] = OrderedDict()  # key -> evicted at
        self.last_pass: dict = {}

    def choose(self, peers: list[Peer], now: float) -> dict[str, str]:
        """key -> reason for every peer this pass should remove."""
        chosen: dict[str, str] = {}
        installed = self.installer.snapshot()
        survivors: list[tuple[float, str]] = []
        for p in peers:
            entry = installed.get(p.public_key)
            if p.last_handshake is None:
                since = entry.installed_at if entry else now
                if now - since > self.policy.handshake_grace:
                    chosen[p.public_key] = "never_handshaken"
                    continue
                survivors.append((since, p.public_key))
                continue
            last = p.last_handshake.timestamp()
            if now - last > self.policy.idle_timeout:
                chosen[p.public_key] = "idle"
            else:
                survivors.append((last, p.public_key))
        cap = self.policy.max_peers
        if cap and len(survivors) > cap:
            survivors.sort()
            for _, key in survivors[: len(survivors) - cap]:
                chosen[key] = "cap"
        return chosen

    def run_pass(self) -> dict:
        started = time.monotonic()
        peers = self.installer.device.peers()
        now = time.time()
        # Peers put on the device by someone else (or before a restart) are ours now.
        present = {p.public_key for p in peers}
        self.installer.forget_missing(present)
        if len(self.installer) < len(present):
            self.installer.adopt()
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
        self._recent[key] = now
        self._recent.move_to_end(key)
        while self._recent and next(iter(self._recent.values())) < now - THRASH_WINDOW:
            self._recent.popitem(last=False)
        if self.on_evict:
            self.on_evict(key, reason)

    def removed_elsewhere(self, key: str, reason: str) -> None:
        """Account for a removal done outside a pass (revocation)."""
        self._evicted(key, reason, time.time())

    def note_install(self, key: str) -> None:
        evicted_at = self._recent.pop(key, None)
        if evicted_at is not None and time.time() - evicted_at < THRASH_WINDOW:
            self.metrics.reinstalls.inc()
