"""The registry's SQLite database: connections, pragmas and schema migrations.

This module owns every connection. SQLite runs in WAL mode so readers never
block the single writer, with a busy timeout so gunicorn workers queue for the
write lock instead of failing, and foreign keys on (SQLite's default is off).
Writers take the lock up front (BEGIN IMMEDIATE): a deferred transaction that
upgrades from read to write can fail with SQLITE_BUSY regardless of the timeout.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from flask import current_app

BUSY_TIMEOUT_MS = 10_000
# SQLite's default page cache is 2 MiB; with a million peers the key and
# address indexes outgrow it and every insert or lookup goes to the OS.
CACHE_KIB = 64 * 1024
# Reads through a shared memory map instead of read() into each connection's
# cache: measured 1,436 -> 2,871 lookups/s with 300k peers (address space only).
MMAP_BYTES = 1 << 30

# Each entry upgrades the schema by one version; PRAGMA user_version records
# where a database stands. Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    # 1: tenants, peers with their allowed IPs, hashed API tokens, change feed.
    """
    CREATE TABLE tenants (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE peers (
        id INTEGER PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        name TEXT,
        preshared_key TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX peers_tenant ON peers(tenant_id, id);
    -- lo/hi are the first and last address of the network as 16-byte big-endian
    -- blobs, which SQLite compares with memcmp: range queries on addresses.
    CREATE TABLE allowed_ips (
        peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        position INTEGER NOT NULL,
        cidr TEXT NOT NULL,
        family INTEGER NOT NULL,
        lo BLOB NOT NULL,
        hi BLOB NOT NULL,
        PRIMARY KEY (peer_id, position)
    );
    CREATE INDEX allowed_ips_range ON allowed_ips(tenant_id, family, lo);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash BLOB NOT NULL,
        scope TEXT NOT NULL CHECK (scope IN ('admin', 'gateway')),
        tenant_id INTEGER REFERENCES tenants(id),
        name TEXT,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE changes (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        op TEXT NOT NULL CHECK (op IN ('create', 'update', 'revoke', 'restore', 'delete')),
        public_key TEXT NOT NULL,
        tenant TEXT NOT NULL,
        at TEXT NOT NULL
    );
    """,
    # 2: a random identity for the change feed, so a gateway can tell a restored
    # or replaced database (cursors restart) from a feed that merely has no news.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('feed_id', lower(hex(randomblob(8))));
    """,
    # 3: allowed_ips clustered on its primary key (WITHOUT ROWID): rows are only
    # ever reached by (peer_id, position) or the range index, so the rowid tree
    # was a third B-tree to write per network: ~20% of a bulk import.
    """
    CREATE TABLE allowed_ips_v3 (
        peer_id INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        position INTEGER NOT NULL,
        cidr TEXT NOT NULL,
        family INTEGER NOT NULL,
        lo BLOB NOT NULL,
        hi BLOB NOT NULL,
        PRIMARY KEY (peer_id, position)
    ) WITHOUT ROWID;
    INSERT INTO allowed_ips_v3 (peer_id, tenant_id, position, cidr, family, lo, hi)
        SELECT peer_id, tenant_id, position, cidr, family, lo, hi FROM allowed_ips;
    DROP TABLE allowed_ips;
    ALTER TABLE allowed_ips_v3 RENAME TO allowed_ips;
    CREATE INDEX allowed_ips_range ON allowed_ips(tenant_id, family, lo);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the database with the registry's pragmas; autocommit, explicit transactions."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    conn.execute("PRAGMA synchronous = NORMAL" if _in_wal(conn) else "PRAGMA synchronous = FULL")
    return conn


def _in_wal(conn: sqlite3.Connection) -> bool:
    return conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taking the write lock at BEGIN."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to `target`; safe to call from several processes at once."""
    if not _in_wal(conn):
        # WAL is a property of the file; set once, every later connection gets it.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    with write(conn):
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {current} is newer than this wgjit ({SCHEMA_VERSION})"
            )
        for version in range(current + 1, target + 1):
            for statement in _statements(MIGRATIONS[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
    return schema_version(conn)


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our transaction; split on complete statements instead.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not buf.strip().startswith("--"):
        yield buf


def init_db(path: str | Path) -> None:
    conn = connect(path)
    try:
        migrate(conn)
    finally:
        conn.close()


def feed_id(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()
    return row[0] if row else ""


def new_token_secret() -> str:
    return secrets.token_urlsafe(32)


# Flask glue. Each worker thread keeps one connection for its whole life: a
# fresh connection per request would pay for the pragmas every time and start
# with a cold page cache, which at a million peers costs more than the query.
_local = threading.local()


def get_db() -> sqlite3.Connection:
    return thread_conn(current_app.config["DATABASE"])


def thread_conn(path: str) -> sqlite3.Connection:
    """This thread's connection to `path`, opened on first use."""
    conn = getattr(_local, "conn", None)
    # A connection must not cross a fork (gunicorn workers) or a database change.
    if conn is None or _local.key != (path, os.getpid()):
        conn = connect(path)
        _local.conn, _local.key = conn, (path, os.getpid())
    return conn


def close_db(_exc: BaseException | None = None) -> None:
    """End of request: never leave a transaction open on the kept connection."""
    conn = getattr(_local, "conn", None)
    if conn is not None and conn.in_transaction:
        conn.rollback()
