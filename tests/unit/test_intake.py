"""The admission decision for a verified initiation (intake.py), against an in-memory
device and a recording repair. The same decisions run end to end against real
wireguard-go in tests/lab/test_gateway_connect.py (already installed, pending),
test_reinject.py (replays and repair) and test_gateway_flood.py (lanes, queue full).
"""

from __future__ import annotations

import os

import pytest

from appliance.gateway.admission import FairQueue
from appliance.gateway.capture import Datagram
from appliance.gateway.install import Installer
from appliance.gateway.intake import (
    FEED_FRESH,
    INSTALLED,
    PENDING,
    QUEUED,
    REPLAY,
    UNKNOWN_KEY,
    Intake,
)
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import RegistryPeer
from appliance.gateway.provision import FEED_CATCH_UP_EVERY
from appliance.gateway.replay import ReplayGuard
from appliance.gateway.served import ServedEndpoints
from appliance.keys import encode_key
from tests.unit.test_evict import FakeDevice, sample


def ts(n: int) -> bytes:
    return n.to_bytes(12, "big")  # TAI64N: byte order is time order


def dgram(ip: str = "192.0.2.50", port: int = 40000) -> Datagram:
    return Datagram(ip, port, b"\x01" + bytes(147), "eth0")


class RecordingRepair:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    def request(self, key: str, replayer: str, good: str, timestamp: bytes) -> str:
        self.requests.append((key, replayer, good))
        return "queued"


class World:
    def __init__(self) -> None:
        self.dev = FakeDevice()
        self.installer = Installer(self.dev)
        self.replay = ReplayGuard()
        self.served = ServedEndpoints()
        self.queue = FairQueue(known_capacity=2, unknown_capacity=1, per_source=4)
        self.known = KnownKeys()
        self.cached: set[str] = set()
        self.repair = RecordingRepair()
        self.metrics = GatewayMetrics()
        self.now = 1000.0
        self.feed_read_at: float | None = None
        self.intake = Intake(self.replay, self.installer, self.served, self.queue, self.known,
                             self.cached.__contains__, self.repair, self.metrics,
                             feed_read_at=lambda: self.feed_read_at, clock=lambda: self.now)

    def admit(self, static: bytes, n: int, d: Datagram | None = None) -> str:
        return self.intake.admit(static, ts(n), d or dgram(), 0.0)

    def install(self, static: bytes, endpoint: str, *, reinject: bool = False) -> str:
        key = encode_key(static)
        self.installer.install(RegistryPeer(key, ("198.18.1.1/32",), None), endpoint,
                               reinject=reinject)
        return key


@pytest.fixture
def w() -> World:
    return World()


def test_a_new_key_is_queued_once_and_a_retry_refreshes_it(w: World) -> None:
    static = os.urandom(32)
    assert w.admit(static, 1) == QUEUED
    assert w.admit(static, 2, dgram(port=40001)) == PENDING
    work = w.queue.get(timeout=0)
    assert (work.key, work.endpoint, work.timestamp) == (encode_key(static),
                                                         "192.0.2.50:40001", ts(2))
    assert sample(w.metrics.verified) == 2


def test_an_old_timestamp_is_a_replay_and_costs_no_lookup(w: World) -> None:
    static = os.urandom(32)
    assert w.admit(static, 5) == QUEUED
    w.queue.done(w.queue.get(timeout=0).key)
    assert w.admit(static, 5) == REPLAY
    assert w.admit(static, 4) == REPLAY
    assert len(w.queue) == 0 and sample(w.metrics.drops, reason="replay") == 2
    assert w.repair.requests == [], "not installed: nothing to repair"


def test_an_installed_peer_is_not_looked_up_and_its_new_endpoint_is_remembered(w) -> None:
    static = os.urandom(32)
    key = w.install(static, "192.0.2.50:40000")
    assert w.admit(static, 1, dgram("203.0.113.9", 5000)) == INSTALLED
    assert w.installer.get(key).endpoint == "203.0.113.9:5000"
    assert w.served.serving("203.0.113.9:5000") == key
    assert len(w.queue) == 0 and sample(w.metrics.verified) == 0
    assert sample(w.metrics.drops, reason="already_installed") == 1


