"""The gateway's rate-limited cache of registry answers, in SQLite on local disk.

Positive entries (the peer) and negative entries (the registry said no) each
have a TTL. When the registry cannot answer, a positive entry up to
`stale_ttl` old is served anyway: a registry outage must not lock out clients
the gateway already knew. Concurrent lookups of one key share one registry
call (single flight), and the misses of many lookups share registry calls
(batch.py: one token per call, not per key). On disk, so a restarted gateway
still knows its clients while the registry is down.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from appliance.gateway.batch import LookupBatcher, RateLimited
from appliance.gateway.pull import RegistryPeer, RegistryUnavailable

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


@dataclass(frozen=True)
class CachePolicy:
    positive_ttl: float = 300.0
    negative_ttl: float = 30.0
    stale_ttl: float = 86_400.0


SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_cache (
    public_key TEXT PRIMARY KEY,
    found INTEGER NOT NULL,
    data TEXT,
    fetched_at REAL NOT NULL
);
"""


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
        self._db_lock = threading.Lock()
        self._inflight: dict[str, Future[Lookup]] = {}
        self._inflight_lock = threading.Lock()

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    # storage

    def _row(self, key: str) -> tuple[bool, RegistryPeer | None, float] | None:
        with self._db_lock:
            row = self._db.execute(
                "SELECT found, data, fetched_at FROM peer_cache WHERE public_key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        found, data, fetched_at = row
        peer = RegistryPeer.from_json(json.loads(data)) if found else None
        return bool(found), peer, fetched_at

    def _store(self, key: str, peer: RegistryPeer | None) -> None:
        self._store_many({key: peer})

    def _store_many(self, answers: dict[str, RegistryPeer | None]) -> None:
        now = self._clock()
        rows = [(key, int(peer is not None), json.dumps(peer.to_json()) if peer else None, now)
                for key, peer in answers.items()]
        # One transaction per registry answer, not one per key; IMMEDIATE takes the
        # write lock up front (the replay store and the feed state share the file).
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO peer_cache (public_key, found, data, fetched_at)"
                    " VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        with self._db_lock:
            self._db.execute("DELETE FROM peer_cache WHERE public_key = ?", (key,))

    def put(self, peer: RegistryPeer) -> None:
        self._store(peer.public_key, peer)

    def clear(self) -> None:
        with self._db_lock:
            self._db.execute("DELETE FROM peer_cache")

    def expire(self) -> int:
        """Drop entries too old to serve even as stale; returns how many."""
        now = self._clock()
        with self._db_lock:
            cur = self._db.execute(
                "DELETE FROM peer_cache WHERE (found = 1 AND fetched_at < ?)"
                " OR (found = 0 AND fetched_at < ?)",
                (now - self.policy.stale_ttl, now - self.policy.negative_ttl),
            )
        return cur.rowcount

    def __len__(self) -> int:
        with self._db_lock:
            return self._db.execute("SELECT count(*) FROM peer_cache").fetchone()[0]

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
        for key in dict.fromkeys(keys):
            cached = self._row(key)
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
            self._store_many(fetched)
        for key, result in results.items():
            lead[key][0].set_result(result)
        return results

    def _fallback(self, cached, outcome: Outcome) -> Lookup:
        if cached is not None:
            found, peer, fetched_at = cached
            if found and self._clock() - fetched_at < self.policy.stale_ttl:
                return Lookup(peer, Outcome.STALE)
        return Lookup(None, outcome)
