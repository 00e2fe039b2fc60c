"""The change-feed follower with an in-memory registry, real SQLite state and cache.

tests/lab/test_housekeeping.py runs the same paths against the real registry,
daemon and wireguard-go (revoke, restore, allowed-IP change, kill -9, outage).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from pathlib import Path

import pytest

from appliance.gateway.batch import LookupBatcher
from appliance.gateway.cache import CachePolicy, Outcome, PeerCache
from appliance.gateway.feed import ADOPTED_CHECKS_PER_POLL, FeedFollower
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import (
    CursorMismatch,
    PeerNotFound,
    RegistryPeer,
    RegistryUnavailable,
)
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.state import GatewayState
from appliance.keys import encode_key
from appliance.registry.store.shared import change_digest
from tests.unit.test_evict import FakeDevice, sample


def key() -> str:
    return encode_key(os.urandom(32))


class FakeRegistry:
    """The registry's gateway API: peers, and a change log with cursors."""

    def __init__(self) -> None:
        self.peers: dict[str, RegistryPeer] = {}
        self.revoked: set[str] = set()
        self.log: list[dict] = []
        self.next_cursor = 1
        self.feed_id = uuid.uuid4().hex
        self.down = False
        self.peer_calls = 0
        self.legacy = False
        self.feed_reads: list[tuple[int, str | None]] = []  # a registry from before change digests
        self._clock = itertools.count(1)

    def _change(self, op: str, k: str) -> None:
        row = {"cursor": self.next_cursor, "op": op, "public_key": k, "tenant": "t",
               "at": next(self._clock)}
        self.log.append({**row, "digest": change_digest(row)})
        self.next_cursor += 1

    def restore_backup(self, backup: FakeRegistry) -> None:
        """The database rolled back to an earlier copy; the feed_id stays the same."""
        self.peers, self.revoked = dict(backup.peers), set(backup.revoked)
        self.log, self.next_cursor = list(backup.log), backup.next_cursor

    def backup(self) -> FakeRegistry:
        copy = FakeRegistry()
        copy.restore_backup(self)
        return copy

    def create(self, k: str, *ips: str) -> None:
        # Each its own address by default: a gateway refuses overlapping peers.
        n = len(self.peers) + 1
        default = (f"198.18.{1 + (n >> 8)}.{n & 255}/32",)  # the first: 198.18.1.1
        self.peers[k] = RegistryPeer(k, ips or default, None, "t")
        self._change("create", k)

    def revoke(self, k: str) -> None:
        self.revoked.add(k)
        self._change("revoke", k)

    def restore(self, k: str) -> None:
        self.revoked.discard(k)
        self._change("restore", k)

    def delete(self, k: str) -> None:
        self.peers.pop(k)
        self._change("delete", k)

    def update(self, k: str, *ips: str) -> None:
        self.peers[k] = RegistryPeer(k, ips, None, "t")
        self._change("update", k)

    def trim(self, below: int) -> None:
        self.log = [c for c in self.log if c["cursor"] >= below]

    # what GatewayRegistry offers
    def peer(self, k: str) -> RegistryPeer:
        if self.down:
            raise RegistryUnavailable("down")
        self.peer_calls += 1
        if k not in self.peers or k in self.revoked:
            raise PeerNotFound(k)
        return self.peers[k]

    def lookup(self, keys: list[str]) -> dict:
        """GatewayRegistry.lookup: each key's peer or None."""
        found = {}
        for k in keys:
            try:
                found[k] = self.peer(k)
            except PeerNotFound:
                found[k] = None
        return found

    def changes(self, since: int, limit: int = 1000, digest: str | None = None) -> dict:
        if self.down:
            raise RegistryUnavailable("down")
        self.feed_reads.append((since, digest))
        rows = [c for c in self.log if c["cursor"] > since][: limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        at = {c["cursor"]: c["digest"] for c in self.log}
        latest = self.log[-1]["cursor"] if self.log else 0
        page = {"changes": rows, "cursor": rows[-1]["cursor"] if rows else since,
                "latest": latest, "earliest": self.log[0]["cursor"] if self.log else 0,
                "more": more, "feed_id": self.feed_id}
        if self.legacy:
            return {**page, "changes": [{k: v for k, v in c.items() if k != "digest"}
                                        for c in rows]}
        if digest is not None and since > 0 and at.get(since) != digest:
            raise CursorMismatch(f"cursor {since}")
        return {**page, "cursor_digest": rows[-1]["digest"] if rows else at.get(since),
                "since_digest": at.get(since), "latest_digest": at.get(latest)}


class World:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reg = FakeRegistry()
        self.dev = FakeDevice()
        self.inst = Installer(self.dev)
        self.metrics = GatewayMetrics()
        self.removed: list[tuple[str, str]] = []
        self.open()

    def open(self) -> None:
        db = self.path / "gateway.db"
        self.state = GatewayState(db)
        self.cache = PeerCache(db, LookupBatcher(self.reg.lookup, TokenBucket(1000, 1000),
                                                 linger=0), CachePolicy())
        self.feed = FeedFollower(self.reg, self.state, self.cache, self.inst, self.metrics,
                                 lambda k, r: self.removed.append((k, r)))

    def restart(self) -> None:
        """A new daemon on the same state dir (the device and its peers stay)."""
        self.state.close()
        self.cache.close()
        self.inst = Installer(self.dev)
        self.metrics = GatewayMetrics()
        self.open()

    def install(self, k: str) -> None:
        assert self.inst.install(self.reg.peer(k), "192.0.2.50:40000")


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def test_first_start_reconciles_then_follows(w: World) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.reg.create(b)
    w.install(a)
    w.install(b)
    w.reg.revoke(b)
    w.feed.poll()
    assert sample(w.metrics.reconciles) == 1
    assert b not in w.inst and b not in w.dev.table and w.removed == [(b, "revoked")]
    assert a in w.dev.table
    assert w.feed.cursor == w.reg.log[-1]["cursor"]
    assert w.state.get("feed_id") == w.reg.feed_id
    # Following from here: no second reconcile.
    w.reg.revoke(a)
    assert w.feed.poll() == 1
    assert a not in w.dev.table and sample(w.metrics.reconciles) == 1


def test_revoke_and_delete_remove_and_drop_the_cache(w: World) -> None:
    a, b, idle = key(), key(), key()
    for k in (a, b, idle):
        w.reg.create(k)
    w.feed.poll()
    w.install(a)
    w.install(b)
    assert w.cache.lookup(idle).outcome == Outcome.FETCHED  # cached, not installed
    w.reg.revoke(a)
    w.reg.delete(b)
    w.reg.revoke(idle)
    assert w.feed.poll() == 3
    assert sorted(w.removed) == sorted([(a, "revoked"), (b, "deleted")])
    assert w.dev.table == {}
    # None of them is served from the cache any more.
    for k in (a, b, idle):
        assert w.cache.lookup(k).outcome == Outcome.NOT_FOUND


def test_restore_drops_the_negative_entry(w: World) -> None:
    a = key()
    w.reg.create(a)
    w.feed.poll()
    w.reg.revoke(a)
    w.feed.poll()
    assert w.cache.lookup(a).outcome == Outcome.NOT_FOUND
    assert w.cache.lookup(a).outcome == Outcome.NEGATIVE_HIT
    w.reg.restore(a)
    w.feed.poll()
    assert w.cache.lookup(a).outcome == Outcome.FETCHED


def test_update_changes_an_installed_peer_in_place(w: World) -> None:
    a = key()
    w.reg.create(a, "198.18.1.1/32")
    w.feed.poll()
    w.install(a)
    w.reg.update(a, "198.18.1.1/32", "198.18.2.1/32")
    w.feed.poll()
    assert {str(n) for n in w.dev.table[a].allowed_ips} == {"198.18.1.1/32", "198.18.2.1/32"}
    assert w.dev.removals == [], "updated in place, not removed and added"
    assert w.inst.get(a).allowed_ips == ("198.18.1.1/32", "198.18.2.1/32")
    assert w.cache.lookup(a).peer.allowed_ips == ("198.18.1.1/32", "198.18.2.1/32")


def test_unchanged_peers_are_not_rewritten(w: World, monkeypatch) -> None:
    a = key()
    w.reg.create(a)
    w.install(a)
    writes = []
    monkeypatch.setattr(w.inst, "update", lambda p: writes.append(p) or True)
    w.feed.poll()  # first start: reconcile finds nothing to change
    w.reg.update(a, "198.18.1.1/32")  # an update that changes nothing the device holds
    w.feed.poll()
    assert writes == []


@pytest.mark.parametrize("why", ["gap", "feed_id", "reset"])
def test_an_untrustworthy_feed_forces_a_full_reconcile(w: World, why: str) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.reg.create(b)
    w.feed.poll()
    w.install(a)
    w.install(b)
    w.reg.revoke(b)  # a change the gateway must not miss ...
    if why == "gap":
        for _ in range(3):
            w.reg.create(key())
        w.reg.trim(w.reg.next_cursor - 1)  # ... but the feed no longer has it
    elif why == "feed_id":
        w.reg.feed_id = uuid.uuid4().hex  # another database behind the same URL
        w.reg.log = []
        w.reg.next_cursor = 1
    else:
        w.reg.log = []  # restored from a backup older than our cursor
        w.reg.next_cursor = 1
        w.reg.create(key())
    w.feed.poll()
    assert sample(w.metrics.reconciles) == 2
    assert b not in w.dev.table and a in w.dev.table
    assert w.state.get("feed_id") == w.reg.feed_id
    assert w.feed.cursor == (w.reg.log[-1]["cursor"] if w.reg.log else 0)


def test_pages_are_followed_to_the_end(w: World) -> None:
    w.feed.poll()
    keys = [key() for _ in range(2500)]
    for k in keys:
        w.reg.create(k)
    assert w.feed.poll() == 2500
    assert w.feed.cursor == w.reg.log[-1]["cursor"]


def test_registry_down_catches_up_later(w: World) -> None:
    a = key()
    w.reg.create(a)
    w.feed.poll()
    w.install(a)
    cursor = w.feed.cursor
    w.reg.revoke(a)
    w.reg.down = True
    assert w.feed.poll() == 0
    assert not w.feed.healthy and sample(w.metrics.feed_errors) == 1
    assert a in w.dev.table and w.feed.cursor == cursor
    w.reg.down = False
    assert w.feed.poll() == 1
    assert w.feed.healthy and a not in w.dev.table


def test_the_cursor_survives_a_restart(w: World) -> None:
    a, b = key(), key()
    w.reg.create(a)
    w.reg.create(b)
    w.feed.poll()
    w.install(a)
    w.install(b)
    w.restart()  # as after kill -9: a new process, same state dir, same device
    adopted = w.inst.adopt()
    w.feed.check_adopted(adopted)
    w.reg.revoke(b)
    calls = w.reg.peer_calls
    assert w.feed.poll() == 1
    assert sample(w.metrics.reconciles) == 0, "resumed from the saved cursor"
    assert b not in w.dev.table and a in w.dev.table
    assert w.reg.peer_calls - calls == 1, "the adopted peer left is checked once"
    w.feed.poll()
    assert w.reg.peer_calls - calls == 1


def test_adopted_peers_unknown_to_the_registry_are_removed(w: World) -> None:
    w.feed.poll()  # a cursor exists: no full reconcile at the restart below
    stranger, known = key(), key()
    w.reg.create(known)
    w.dev.put(stranger, handshake=None)  # put there by hand, or by another registry
    w.dev.put(known, handshake=None)
    w.restart()
    w.feed.check_adopted(w.inst.adopt())
    w.feed.poll()
    assert stranger not in w.dev.table and known in w.dev.table
    assert w.removed == [(stranger, "revoked")]


def test_adopted_checks_are_spread_over_polls(w: World) -> None:
    w.feed.poll()
    n = ADOPTED_CHECKS_PER_POLL + 10
    keys = [key() for _ in range(n)]
    for k in keys:
        w.reg.create(k)
        w.dev.put(k)
    w.restart()
    w.feed.check_adopted(w.inst.adopt())
    w.feed.poll()
    assert w.reg.peer_calls == ADOPTED_CHECKS_PER_POLL
    w.feed.poll()
    assert w.reg.peer_calls == n


def test_adopted_checks_wait_out_a_registry_outage(w: World) -> None:
    w.feed.poll()
    k = key()
    w.dev.put(k)  # unknown to the registry
    w.restart()
    w.feed.check_adopted(w.inst.adopt())
    w.reg.down = True
    w.feed.poll()
    assert k in w.dev.table  # an outage is not a verdict
    w.reg.down = False
    w.feed.poll()
    assert k not in w.dev.table


def test_an_adopted_peer_gets_the_registry_config_once_quietly(w: World, caplog) -> None:
    w.feed.poll()
    k = key()
    w.reg.create(k, "198.18.1.7/32", "fd00::1:7/128")
    w.dev.put(k)  # on the device with no allowed IPs (or stale ones)
    w.restart()
    w.feed.check_adopted(w.inst.adopt())
    with caplog.at_level("INFO", logger="wgjit.events"):
        w.feed.poll()
        w.feed.poll()
    assert {str(n) for n in w.dev.table[k].allowed_ips} == {"198.18.1.7/32", "fd00::1:7/128"}
    assert w.inst.get(k).allowed_ips == ("198.18.1.7/32", "fd00::1:7/128")
    assert not [r for r in caplog.records if r.getMessage() == "peer_updated"]
    assert w.dev.removals == []


def test_a_pull_in_flight_during_a_revocation_can_tell(w: World) -> None:
    # The daemon asks removed_since(key, capture time) after its install: a pull that
    # began before the revocation must undo what it did after the feed's removal.
    a, other = key(), key()
    w.reg.create(a)
    w.reg.create(other)
    w.feed.poll()
    began = time.time()
    w.reg.revoke(a)
    w.feed.poll()
    assert w.feed.removed_since(a, began)
    assert not w.feed.removed_since(a, time.time() + 1)  # a pull that began later
    assert not w.feed.removed_since(other, began)
    w.reg.restore(a)
    w.feed.poll()
    assert not w.feed.removed_since(a, began), "restored: an install is legitimate again"
    # A reconcile that finds a key gone counts too.
    w.install(other)
    w.reg.revoke(other)
    w.reg.trim(w.reg.next_cursor)  # a gap: the revoke is only seen by the reconcile
    w.reg.create(key())
    w.feed.poll()
    assert other not in w.dev.table and w.feed.removed_since(other, began)
