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
        # Watched peers with nothing to do until the device shows a change:
        # key -> (their Installed entry, latest handshake, rx bytes) when last looked at.
        self._quiet: dict[str, tuple[object, float | None, int]] = {}

    def schedule(self) -> None:
        self.jobs.every(JOB, HANDSHAKE_CHECK_MIN, self.check)

    def check(self) -> None:
        pending = self.installer.pending_triggers()
        if not pending:
            self._quiet.clear()
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
        """Act on one read of the device for the peers being watched.

        A watched peer with nothing left to wait for but its handshake (answered
        re-injection, or no retrigger left) is quiet: it costs nothing until the
        device shows a change for it. A herd of simulated clients that never
        complete a handshake kept 10,000 peers pending, each examined on every
        tick. Fall-backs, retriggers and cleared keepalives found in one read
        are written to the device together.
        """
        quiet = self._quiet = {k: v for k, v in self._quiet.items() if k in wanted}
        done, answered, overdue, due = [], [], [], []
        inst = self.installer
        for p in peers:
            key = p.public_key
            if key not in wanted:
                continue
            entry = inst.get(key)
            if entry is None:
                continue
            q = quiet.get(key)
            if q is not None and q[0] is entry and q[1] == p.last_handshake and \
                    q[2] == p.rx_bytes:
                continue
            waiting = entry.reinjected  # for the data plane to answer the re-injection
            if (p.last_handshake is not None or p.rx_bytes) and entry.reinjected:
                # The data plane consumed the re-injected initiation (it counts
                # handshake messages in rx_bytes: 148 after one initiation with
                # wireguard-go; the kernel's receive.c calls update_rx_stats after
                # consuming a handshake message) and answered the client; the
                # handshake completes with the client's first data packet, one
                # round trip later (or already did, at a short RTT).
                answered.append(key)
                waiting = False
            elif p.last_handshake is None and inst.reinjection_overdue(key, now):
                # Dropped on the way (a firewall), refused (a cookie demanded
                # under load), or not ours to answer: the gateway initiates.
                overdue.append(key)
                continue
            if p.last_handshake is not None:
                done.append(key)
            elif inst.retrigger_due(key, now):
                due.append(key)
            elif not waiting and not inst.may_retrigger(key):
                quiet[key] = (entry, p.last_handshake, p.rx_bytes)
        for key in answered:
            inst.reinjection_answered(key)
            self.metrics.reinjections.labels("answered").inc()
            events.emit("reinjection_answered", public_key=key)
        if overdue:
            self.metrics.reinjections.labels("unanswered").inc(len(overdue))
            for key in inst.fall_back_many(overdue):
                events.emit("reinjection_fallback", level=logging.WARNING,
                            public_key=key, reason="unanswered")
        if due:
            retriggered = inst.retrigger_many(due)
            self.metrics.retriggers.inc(len(retriggered))
            for key in retriggered:
                events.emit("handshake_retriggered", public_key=key)
        if done:
            inst.handshake_done(done)
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
