"""A worker's job (provision.py) and the revocation race (revocation.py), with the
real cache, installer, feed and evictor over an in-memory device and registry.
End to end against wireguard-go and a gunicorn registry: tests/lab/
test_gateway_daemon_paths.py (the revocation during a pull) and test_gateway_connect.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.capture import Datagram
from appliance.gateway.evict import EvictionPolicy, Evictor
from appliance.gateway.feed import FeedFollower
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.provision import FEED_CATCH_UP_EVERY, FeedReads, Provisioner
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import ReplayGuard
from appliance.gateway.revocation import undo_if_revoked
from appliance.gateway.served import ServedEndpoints
from appliance.keys import decode_key
from tests.unit.test_evict import sample
from tests.unit.test_feed import World, key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gw(World):
    """test_feed's world (registry, device, installer, cache, feed) plus a worker."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.evictor = Evictor(self.inst, EvictionPolicy(), self.metrics)
        self.known = KnownKeys()
        self.feed = FeedFollower(self.reg, self.state, self.cache, self.inst, self.metrics,
                                 self.evictor.removed_elsewhere, known=self.known)
        self.queue = FairQueue()
        self.clock = Clock()
        self.replay = ReplayGuard()
        self.served = ServedEndpoints()
        self.repair = EndpointRepair(self.dev.set_endpoint)
        self.worker = Provisioner(
            queue=self.queue, known=self.known, feed=self.feed,
            feed_reads=FeedReads(self.feed, clock=self.clock), cache=self.cache,
            installer=self.inst, evictor=self.evictor, served=self.served,
            replay=self.replay, repair=self.repair, reinjector=None, metrics=self.metrics)

    def work(self, k: str, *, known: bool = True) -> Work:
        d = Datagram("192.0.2.50", 40000, bytes(148), "eth0")
        return Work(k, d.endpoint, b"src", known, time.time(), bytes(12), d)


@pytest.fixture
def gw(tmp_path: Path):
    g = Gw(tmp_path)
    g.feed.poll()  # first start: reconcile, cursor at the head
    yield g
    g.repair.close()


def test_a_known_key_is_pulled_installed_and_remembered(gw: Gw) -> None:
    k = key()
    gw.reg.create(k)
    gw.worker.provision(gw.work(k))
    assert k in gw.dev.table and k in gw.inst
    assert gw.served.serving("192.0.2.50:40000") == k
    assert gw.replay.kept(decode_key(k))
    assert sample(gw.metrics.installs) == 1
    assert sample(gw.metrics.lookups, outcome="fetched") == 1


def test_a_revocation_during_the_pull_undoes_the_install_and_the_cached_answer(gw) -> None:
    k = key()
    gw.reg.create(k)
    real_peer = gw.reg.peer

    def slow_lookup(asked: str):
        answer = real_peer(asked)  # the registry answers, then the revocation lands
        gw.reg.revoke(asked)
        gw.feed.poll()  # the feed removes the (not yet installed) peer and the entry
        return answer

    gw.reg.peer = slow_lookup
    gw.worker.provision(gw.work(k))
    assert k not in gw.dev.table and k not in gw.inst
    assert not gw.cache.knows(k), "the lookup's late answer is not served later"
    assert sample(gw.metrics.evictions, reason="revoked") == 1
    assert sample(gw.metrics.installs) == 0


def test_undo_only_for_removals_after_the_initiation_was_seen(gw: Gw) -> None:
    k = key()
    gw.reg.create(k)
    gw.install(k)
    gw.cache.put(gw.reg.peer(k))
    removed = []
    kw = dict(feed=gw.feed, cache=gw.cache, installer=gw.inst,
              on_removed=lambda *a: removed.append(a))
    assert not undo_if_revoked(k, time.time(), True, **kw)
    gw.feed._note_removed(k)  # as the feed does before it removes
    assert not undo_if_revoked(k, time.time() + 1, True, **kw), "seen after the removal"
    assert k in gw.inst and gw.cache.knows(k)
    assert undo_if_revoked(k, time.time() - 1, False, **kw)
    assert k in gw.inst, "a peer this pull did not install is the feed's to remove"
    assert not gw.cache.knows(k)
    assert undo_if_revoked(k, time.time() - 1, True, **kw)
    assert k not in gw.inst and removed == [(k, "revoked")]


