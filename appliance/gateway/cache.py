"""The gateway's rate-limited cache of registry answers, in SQLite on local disk.

Positive entries (the peer) and negative entries (the registry said no) each
have a TTL. When the registry cannot answer, a positive entry up to
`stale_ttl` old is served anyway: a registry outage must not lock out clients
the gateway already knew. Concurrent lookups of one key share one registry
call (single flight), and the misses of many lookups share registry calls
(batch.py: one token per call, not per key). On disk, so a restarted gateway
still knows its clients while the registry is down.

Entries that stay valid while the feed is followed: the change feed drops the
entry of every key that changes (feed.py), so a positive entry fetched under
the current feed epoch is still right whatever its age, as long as the feed
has proved continuous within the last `feed_window` seconds. A reconcile
(gap, new feed identity, reused cursor) starts a new epoch, and a feed that
stops answering stops confirming: either way entries fall back to the TTLs.
A restarted gateway whose cursor still holds thus re-admits its known
clients without asking the registry, instead of one lookup each (issue 17).
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from appliance.gateway.batch import LookupBatcher, RateLimited
from appliance.gateway.peer import RegistryPeer, RegistryUnavailable
from appliance.gateway.settings import default

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    HIT = "hit"  # fresh positive entry
    NEGATIVE_HIT = "negative_hit"  # fresh negative entry
    FETCHED = "fetched"  # registry answered with the peer
    NOT_FOUND = "not_found"  # registry answered no
    STALE = "stale"  # registry unavailable, served an old positive entry
    UNAVAILABLE = "unavailable"  # registry unavailable, nothing to serve
    RATE_LIMITED = "rate_limited"  # no token in time, nothing to serve


@dataclass(frozen=True)
class Lookup:
    peer: RegistryPeer | None
    outcome: Outcome


# A dozen polls (60 s at the default 5 s interval), so one slow or missed poll on
# a loaded machine does not send every client to the registry, while a registry
# outage hands entries back to their TTLs (and stale-if-error) a minute later.
FEED_WINDOW_POLLS = 12
# Keys per cache read; SQLite allows 32,766 host parameters since 3.32, 999 before.
ROWS_PER_QUERY = 500


@dataclass(frozen=True)
class CachePolicy:
    positive_ttl: float = default("positive-ttl")
    negative_ttl: float = default("negative-ttl")
    stale_ttl: float = default("stale-ttl")
    # Entries of the feed's epoch stay valid this long after the feed last proved
    # continuous (the daemon sets FEED_WINDOW_POLLS feed intervals).
    feed_window: float = FEED_WINDOW_POLLS * default("feed-interval")



SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_cache (
    public_key TEXT PRIMARY KEY,
    found INTEGER NOT NULL,
    data TEXT,
    fetched_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# The feed epoch an entry was fetched under (NULL: TTL only); added to caches
# made before it existed.
EPOCH_COLUMN = "ALTER TABLE peer_cache ADD COLUMN feed_epoch TEXT"


class PeerCache:
    def __init__(self, path: str | Path, lookups: LookupBatcher,
                 policy: CachePolicy = CachePolicy(),
                 clock: Callable[[], float] = time.time) -> None:
        self.lookups = lookups
        self.policy = policy
        self._clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(peer_cache)")}
        if "feed_epoch" not in columns:
            self._db.execute(EPOCH_COLUMN)
        row = self._db.execute("SELECT value FROM cache_meta WHERE key = 'feed_epoch'"
                               ).fetchone()
        self.feed_epoch: str | None = row[0] if row else None
        self._feed_ok_at = float("-inf")  # not confirmed by this process yet
        self._db_lock = threading.Lock()
        self._inflight: dict[str, Future[Lookup]] = {}
        self._inflight_lock = threading.Lock()
        self._changed_in_flight: set[str] = set()

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    def configure(self, policy: CachePolicy) -> None:
        """New TTLs (a reload); entries and lookups in flight stay. The registry's
        rate and batch size are the batcher's (LookupBatcher.configure)."""
        self.policy = policy

    # storage

    def _rows(self, keys: list[str]) -> dict[str, tuple[bool, RegistryPeer | None, float]]:
        """The stored entries of `keys`, read with one query per ROWS_PER_QUERY keys:
        a query per key, each under the connection's lock, had a worker wait for
        that lock a sixth of its time in a 10,000-client herd (py-spy)."""
        rows = []
        with self._db_lock:
            for i in range(0, len(keys), ROWS_PER_QUERY):
                chunk = keys[i:i + ROWS_PER_QUERY]
                rows += self._db.execute(
                    "SELECT public_key, found, data, fetched_at, feed_epoch FROM peer_cache"
                    f" WHERE public_key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        now = self._clock()
        entries = {}
        for key, found, data, fetched_at, epoch in rows:
            peer = RegistryPeer.from_json(json.loads(data)) if found else None
            if found and self._feed_vouches(epoch):
                fetched_at = now  # as good as fetched now
            entries[key] = (bool(found), peer, fetched_at)
        return entries

    def _store(self, key: str, peer: RegistryPeer | None, epoch: str | None = None) -> None:
        self._store_many({key: peer}, {key: epoch})

    def _store_many(self, answers: dict[str, RegistryPeer | None],
                    epochs: dict[str, str | None]) -> None:
        """Store a registry answer; epochs: the feed epoch each positive entry was
        fetched under (missing or None: TTLs only)."""
        now = self._clock()
        rows = [(key, int(peer is not None), json.dumps(peer.to_json()) if peer else None, now,
                 epochs.get(key) if peer else None)
                for key, peer in answers.items()]
        # One transaction per registry answer, not one per key; IMMEDIATE takes the
        # write lock up front (the replay store and the feed state share the file).
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO peer_cache (public_key, found, data, fetched_at,"
                    " feed_epoch) VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # feed continuity (feed.py drives these)

    def new_feed_epoch(self) -> None:
        """The feed restarts (reconcile): entries fetched before fall back to TTLs."""
        epoch = secrets.token_hex(8)
        with self._db_lock:
            self._db.execute("INSERT OR REPLACE INTO cache_meta (key, value)"
                             " VALUES ('feed_epoch', ?)", (epoch,))
        self.feed_epoch = epoch

    def feed_confirmed(self) -> None:
        """The feed was just read through without a gap in the current epoch."""
        self._feed_ok_at = self._clock()

    def feed_continuous(self) -> bool:
        return self._clock() - self._feed_ok_at < self.policy.feed_window

    def _feed_vouches(self, epoch: str | None) -> bool:
        return epoch is not None and epoch == self.feed_epoch and self.feed_continuous()

    def knows(self, key: str) -> bool:
        """Has the registry ever said yes to this key (a positive entry, of any age)?

        One indexed read (~10 us): cheap enough for the capture thread, which uses
        it to put a lookup in the known lane (admission.py).
        """
        with self._db_lock:
            return self._db.execute("SELECT 1 FROM peer_cache WHERE public_key = ? AND found",
                                    (key,)).fetchone() is not None

    def invalidate(self, key: str) -> None:
        """Forget a key (revoked, deleted, changed): the next lookup asks the registry."""
        with self._inflight_lock:
            if key in self._inflight:
                # The answer in flight may predate this change: when it lands it
                # gets the TTLs only, not the feed's word.
                self._changed_in_flight.add(key)
        with self._db_lock:
            self._db.execute("DELETE FROM peer_cache WHERE public_key = ?", (key,))

    def put(self, peer: RegistryPeer) -> None:
        """A fresh answer from the registry, fetched by the feed's own thread."""
        self._store(peer.public_key, peer, self.feed_epoch)

    def clear(self) -> None:
        with self._db_lock:
            self._db.execute("DELETE FROM peer_cache")

    def expire(self) -> int:
        """Drop entries too old to serve even as stale; returns how many."""
        now = self._clock()
        kept_epoch = self.feed_epoch if self.feed_continuous() else None
        with self._db_lock:
            cur = self._db.execute(
                "DELETE FROM peer_cache WHERE (found = 1 AND fetched_at < ?"
                " AND feed_epoch IS NOT ?) OR (found = 0 AND fetched_at < ?)",
                (now - self.policy.stale_ttl, kept_epoch, now - self.policy.negative_ttl),
            )
        return cur.rowcount

    def __len__(self) -> int:
        with self._db_lock:
            return self._db.execute("SELECT count(*) FROM peer_cache").fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Entries by kind: "found" (a peer) and "not_found" (a key the registry denied)."""
        with self._db_lock:
            rows = self._db.execute("SELECT found, count(*) FROM peer_cache GROUP BY found")
            by = dict(rows.fetchall())
        return {"found": by.get(1, 0), "not_found": by.get(0, 0)}

    # lookup

    def lookup(self, key: str) -> Lookup:
        return self.lookup_many([key])[key]

    def lookup_many(self, keys: list[str]) -> dict[str, Lookup]:
        """Each key's answer: from the cache when fresh, else from the registry, the
        misses of this call sharing registry calls with each other and with other
        threads' (batch.py). A key another thread is already fetching is waited for."""
        results: dict[str, Lookup] = {}
        lead: dict[str, tuple[Future[Lookup], object]] = {}
        follow: dict[str, Future[Lookup]] = {}
        unique = list(dict.fromkeys(keys))
        stored = self._rows(unique)
        for key in unique:
            cached = stored.get(key)
            fresh = self._fresh(cached)
            if fresh is not None:
                results[key] = fresh
                continue
            with self._inflight_lock:
                future = self._inflight.get(key)
                if future is None:
                    lead[key] = (self._inflight.setdefault(key, Future()), cached)
                else:
                    follow[key] = future
        if lead:
            try:
                results.update(self._ask_registry(lead))
            finally:
                with self._inflight_lock:
                    for key, (future, _) in lead.items():
                        if not future.done():  # this thread failed: its followers must not hang
                            future.set_exception(RegistryUnavailable("lookup failed"))
                        del self._inflight[key]
                        self._changed_in_flight.discard(key)
        for key, future in follow.items():
            try:
                results[key] = future.result()
            except Exception:  # noqa: BLE001 - the leading thread failed; it logged why
                results[key] = Lookup(None, Outcome.UNAVAILABLE)
        return results

    def _fresh(self, cached) -> Lookup | None:
        if cached is None:
            return None
        found, peer, fetched_at = cached
        age = self._clock() - fetched_at
        if found and age < self.policy.positive_ttl:
            return Lookup(peer, Outcome.HIT)
        if not found and age < self.policy.negative_ttl:
            return Lookup(None, Outcome.NEGATIVE_HIT)
        return None

    def _ask_registry(self, lead: dict[str, tuple[Future[Lookup], object]]) -> dict[str, Lookup]:
        # Before the call: the answers reflect at least this epoch (a batch may carry
        # other threads' keys; each thread stores its own under the epoch it saw).
        epoch = self.feed_epoch
        answers = dict(zip(lead, self.lookups.submit(list(lead)), strict=True))
        results: dict[str, Lookup] = {}
        fetched: dict[str, RegistryPeer | None] = {}
        for key, answer in answers.items():
            cached = lead[key][1]
            try:
                peer = answer.result()
            except RateLimited:
                results[key] = self._fallback(cached, Outcome.RATE_LIMITED)
            except Exception as e:  # noqa: BLE001 - RegistryUnavailable, or a bad answer
                if not isinstance(e, RegistryUnavailable):
                    log.error("registry lookup of %s failed: %r", key, e)
                results[key] = self._fallback(cached, Outcome.UNAVAILABLE)
            else:
                fetched[key] = peer
                results[key] = Lookup(peer, Outcome.FETCHED if peer else Outcome.NOT_FOUND)
        if fetched:
            with self._inflight_lock:  # held so no invalidate() slips between check and store
                self._store_many(fetched, {k: None if k in self._changed_in_flight else epoch
                                           for k in fetched})
        for key, result in results.items():
            lead[key][0].set_result(result)
        return results

    def _fallback(self, cached, outcome: Outcome) -> Lookup:
        if cached is not None:
            found, peer, fetched_at = cached
            if found and self._clock() - fetched_at < self.policy.stale_ttl:
                return Lookup(peer, Outcome.STALE)
        return Lookup(None, outcome)
