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
FLUSH_EVERY = 0.5  # seconds between writes of the noted timestamps (ReplayStore)

SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_memory (
    public_key BLOB PRIMARY KEY,
    timestamp BLOB NOT NULL
);
"""


class ReplayStore:
    """The latest timestamps of installed keys, in the gateway's state database.

    Written behind: put and delete only note the change, and `flush` (a
    scheduled job every FLUSH_EVERY, and close) writes what is noted in one
    transaction. A write per install or per accepted rekey, made under the
    guard's lock, held the capture thread: in a 10,000-client herd it spent
    60% of its time waiting for that lock (py-spy). What a crash loses is at
    most FLUSH_EVERY of timestamps; the memory still holds every older one,
    so the worst it buys is what a key pushed out of the LRU buys: an old
    capture accepted once, for one rate-limited lookup.
    """

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()  # the connection
        self._noted_lock = threading.Lock()  # the notes: never held while writing
        self._noted: dict[bytes, bytes | None] = {}  # key -> timestamp, None: delete

    def load(self) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self._db.execute("SELECT public_key, timestamp FROM replay_memory"))

    def put(self, public_key: bytes, timestamp: bytes) -> None:
        with self._noted_lock:
            self._noted[public_key] = timestamp

    def delete(self, public_key: bytes) -> None:
        with self._noted_lock:
            self._noted[public_key] = None

    def flush(self) -> int:
        """Write what was noted since the last flush; returns how many keys."""
        with self._lock:
            with self._noted_lock:
                noted, self._noted = self._noted, {}
            if not noted:
                return 0
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO replay_memory (public_key, timestamp) VALUES (?, ?)",
                    [(k, t) for k, t in noted.items() if t is not None])
                self._db.executemany("DELETE FROM replay_memory WHERE public_key = ?",
                                     [(k,) for k, t in noted.items() if t is None])
            return len(noted)

    def close(self) -> None:
        self.flush()
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

    def flush(self) -> None:
        """Write the kept timestamps noted since the last flush (ReplayStore)."""
        if self._store is not None:
            self._store.flush()

    def forget(self, public_key: bytes) -> None:
        with self._lock:
            self._latest.pop(public_key, None)
            if self._kept.pop(public_key, None) is not None and self._store is not None:
                self._store.delete(public_key)