def test_an_unknown_key_makes_one_feed_read_a_second_then_is_refused(gw: Gw) -> None:
    gw.known.load({"digest_size": 4, "digests": "", "cursor": 0})  # an empty registry
    new = key()
    gw.reg.create(new)  # created a moment ago: in the feed, not in the filter
    reads = []
    real_changes = gw.reg.changes
    gw.reg.changes = lambda *a, **kw: reads.append(a) or real_changes(*a, **kw)
    gw.worker.provision(gw.work(new, known=False))
    assert new in gw.inst, "the feed read added the key"
    assert len(reads) == 1
    for _ in range(3):
        gw.worker.provision(gw.work(key(), known=False))
    assert len(reads) == 1, f"within {FEED_CATCH_UP_EVERY} s no second read"
    assert sample(gw.metrics.lookups, outcome="filtered") == 3
    gw.clock.now += FEED_CATCH_UP_EVERY
    gw.worker.provision(gw.work(key(), known=False))
    assert len(reads) == 2


def test_a_failed_install_counts_and_leaves_nothing_behind(gw: Gw) -> None:
    from appliance.wg import WgError

    k = key()
    gw.reg.create(k)

    def refuse(*a, **kw):
        raise WgError("refused")

    gw.dev.set_peers = refuse
    gw.worker.provision(gw.work(k))
    assert k not in gw.inst and sample(gw.metrics.install_errors) == 1


def test_the_worker_loop_survives_a_failing_job_and_ends_when_the_queue_closes(gw) -> None:
    bad, good, late = key(), key(), key()
    for k in (bad, good, late):
        gw.reg.create(k)
    real_install_many, real_lookup_many = gw.inst.install_many, gw.cache.lookup_many
    lookups_failed = []

    def install_many(wanted, **kw):
        # One peer's install goes wrong in an unforeseen way; its batch-mates do not.
        results = real_install_many([w for w in wanted if w[0].public_key != bad], **kw)
        if any(w[0].public_key == bad for w in wanted):
            results[bad] = RuntimeError("a bug in one job")
        return results

    def lookup_many(keys):
        if late in keys and not lookups_failed:
            lookups_failed.append(keys)
            raise RuntimeError("a bug in a whole take")
        return real_lookup_many(keys)

    gw.inst.install_many = install_many
    gw.cache.lookup_many = lookup_many
    gw.queue.put(gw.work(bad))
    gw.queue.put(Work(good, "192.0.2.51:1", b"other", True, time.time(), bytes(12),
                      Datagram("192.0.2.51", 1, bytes(148), "eth0")))
    t = threading.Thread(target=gw.worker.work)
    t.start()

    def wait_for(k: str) -> None:
        deadline = time.monotonic() + 10
        while k not in gw.inst and time.monotonic() < deadline:
            time.sleep(0.01)

    wait_for(good)  # taken with bad (one take), installed though bad's install failed
    late_work = Work(late, "192.0.2.52:1", b"late", True, time.time(), bytes(12),
                     Datagram("192.0.2.52", 1, bytes(148), "eth0"))
    gw.queue.put(late_work)  # its take's lookup fails: logged, the worker goes on
    deadline = time.monotonic() + 10
    while (not lookups_failed or gw.queue.latest(late) is not None) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    gw.queue.put(late_work)  # the client's retry
    wait_for(late)
    gw.queue.close()
    t.join(timeout=10)
    assert good in gw.inst and bad not in gw.inst and late in gw.inst and not t.is_alive()
