"""Watching new peers until their first handshake: the handshake check job.

A newly installed peer is watched (install.py) until the device reports a
handshake with it. This job reads the device's activity and, per watched peer:
- re-injected and answered (a handshake, or received bytes): counted;
- handshaken: watching ends and a trigger keepalive is turned off;
- re-injected and unanswered past REINJECT_DEADLINE: fall back to role inversion;
- role inversion with no handshake after RETRIGGER_AFTER: install it afresh.
Its period follows what the read costs (pace).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.gateway import events
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.schedule import Jobs
from appliance.wg import PeerActivity

log = logging.getLogger(__name__)

JOB = "handshakes"
# The check's period: at least this, at most that, and else this many times
# what its device read costs (so it spends at most 1/factor of the time).
HANDSHAKE_CHECK_MIN = 0.1  # a crossed handshake is broken only when this job sees it
HANDSHAKE_CHECK_MAX = 5.0  # well before the 25 s trigger keepalive fires twice
HANDSHAKE_CHECK_COST_FACTOR = 5.0


class HandshakeWatch:
    def __init__(self, installer: Installer, metrics: GatewayMetrics, jobs: Jobs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.installer = installer
        self.metrics = metrics
        self.jobs = jobs
        self._clock = clock

    def schedule(self) -> None:
        self.jobs.every(JOB, HANDSHAKE_CHECK_MIN, self.check)

    def check(self) -> None:
        pending = self.installer.pending_triggers()
        if not pending:
            return
        started = self._clock()
        # An eviction pass is reading (or just read) every peer: wait for the next tick.
        with self.installer.device_read(wait=False) as peers:
            if peers is None:
                return
            now = self._clock()
            self.seen(peers, set(pending), now)
        self.pace(now - started)

    def seen(self, peers: list[PeerActivity], wanted: set[str], now: float) -> None:
        """Act on one read of the device for the peers being watched."""
        done = []
        for p in peers:
            if p.public_key not in wanted:
                continue
            if (p.last_handshake is not None or p.rx_bytes) and \
                    self.installer.is_reinjected(p.public_key):
                # The data plane consumed the re-injected initiation (it counts
                # handshake messages in rx_bytes: 148 after one initiation with
                # wireguard-go; the kernel's receive.c calls update_rx_stats after
                # consuming a handshake message) and answered the client; the
                # handshake completes with the client's first data packet, one
                # round trip later (or already did, at a short RTT).
                self.installer.reinjection_answered(p.public_key)
                self.metrics.reinjections.labels("answered").inc()
                events.emit("reinjection_answered", public_key=p.public_key)
            if p.last_handshake is not None:
                done.append(p.public_key)
            elif self.installer.reinjection_overdue(p.public_key, now):
                # Dropped on the way (a firewall), refused (a cookie demanded
                # under load), or not ours to answer: the gateway initiates.
                self.metrics.reinjections.labels("unanswered").inc()
                if self.installer.fall_back(p.public_key):
                    events.emit("reinjection_fallback", level=logging.WARNING,
                                public_key=p.public_key, reason="unanswered")
            elif self.installer.retrigger_due(p.public_key, now) and \
                    self.installer.retrigger(p.public_key):
                self.metrics.retriggers.inc()
                events.emit("handshake_retriggered", public_key=p.public_key)
        if done:
            self.installer.handshake_done(done)
            for key in done:
                events.emit("handshake_completed", public_key=key)

    def pace(self, read_seconds: float) -> None:
        """Keep the whole-device reads of this job to a fraction of the time.

        Reading 50,000 peers takes about a second (bench/evict.py), and
        wireguard-go holds back installs while it answers; repeated every 0.1 s
        while installs keep coming, it would take a core, the GIL the capture
        needs and the device lock installs need. The period follows the cost,
        so a large gateway breaks crossed handshakes a little later instead.
        """
        period = min(HANDSHAKE_CHECK_MAX,
                     max(HANDSHAKE_CHECK_MIN, HANDSHAKE_CHECK_COST_FACTOR * read_seconds))
        current = self.jobs.period(JOB)
        if abs(period - current) > 0.25 * current:
            self.jobs.reschedule(JOB, round(period, 2))