def test_a_replay_for_an_installed_peer_asks_for_its_endpoint_back(w: World) -> None:
    static = os.urandom(32)
    key = w.install(static, "192.0.2.50:40000")
    assert w.admit(static, 7) == INSTALLED  # the client's own, from 192.0.2.50:40000
    assert w.admit(static, 7, dgram("198.51.100.66", 1)) == REPLAY
    assert w.repair.requests == [(key, "198.51.100.66:1", "192.0.2.50:40000")]
    assert sample(w.metrics.endpoint_repairs, outcome="queued") == 1
    # From the client's own address a replay moves nothing: no repair.
    assert w.admit(static, 7) == REPLAY
    assert len(w.repair.requests) == 1


def test_no_repair_when_the_data_plane_saw_the_initiation_itself(w: World) -> None:
    static = os.urandom(32)
    w.install(static, "192.0.2.50:40000", reinject=True)
    assert w.admit(static, 3) == INSTALLED
    assert w.admit(static, 3, dgram("198.51.100.66", 1)) == REPLAY
    assert w.repair.requests == [], "it refuses the replay by the timestamp it knows"


def test_the_lane_comes_from_the_filter_else_from_what_the_gateway_has_seen(w: World) -> None:
    seen_before, stranger = os.urandom(32), os.urandom(32)
    w.cached.add(encode_key(seen_before))
    w.admit(seen_before, 1, dgram("192.0.2.1"))
    w.admit(stranger, 1, dgram("192.0.2.2"))
    lanes = {}
    while (work := w.queue.get(timeout=0)) is not None:
        lanes[work.key] = work.known
    assert lanes == {encode_key(seen_before): True, encode_key(stranger): False}


def test_only_a_fresh_initiation_from_an_expected_key_is_reported_as_known(w: World) -> None:
    expected, stranger = os.urandom(32), os.urandom(32)
    w.cached.add(encode_key(expected))
    reported = []
    for static, n in ((expected, 1), (stranger, 1), (expected, 1)):  # the last: a replay
        w.intake.admit(static, ts(n), dgram(), 0.0, on_known=lambda: reported.append(1))
    assert reported == [1], "the gate's backlog is relieved once, for the expected key"


def test_a_full_lane_takes_the_newcomer_and_counts_the_displaced(w: World) -> None:
    first, second = os.urandom(32), os.urandom(32)
    assert w.admit(first, 1, dgram("192.0.2.1")) == QUEUED
    assert w.admit(second, 1, dgram("192.0.2.2")) == QUEUED  # unknown lane holds one
    assert w.queue.take_dropped() == {"lane_full": 1}
    assert w.queue.get(timeout=0).key == encode_key(second)


def test_an_unknown_key_is_refused_early_only_while_the_workers_read_the_feed(w) -> None:
    member, stranger = os.urandom(32), os.urandom(32)
    w.feed_read_at = w.now
    assert not w.intake.refuses_unknown(stranger), "no filter loaded: every key is looked up"
    w.known.load({"digest_size": 4, "digests": "", "cursor": 0})
    w.known.add(encode_key(member))
    assert not w.intake.refuses_unknown(stranger), \
        "a fresh scheduled poll alone: the worker's read may still find the key"
    assert w.admit(stranger, 1) == QUEUED  # the full path: a worker reads the feed for it
    w.queue.done(w.queue.get(timeout=0).key)
    assert not w.intake.refuses_unknown(member)
    assert w.intake.refuses_unknown(os.urandom(32))
    w.now += FEED_CATCH_UP_EVERY - 0.01
    w.feed_read_at = w.now - 0.5  # the worker's read
    assert w.intake.refuses_unknown(os.urandom(32))
    assert sample(w.metrics.drops, reason=UNKNOWN_KEY) == 2
    # A second after the last unknown key was queued: the next takes the full path.
    w.now += 0.01
    assert not w.intake.refuses_unknown(os.urandom(32))
    assert w.admit(os.urandom(32), 1) == QUEUED
    assert w.intake.refuses_unknown(os.urandom(32))
    # The feed's last read may be up to FEED_FRESH old (the workers' next read takes
    # its time); older, and nothing is refused early.
    w.now += FEED_FRESH - 1.0
    w.queue.done(w.queue.get(timeout=0).key)
    assert w.admit(os.urandom(32), 1) == QUEUED
    assert w.intake.refuses_unknown(os.urandom(32))
    w.now += 0.6
    assert not w.intake.refuses_unknown(os.urandom(32))
    w.feed_read_at = None
    assert not w.intake.refuses_unknown(os.urandom(32))
    assert sample(w.metrics.drops, reason=UNKNOWN_KEY) == 4
