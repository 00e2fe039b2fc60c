"""The rate-limited cache with a fake registry; the lab tests run the real one."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.gateway.batch import LookupBatcher
from appliance.gateway.cache import CachePolicy, Outcome, PeerCache
from appliance.gateway.peer import PeerNotFound, RegistryPeer, RegistryUnavailable
from appliance.gateway.ratelimit import TokenBucket

KEY = "A" * 42 + "E="


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    def __init__(self) -> None:
        self.peers: dict[str, RegistryPeer] = {}
        self.calls = 0
        self.down = False
        self.delay = 0.0

    def peer(self, key: str) -> RegistryPeer:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise RegistryUnavailable("down")
        if key not in self.peers:
            raise PeerNotFound(key)
        return self.peers[key]

    def lookup(self, keys: list[str]) -> dict:
        """GatewayRegistry.lookup: one call for several keys."""
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise RegistryUnavailable("down")
        return {k: self.peers.get(k) for k in keys}


def cache_over(path, reg: FakeRegistry, bucket: TokenBucket, *args, token_wait: float = 1.0,
               **kw) -> PeerCache:
    return PeerCache(path, LookupBatcher(reg.lookup, bucket, linger=0, token_wait=token_wait),
                     *args, **kw)


@pytest.fixture
def setup(tmp_path):
    clock, reg = Clock(), FakeRegistry()
    cache = cache_over(tmp_path / "c.db", reg, TokenBucket(1000, 1000),
                      CachePolicy(positive_ttl=300, negative_ttl=30, stale_ttl=3600), clock)
    yield cache, reg, clock
    cache.close()
    cache.lookups.close()


def peer(key=KEY) -> RegistryPeer:
    return RegistryPeer(key, ("198.18.1.2/32",), None, "t")


def test_positive_ttl(setup):
    cache, reg, clock = setup
    reg.peers[KEY] = peer()
    assert cache.lookup(KEY).outcome is Outcome.FETCHED
    assert cache.lookup(KEY) == cache.lookup(KEY)
    assert cache.lookup(KEY).outcome is Outcome.HIT and reg.calls == 1
    clock.now += 301
    assert cache.lookup(KEY).outcome is Outcome.FETCHED and reg.calls == 2


def test_negative_ttl(setup):
    cache, reg, clock = setup
    assert cache.lookup(KEY).outcome is Outcome.NOT_FOUND
    for _ in range(10):
        assert cache.lookup(KEY).outcome is Outcome.NEGATIVE_HIT
    assert reg.calls == 1
    clock.now += 31
    reg.peers[KEY] = peer()
    assert cache.lookup(KEY).outcome is Outcome.FETCHED


def test_stale_if_error_is_bounded(setup):
    cache, reg, clock = setup
    reg.peers[KEY] = peer()
    cache.lookup(KEY)
    reg.down = True
    clock.now += 301
    got = cache.lookup(KEY)
    assert got.outcome is Outcome.STALE and got.peer == peer()
    clock.now += 3600
    assert cache.lookup(KEY).outcome is Outcome.UNAVAILABLE
    assert cache.lookup("B" * 42 + "E=").outcome is Outcome.UNAVAILABLE


def test_revoked_replaces_positive_with_negative(setup):
    cache, reg, clock = setup
    reg.peers[KEY] = peer()
    cache.lookup(KEY)
    del reg.peers[KEY]
    clock.now += 301
    assert cache.lookup(KEY).outcome is Outcome.NOT_FOUND
    reg.down = True  # a revoked peer must not come back as stale
    clock.now += 31
    assert cache.lookup(KEY).outcome is Outcome.UNAVAILABLE


def test_invalidate_and_survives_reopen(setup, tmp_path):
    cache, reg, clock = setup
    reg.peers[KEY] = peer()
    cache.lookup(KEY)
    again = cache_over(tmp_path / "c.db", reg, TokenBucket(1, 1), clock=clock)
    assert again.lookup(KEY).outcome is Outcome.HIT  # on disk: a restart keeps it
    again.invalidate(KEY)
    assert cache.lookup(KEY).outcome is Outcome.FETCHED


def test_single_flight(setup):
    cache, reg, _ = setup
    reg.peers[KEY] = peer()
    reg.delay = 0.2
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.lookup(KEY)))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.calls == 1
    assert len(results) == 20 and all(r.peer == peer() for r in results)


def test_rate_limited_lookups_do_not_call(tmp_path):
    reg, clock = FakeRegistry(), Clock()
    cache = cache_over(tmp_path / "c.db", reg, TokenBucket(0.001, 2), CachePolicy(), clock,
                       token_wait=0.01)
    outcomes = [cache.lookup(f"{i:042d}E=").outcome for i in range(5)]
    assert outcomes.count(Outcome.NOT_FOUND) == 2
    assert outcomes.count(Outcome.RATE_LIMITED) == 3 and reg.calls == 2


def test_token_bucket_refills_at_rate():
    t = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: t[0])
    assert sum(bucket.try_acquire() for _ in range(20)) == 5
    t[0] += 0.5
    assert sum(bucket.try_acquire() for _ in range(20)) == 5
    t[0] += 10
    assert sum(bucket.try_acquire() for _ in range(20)) == 5  # never above burst


def test_token_bucket_wait_is_bounded():
    bucket = TokenBucket(rate=20, burst=1)
    assert bucket.acquire(0)
    started = time.monotonic()
    assert bucket.acquire(0.2)  # the next token comes after 50 ms
    assert time.monotonic() - started < 0.2
    slow = TokenBucket(rate=0.01, burst=1)
    slow.acquire(0)
    started = time.monotonic()
    assert not slow.acquire(0.05)
    assert time.monotonic() - started < 0.05


def test_the_misses_of_many_lookups_share_one_registry_call(setup):
    cache, reg, clock = setup
    keys = [f"{i:042d}E=" for i in range(50)]
    for k in keys[:40]:
        reg.peers[k] = peer(k)
    cache.lookup(keys[0])
    assert reg.calls == 1
    got = cache.lookup_many(keys + keys[:5])  # duplicates answered once
    assert reg.calls == 2  # one call for the 49 misses (the batcher's N is 128)
    assert got[keys[0]].outcome is Outcome.HIT
    assert all(got[k].outcome is Outcome.FETCHED and got[k].peer == peer(k)
               for k in keys[1:40])
    assert all(got[k].outcome is Outcome.NOT_FOUND for k in keys[40:])
    assert all(r.outcome is Outcome.HIT for r in cache.lookup_many(keys[:40]).values())
    reg.down = True
    clock.now += 301
    got = cache.lookup_many(keys)
    assert {r.outcome for r in got.values()} == {Outcome.STALE, Outcome.UNAVAILABLE}
    assert sum(r.outcome is Outcome.STALE for r in got.values()) == 40


def test_a_reload_changes_the_ttls_and_the_rate_in_place(setup):
    cache, reg, clock = setup
    reg.peers[KEY] = peer()
    assert cache.lookup(KEY).outcome is Outcome.FETCHED
    clock.now += 100
    assert cache.lookup(KEY).outcome is Outcome.HIT
    cache.configure(CachePolicy(positive_ttl=60, negative_ttl=30, stale_ttl=3600))
    cache.lookups.configure(0.001, 1, max_batch=4, linger=0)
    assert cache.lookup(KEY).outcome is Outcome.FETCHED, "100 s old is past the new 60 s TTL"
    assert cache.lookup("other").outcome is Outcome.RATE_LIMITED, "the new burst of 1 is spent"
    assert cache.lookups.max_batch == 4
    with pytest.raises(ValueError):
        cache.lookups.configure(1, 1, max_batch=0, linger=0)


def test_a_token_bucket_takes_a_new_rate_keeping_earned_tokens_up_to_the_burst():
    t = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: t[0])
    bucket.configure(100, 2)
    assert sum(bucket.try_acquire() for _ in range(5)) == 2
    t[0] += 0.01
    assert bucket.try_acquire() and not bucket.try_acquire()  # 100 a second now
    with pytest.raises(ValueError):
        bucket.configure(0, 1)
