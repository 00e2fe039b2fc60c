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
        k = key()
        self.inst.install(RegistryPeer(k, ("198.18.1.4/32",), None), ENDPOINT, reinject=reinject)
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
