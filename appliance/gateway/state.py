"""Small durable facts of a gateway (the change-feed cursor), in the state dir.

A key-value table beside the peer cache, committed at every change, so a
gateway killed at any moment restarts where the feed left off.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class GatewayState:
    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")
        self._lock = threading.Lock()

    def get(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set(self, **values: str) -> None:
        """Set several keys in one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            for key, value in values.items():
                self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                                 (key, str(value)))
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
