"""The handshake check (handshakes.py) and the one-read-at-a-time lock it shares with
the eviction pass (install.py), against an in-memory device. End to end against
wireguard-go: tests/lab/test_reinject.py (answered, unanswered) and
tests/lab/test_gateway_connect.py (role inversion, the keepalive cleared).
"""

from __future__ import annotations

import threading
import time

from appliance.gateway.handshakes import (
    HANDSHAKE_CHECK_COST_FACTOR,
    HANDSHAKE_CHECK_MAX,
    HANDSHAKE_CHECK_MIN,
    JOB,
    HandshakeWatch,
)
from appliance.gateway.install import REINJECT_DEADLINE, RETRIGGER_AFTER, Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import RegistryPeer
from tests.unit.test_evict import FakeDevice, key, sample

ENDPOINT = "192.0.2.50:40000"


class FakeJobs:
    def __init__(self) -> None:
        self.periods: dict[str, float] = {}
        self.rescheduled: list[tuple[str, float]] = []

    def every(self, job_id: str, seconds: float, fn, **kw) -> None:
        self.periods[job_id] = seconds

    def period(self, job_id: str) -> float:
        return self.periods[job_id]

    def reschedule(self, job_id: str, seconds: float) -> None:
        self.periods[job_id] = seconds
        self.rescheduled.append((job_id, seconds))


class World:
    def __init__(self) -> None:
        self.dev = FakeDevice()
        self.inst = Installer(self.dev)
        self.metrics = GatewayMetrics()
        self.jobs = FakeJobs()
        self.now = 0.0
        self.watch = HandshakeWatch(self.inst, self.metrics, self.jobs, clock=lambda: self.now)
        self.watch.schedule()

    def install(self, *, reinject: bool) -> str:
        k, n = key(), len(self.inst)  # a network of its own per peer
        self.inst.install(RegistryPeer(k, (f"198.18.{n // 250}.{n % 250 + 1}/32",), None),
                          ENDPOINT, reinject=reinject)
        self.now = self.inst.get(k).triggered_at
        return k

    def handshake(self, k: str) -> None:
        self.dev.put(k, handshake=time.time(), rx=148,
                     keepalive=self.dev.table[k].persistent_keepalive)


def test_a_handshake_ends_the_watch_and_clears_the_trigger_keepalive() -> None:
    w = World()
    k = w.install(reinject=False)
    assert w.dev.table[k].persistent_keepalive > 0
    w.watch.check()
    assert w.inst.pending_triggers() == [k], "no handshake yet"
    w.handshake(k)
    w.watch.check()
    assert w.inst.pending_triggers() == [] and w.dev.table[k].persistent_keepalive == 0


def test_a_re_injection_the_data_plane_answered_is_counted_once() -> None:
    w = World()
    k = w.install(reinject=True)
    w.dev.traffic(k, 148)  # it consumed the initiation: 148 bytes received
    w.watch.check()
    assert sample(w.metrics.reinjections, outcome="answered") == 1
    w.now += 10 * REINJECT_DEADLINE
    w.watch.check()
    assert sample(w.metrics.reinjections, outcome="answered") == 1
    assert sample(w.metrics.reinjections, outcome="unanswered") == 0, "answered is not overdue"


def test_an_unanswered_re_injection_falls_back_to_role_inversion() -> None:
    w = World()
    k = w.install(reinject=True)
    w.now += REINJECT_DEADLINE / 2
    w.watch.check()
    assert w.dev.table[k].endpoint is None
    w.now += REINJECT_DEADLINE
    w.watch.check()
    assert sample(w.metrics.reinjections, outcome="unanswered") == 1
    assert str(w.dev.table[k].endpoint) == ENDPOINT, "the gateway initiates now"


def test_a_crossed_handshake_is_broken_by_installing_afresh() -> None:
    w = World()
    k = w.install(reinject=False)
    w.now += RETRIGGER_AFTER * 2
    w.watch.check()
    assert sample(w.metrics.retriggers) == 1 and w.dev.removals == [[k]]
    assert k in w.dev.table


