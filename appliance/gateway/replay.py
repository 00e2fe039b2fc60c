"""Replay guard: per initiator key, accept only a strictly newer TAI64N timestamp.

WireGuard's own defence against a replayed initiation is the same rule
(whitepaper 5.1: the responder keeps the greatest timestamp per peer). The
gateway needs its own copy because it acts on a message before the data plane
knows the peer: without it, anyone who recorded one initiation could replay it
to make the gateway pull and install that peer again and again.

Two kinds of keys, kept apart so that one cannot push the other out:
- keys that are or were installed (`keep`): their latest timestamp is in the
  gateway's SQLite state too, loaded at start, so neither a restart nor a flood
  of random keys makes an old capture of a real client acceptable again. About
  100 bytes on disk and ~200 in memory per key; a gateway sees its own clients
  only.
- every other key that proved itself (an unregistered key, or one whose lookup
  is still running): an in-memory LRU of `capacity` keys (~220 bytes each on
  CPython, measured: 100,000 keys ~22 MB). A random-key flood churns this one
  only. A key evicted from it can be replayed once more: the worst that buys is
  one rate-limited lookup of a key that was never installed.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

DEFAULT_CAPACITY = 100_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_memory (
    public_key BLOB PRIMARY KEY,
    timestamp BLOB NOT NULL
);
"""


class ReplayStore:
    """The latest timestamps of installed keys, in the gateway's state database."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self._db.execute("SELECT public_key, timestamp FROM replay_memory"))

    def put(self, public_key: bytes, timestamp: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replay_memory (public_key, timestamp) "
                             "VALUES (?, ?)", (public_key, timestamp))

    def delete(self, public_key: bytes) -> None:
        with self._lock:
            self._db.execute("DELETE FROM replay_memory WHERE public_key = ?", (public_key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ReplayGuard:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, store: ReplayStore | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._store = store
        self._kept: dict[bytes, bytes] = store.load() if store is not None else {}
        self._latest: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._latest) + len(self._kept)

    def kept(self, public_key: bytes) -> bool:
        return public_key in self._kept

    def accept(self, public_key: bytes, timestamp: bytes) -> bool:
        """Record and accept `timestamp` if it is newer than any seen for this key.

        Call only with a timestamp that decrypted (Responder.consume_initiation):
        an unauthenticated timestamp recorded here would lock the real client out.
        TAI64N is big-endian, so byte order is time order.
        """
        with self._lock:
            kept = self._kept.get(public_key)
            if kept is not None:
                if timestamp <= kept:
                    return False
                self._kept[public_key] = timestamp
                if self._store is not None:
                    self._store.put(public_key, timestamp)
                return True
            last = self._latest.get(public_key)
            if last is not None and timestamp <= last:
                return False
            self._latest[public_key] = timestamp
            self._latest.move_to_end(public_key)
            while len(self._latest) > self.capacity:
                self._latest.popitem(last=False)
                self.evictions += 1
            return True

    def keep(self, public_key: bytes, timestamp: bytes) -> None:
        """The key was installed by an initiation stamped `timestamp`: keep its
        latest timestamp for good (and on disk)."""
        with self._lock:
            latest = max(timestamp, self._latest.pop(public_key, timestamp),
                         self._kept.get(public_key, timestamp))
            self._kept[public_key] = latest
            if self._store is not None:
                self._store.put(public_key, latest)

    def forget(self, public_key: bytes) -> None:
        with self._lock:
            self._latest.pop(public_key, None)
            if self._kept.pop(public_key, None) is not None and self._store is not None:
                self._store.delete(public_key)
