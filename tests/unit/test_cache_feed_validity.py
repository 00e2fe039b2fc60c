"""Positive cache entries that stay valid while the change feed is followed (issue 17).

The clock and registry are fakes (tests/unit/test_gateway_cache.py's); the feed
side is driven by hand here as feed.py drives it: new_feed_epoch() on a
reconcile, feed_confirmed() after each continuous poll, invalidate() per change.
tests/unit/test_feed_cursor.py runs it under the real follower and
tests/lab/test_cache_restart.py with the real registry and wireguard-go.
"""

from __future__ import annotations

import json
import threading

import pytest

from appliance.gateway.cache import CachePolicy, Outcome, PeerCache
from appliance.gateway.ratelimit import TokenBucket
from tests.unit.test_gateway_cache import KEY, Clock, FakeRegistry, cache_over, peer

POLICY = CachePolicy(positive_ttl=300, negative_ttl=30, stale_ttl=3600, feed_window=60)


@pytest.fixture
def setup(tmp_path):
    clock, reg = Clock(), FakeRegistry()
    cache = cache_over(tmp_path / "c.db", reg, TokenBucket(1000, 1000), POLICY, clock)
    cache.new_feed_epoch()
    cache.feed_confirmed()
    reg.peers[KEY] = peer()
    yield cache, reg, clock
    cache.close()


def follow(cache: PeerCache, clock: Clock, seconds: float, every: float = 5.0) -> None:
    """Time passes while the feed is polled without a gap."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += every
        cache.feed_confirmed()


def test_an_entry_stays_valid_across_a_continuous_feed(setup) -> None:
    cache, reg, clock = setup
    assert cache.lookup(KEY).outcome is Outcome.FETCHED
    follow(cache, clock, 10 * POLICY.positive_ttl)
    assert cache.lookup(KEY).outcome is Outcome.HIT
    assert reg.calls == 1
    cache.expire()  # past even the stale TTL: still kept
    follow(cache, clock, POLICY.stale_ttl)
    cache.expire()
    assert cache.lookup(KEY).outcome is Outcome.HIT and reg.calls == 1


def test_a_change_to_its_key_drops_it(setup) -> None:
    cache, reg, clock = setup
    cache.lookup(KEY)
    follow(cache, clock, 2 * POLICY.positive_ttl)
    cache.invalidate(KEY)  # the feed saw an update
    assert cache.lookup(KEY).outcome is Outcome.FETCHED and reg.calls == 2


@pytest.mark.parametrize("break_feed", ["gap", "new feed identity", "feed silent"])
def test_without_a_continuous_feed_the_ttl_rules(setup, break_feed: str) -> None:
    cache, reg, clock = setup
    cache.lookup(KEY)
    if break_feed == "feed silent":  # polls fail: nothing confirms continuity
        clock.now += POLICY.feed_window
    else:  # both end in a reconcile, which starts a new epoch
        cache.new_feed_epoch()
        cache.feed_confirmed()
    clock.now += 1
    assert cache.lookup(KEY).outcome is Outcome.HIT, "within the TTL, as before"
    clock.now += POLICY.positive_ttl
    if break_feed != "feed silent":
        cache.feed_confirmed()
    assert cache.lookup(KEY).outcome is Outcome.FETCHED
    assert reg.calls == 2


def test_an_answer_that_raced_a_change_gets_only_the_ttl(setup) -> None:
    cache, reg, clock = setup
    reg.delay = 0.3
    result = []
    t = threading.Thread(target=lambda: result.append(cache.lookup(KEY)))
    t.start()
    while KEY not in cache._inflight:
        pass
    cache.invalidate(KEY)  # the feed applies a change while the answer is in flight
    t.join()
    assert result[0].outcome is Outcome.FETCHED
    reg.delay = 0
    follow(cache, clock, POLICY.positive_ttl + 5)
    assert cache.lookup(KEY).outcome is Outcome.FETCHED and reg.calls == 2


def test_the_epoch_survives_a_restart_but_needs_the_feed_again(setup, tmp_path) -> None:
    cache, reg, clock = setup
    cache.lookup(KEY)
    cache.close()
    clock.now += 10 * POLICY.positive_ttl  # down for a while
    again = cache_over(tmp_path / "c.db", reg, TokenBucket(1000, 1000), POLICY, clock)
    try:
        assert again.feed_epoch == cache.feed_epoch
        again.feed_confirmed()  # the first poll after the restart found the cursor good
        assert again.lookup(KEY).outcome is Outcome.HIT and reg.calls == 1
    finally:
        again.close()
    fresh = cache_over(tmp_path / "c.db", reg, TokenBucket(1000, 1000), POLICY, clock)
    try:  # no poll yet in this process: TTLs
        assert fresh.lookup(KEY).outcome is Outcome.FETCHED and reg.calls == 2
    finally:
        fresh.close()


def test_a_cache_from_before_epochs_is_upgraded(tmp_path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE peer_cache (public_key TEXT PRIMARY KEY, found INTEGER NOT NULL,"
               " data TEXT, fetched_at REAL NOT NULL)")
    db.execute("INSERT INTO peer_cache VALUES (?, 1, ?, 0)",
               (KEY, json.dumps({"public_key": KEY, "allowed_ips": []})))
    db.commit()
    db.close()
    clock, reg = Clock(), FakeRegistry()
    reg.peers[KEY] = peer()
    cache = cache_over(tmp_path / "old.db", reg, TokenBucket(1000, 1000), POLICY, clock)
    try:
        cache.new_feed_epoch()
        cache.feed_confirmed()
        assert cache.lookup(KEY).outcome is Outcome.FETCHED, "an old entry has no epoch"
        clock.now += 2 * POLICY.positive_ttl
        cache.feed_confirmed()
        assert cache.lookup(KEY).outcome is Outcome.HIT
    finally:
        cache.close()


def test_a_batched_answer_stays_valid_too_but_a_key_changed_in_flight_does_not(setup) -> None:
    cache, reg, clock = setup
    keys = [f"{i:042d}E=" for i in range(6)]
    for k in keys:
        reg.peers[k] = peer(k)
    reg.delay = 0.3
    result = []
    t = threading.Thread(target=lambda: result.append(cache.lookup_many(keys)))
    t.start()
    while keys[-1] not in cache._inflight:
        pass
    cache.invalidate(keys[2])  # one key of the batch changes while the call is out
    t.join()
    assert all(r.outcome is Outcome.FETCHED for r in result[0].values())
    assert reg.calls == 1  # one registry call for the six
    reg.delay = 0
    follow(cache, clock, POLICY.positive_ttl + 5)
    again = cache.lookup_many(keys)
    assert again[keys[2]].outcome is Outcome.FETCHED, "its answer may predate the change"
    assert all(again[k].outcome is Outcome.HIT for k in keys if k != keys[2])
    assert reg.calls == 2


def test_a_batch_takes_the_epoch_from_before_its_call(setup) -> None:
    cache, reg, clock = setup
    keys = [f"{i:042d}E=" for i in range(3)]
    for k in keys:
        reg.peers[k] = peer(k)
    reg.delay = 0.3
    t = threading.Thread(target=lambda: cache.lookup_many(keys))
    t.start()
    while keys[-1] not in cache._inflight:
        pass
    cache.new_feed_epoch()  # a reconcile while the call is out: its answer predates it
    cache.feed_confirmed()
    t.join()
    reg.delay = 0
    follow(cache, clock, POLICY.positive_ttl + 5)
    assert all(r.outcome is Outcome.FETCHED for r in cache.lookup_many(keys).values())
