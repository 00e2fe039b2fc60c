"""A feed cursor names its change (issue 12): a restored or rolled-back registry
that hands the same cursor numbers out again cannot hide a revocation.

The registry here is tests/unit/test_feed.py's in-memory one, which checks
digests like the real route; tests/registry/test_feed_restore.py runs the real
registry on both engines and tests/lab/test_feed_restore.py the whole path.
"""

from __future__ import annotations

import pytest

from appliance.gateway.cache import Outcome
from tests.unit.test_evict import sample
from tests.unit.test_feed import World, key


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


def test_a_revocation_on_a_reused_cursor_is_not_lost(w: World) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.reg.create(b)
    w.feed.poll()
    w.install(a)
    w.install(b)
    backup = w.reg.backup()  # cursor 2
    w.reg.create(key())
    w.reg.create(key())
    w.feed.poll()
    assert w.feed.cursor == 4
    w.reg.restore_backup(backup)  # back to cursor 2, same feed_id
    w.reg.revoke(b)  # cursor 3 again, another change
    w.reg.create(key())  # cursor 4 again: the gateway's position looks current
    w.feed.poll()
    assert b not in w.dev.table and (b, "revoked") in w.removed
    assert a in w.dev.table
    assert sample(w.metrics.reconciles) == 2
    assert w.feed.cursor == 4 and w.state.get("feed_digest") == w.reg.log[-1]["digest"]
    # From there the feed is followed again, checked by digest.
    w.reg.revoke(a)
    assert w.feed.poll() == 1
    assert a not in w.dev.table and sample(w.metrics.reconciles) == 2
    assert w.reg.feed_reads[-1] == (4, w.reg.log[-2]["digest"])


def test_every_read_names_the_change_at_its_cursor(w: World) -> None:
    w.reg.create(key())
    w.feed.poll()
    w.reg.create(key())
    w.feed.poll()
    assert w.reg.feed_reads[-1] == (1, w.reg.log[0]["digest"])
    assert w.state.get("feed_digest") == w.reg.log[1]["digest"]


def test_a_cursor_saved_without_a_digest_is_checked_once_in_full(w: World) -> None:
    a = key()
    w.reg.create(a)
    w.reg.create(key())
    w.feed.poll()
    w.install(a)
    w.state.set(feed_digest="")  # as a gateway from before digests left it
    w.reg.revoke(a)
    w.feed.poll()
    assert sample(w.metrics.reconciles) == 2 and a not in w.dev.table
    w.reg.create(key())
    w.feed.poll()
    assert sample(w.metrics.reconciles) == 2


def test_a_registry_without_digests_is_followed_as_before(w: World) -> None:
    w.reg.legacy = True
    a = key()
    w.reg.create(a)
    w.feed.poll()
    w.install(a)
    w.reg.revoke(a)
    assert w.feed.poll() == 1
    assert a not in w.dev.table and sample(w.metrics.reconciles) == 1
    assert w.reg.feed_reads[-1] == (1, None)


def test_the_periodic_audit_catches_what_no_feed_said(w: World) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.reg.create(b)
    w.feed.poll()
    w.install(a)
    w.install(b)
    w.reg.revoked.add(b)  # revoked with no change in the feed at all
    w.feed.poll()
    assert b in w.dev.table, "the feed alone cannot know"
    w.feed.audit()
    w.feed.poll()
    assert b not in w.dev.table and a in w.dev.table
    assert sample(w.metrics.reconciles) == 1, "an audit is not a reconcile"


# --- the peer cache rides on the feed's continuity (issue 17) -----------------------

def _age_past_ttl(w: World) -> None:
    """Make every cache entry older than the positive TTL."""
    with w.cache._db_lock:
        w.cache._db.execute("UPDATE peer_cache SET fetched_at = fetched_at - ?",
                            (w.cache.policy.positive_ttl + 1,))


def test_a_restarted_gateway_with_a_continuous_feed_asks_the_registry_nothing(w: World):
    keys = [key() for _ in range(5)]
    for k in keys:
        w.reg.create(k)
    w.feed.poll()
    for k in keys:
        assert w.cache.lookup(k).outcome is Outcome.FETCHED
    w.restart()
    _age_past_ttl(w)
    calls = w.reg.peer_calls
    w.feed.poll()
    assert [w.cache.lookup(k).outcome for k in keys] == [Outcome.HIT] * 5
    assert w.reg.peer_calls == calls
    # A change to one key still reaches it.
    w.reg.update(keys[0], "198.18.9.9/32")
    w.feed.poll()
    got = w.cache.lookup(keys[0])
    assert got.outcome is Outcome.FETCHED and got.peer.allowed_ips == ("198.18.9.9/32",)


def test_after_a_reused_cursor_entries_fall_back_to_the_ttl(w: World) -> None:
    a = key()
    w.reg.create(a)
    w.feed.poll()
    w.cache.lookup(a)
    backup = w.reg.backup()
    w.reg.create(key())
    w.feed.poll()
    _age_past_ttl(w)
    w.reg.restore_backup(backup)
    w.reg.create(key())
    w.reg.create(key())
    w.feed.poll()  # mismatch: reconcile, a new epoch
    _age_past_ttl(w)
    assert w.cache.lookup(a).outcome is Outcome.FETCHED


def test_resume_at_start_follows_a_continuous_feed_and_nothing_more(w: World) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.feed.poll()
    w.cache.lookup(a)
    w.restart()
    w.feed.check_adopted([a])
    _age_past_ttl(w)
    w.reg.create(b)
    calls = w.reg.peer_calls
    w.feed.resume()
    assert w.feed.cursor == 2 and w.reg.peer_calls == calls, "adopted checks wait"
    assert w.cache.lookup(a).outcome is Outcome.HIT


def test_resume_leaves_a_reconcile_to_the_scheduled_poll(w: World) -> None:
    a = key()
    w.reg.create(a)
    w.reg.create(key())
    w.feed.poll()
    w.install(a)
    backup = w.reg.backup()
    w.reg.create(key())
    w.feed.poll()
    w.reg.restore_backup(backup)
    w.reg.revoke(a)
    w.restart()
    w.feed.check_adopted(w.inst.adopt())
    calls = w.reg.peer_calls
    w.feed.resume()
    assert w.reg.peer_calls == calls and sample(w.metrics.reconciles) == 0
    assert not w.feed.healthy and not w.cache.feed_continuous()
    w.feed.poll()
    assert sample(w.metrics.reconciles) == 1 and a not in w.dev.table