def test_the_check_skips_its_tick_while_another_read_runs() -> None:
    w = World()
    w.install(reinject=False)
    reading, release = threading.Event(), threading.Event()

    def slow_read() -> None:
        reading.set()
        release.wait(10)

    w.dev.during_dump = slow_read
    evict = threading.Thread(target=lambda: w.inst.adopt())  # a whole-device read
    evict.start()
    assert reading.wait(10)
    w.dev.during_dump = None
    dumps = w.dev.dumps
    w.watch.check()
    assert w.dev.dumps == dumps, "no second whole-device read while one is held"
    release.set()
    evict.join(10)
    w.watch.check()
    assert w.dev.dumps == dumps + 1


def test_the_period_follows_the_cost_of_the_read_within_bounds() -> None:
    w = World()
    assert w.jobs.period(JOB) == HANDSHAKE_CHECK_MIN
    w.watch.pace(0.001)
    assert w.jobs.rescheduled == [], "a cheap read keeps the short period"
    w.watch.pace(0.2)
    assert w.jobs.period(JOB) == round(HANDSHAKE_CHECK_COST_FACTOR * 0.2, 2)
    w.watch.pace(0.21)
    assert len(w.jobs.rescheduled) == 1, "small changes do not reschedule"
    w.watch.pace(60)
    assert w.jobs.period(JOB) == HANDSHAKE_CHECK_MAX


class CountingInstaller(Installer):
    """Counts the per-peer questions the watch asks."""

    asked = 0

    def reinjection_overdue(self, public_key: str, now: float) -> bool:
        self.asked += 1
        return super().reinjection_overdue(public_key, now)

    def retrigger_due(self, public_key: str, now: float) -> bool:
        self.asked += 1
        return super().retrigger_due(public_key, now)


def test_answered_peers_waiting_for_their_handshake_cost_nothing_until_the_device_changes(
        ) -> None:
    w = World()
    w.inst = CountingInstaller(w.dev)
    w.watch = HandshakeWatch(w.inst, w.metrics, w.jobs, clock=lambda: w.now)
    keys = [w.install(reinject=True) for _ in range(50)]
    for k in keys:
        w.dev.traffic(k, 148)
    w.watch.check()  # all answered: quiet from now on
    assert sample(w.metrics.reinjections, outcome="answered") == 50
    w.inst.asked = 0
    w.now += 10
    w.watch.check()
    assert w.inst.asked == 0, "nothing changed: no per-peer work"
    w.handshake(keys[0])  # one of them completes
    w.watch.check()
    assert w.inst.pending_triggers().count(keys[0]) == 0 and len(w.inst.pending_triggers()) == 49
    # A peer reinstalled (new entry) under the same key is looked at afresh.
    w.inst.remove([keys[1]])
    w.inst.install(RegistryPeer(keys[1], ("198.18.9.4/32",), None), ENDPOINT, reinject=True)
    w.dev.traffic(keys[1], 148)
    w.watch.check()
    assert sample(w.metrics.reinjections, outcome="answered") == 51


def test_due_retriggers_and_fallbacks_of_one_read_are_one_device_write_each() -> None:
    w = World()
    inverted = [w.install(reinject=False) for _ in range(20)]
    w.now += RETRIGGER_AFTER * 2
    w.watch.check()
    assert sample(w.metrics.retriggers) == 20
    assert len(w.dev.removals) == 1 and sorted(w.dev.removals[0]) == sorted(inverted)
    w2 = World()
    unanswered = [w2.install(reinject=True) for _ in range(20)]
    w2.now += REINJECT_DEADLINE * 2
    w2.watch.check()
    assert sample(w2.metrics.reinjections, outcome="unanswered") == 20
    assert all(str(w2.dev.table[k].endpoint) == ENDPOINT for k in unanswered)
    assert w2.dev.removals == [], "a fall-back re-aims the peers, it does not remove them"
