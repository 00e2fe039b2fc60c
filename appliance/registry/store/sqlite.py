"""The registry on SQLite: the embedded default, one file, one writer at a time.

SQLite runs in WAL mode so readers never block the single writer, with a busy
timeout so gunicorn workers queue for the write lock instead of failing, and
foreign keys on (SQLite's default is off). Writers take the lock up front
(BEGIN IMMEDIATE): a deferred transaction that upgrades from read to write can
fail with SQLITE_BUSY regardless of the timeout.

The change feed: every peer write appends to `changes` in its transaction, and
writers hold the lock from BEGIN, so cursors commit in order and a reader never
sees cursor N+1 without N.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.registry.cidr import Net
from appliance.registry.store import (
    BULK_CHUNK,
    UNSET,
    Conflict,
    NewPeer,
    Overlap,
    Store,
    overlap_conflict,
    utcnow,
)
from appliance.registry.store.shared import (
    check_chunk_overlaps,
    chunks,
    duplicate,
    feed_page,
    peer_dict,
)

log = logging.getLogger(__name__)

# How long a writer waits for the write lock before SQLITE_BUSY: the CLI's
# default (a bulk import holds the lock for a whole chunk); the API passes its own.
BUSY_TIMEOUT_MS = 10_000
# SQLite's default page cache is 2 MiB; with a million peers the key and
# address indexes outgrow it and every insert or lookup goes to the OS.
CACHE_KIB = 64 * 1024
# Reads through a shared memory map instead of read() into each connection's
# cache: measured 1,436 -> 2,871 lookups/s with 300k peers (address space only).
MMAP_BYTES = 1 << 30
# FULL: every commit is on disk before the API answers. Under NORMAL (WAL) a
# power cut loses the last commits, and their cursor numbers are handed out
# again for other changes; a revocation the API had confirmed would vanish.
# bench/durable_writes.py, 500 peers on the shared 2-core test machine (ext4 on
# a virtual disk): at load ~6, create p50 0.04 -> 0.20 ms and revoke p50
# 0.02 -> 0.17 ms; at load ~9.5, with other tests busy on the same disk, the
# sync itself costs 2-4 ms (create p50 0.05 -> 3.9 ms, revoke 0.03 -> 2.2 ms).
# Reads (gateway lookups, the feed) pay nothing. Bulk imports commit once per
# 20,000 peers: 50,000 peers took 7.5 s under NORMAL and 7.3 s under FULL,
# so they keep this setting too.
SYNCHRONOUS = "FULL"

# Each entry upgrades the schema by one version; PRAGMA user_version records
# where a database stands. Never edit a released entry: append a new one.
# postgres.py keeps the same versions in its own dialect.
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
    # 4: a tenant-limited token's feed (its rows and its own earliest/latest,
    # which must not show other tenants' activity) by index, not by scanning
    # every change.
    """
    CREATE INDEX changes_tenant ON changes(tenant, cursor);
    """,
    # 5: allowed IPs unique across tenants (issue 12): every tenant's peers share
    # each gateway's interface, so the overlap check looks at all of them and
    # its range index no longer starts with the tenant. Replaced, not added: a
    # second index would cost every import another B-tree write per network.
    # Overlaps between tenants stored before this version stay (the gateways
    # refuse to install the second of two overlapping peers); the check assumes
    # stored ranges do not overlap, so it may miss a clash with one of those.
    """
    DROP INDEX allowed_ips_range;
    CREATE INDEX allowed_ips_span ON allowed_ips(family, lo);
    """,
    # 6: the pool of tenants a gateway token is limited to (no rows: every
    # tenant). Tenant names, not ids: a deploy names the pool before an admin
    # creates its tenants, and the change feed records tenants by name too.
    """
    CREATE TABLE token_pools (
        token_id TEXT NOT NULL REFERENCES tokens(id),
        tenant TEXT NOT NULL,
        PRIMARY KEY (token_id, tenant)
    ) WITHOUT ROWID;
    """,
    # 7: on PostgreSQL, allowed IPs moved from a GiST index to a btree (the
    # range query this engine already makes) and lost a foreign key that bulk
    # imports here skip anyway. Kept so both engines count versions alike.
    """
    SELECT 1;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

LOOKUP_SQL = (
    # One statement: this is the hot path every gateway's cache misses land on.
    "SELECT p.public_key, p.preshared_key, p.revoked_at, p.updated_at, p.tenant_id,"
    " t.name AS tenant, (SELECT group_concat(cidr, ' ') FROM (SELECT cidr FROM allowed_ips"
    " WHERE peer_id = p.id ORDER BY position)) AS ips"
    " FROM peers p JOIN tenants t ON t.id = p.tenant_id WHERE p.public_key"
)



def _gateway_peer(row: sqlite3.Row, tenants: frozenset[str] | None) -> dict | None:
    if row["revoked_at"] is not None:
        return None
    if tenants is not None and row["tenant"] not in tenants:
        return None
    return {
        "public_key": row["public_key"],
        "tenant": row["tenant"],
        "allowed_ips": row["ips"].split(" ") if row["ips"] else [],
        "preshared_key": row["preshared_key"],
        "updated_at": row["updated_at"],
    }


TENANT_SELECT = (
    "SELECT t.id, t.name, t.created_at,"
    " (SELECT count(*) FROM peers p WHERE p.tenant_id = t.id) AS peers FROM tenants t"
)


def connect(path: str | Path, cache_kib: int = CACHE_KIB,
            busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open the database with the registry's pragmas; autocommit, explicit transactions."""
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
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
        # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR,
        # SQLITE_NOMEM); a ROLLBACK then fails with "no transaction is active",
        # and raising that would replace the error that says what went wrong.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                log.warning("rollback failed after an error: %s", e)
        raise
    conn.execute("COMMIT")


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


# sqlite3 exceptions carry the result code's name (Python >= 3.11).
FAILURES = {"SQLITE_BUSY": "busy", "SQLITE_LOCKED": "busy", "SQLITE_FULL": "full"}


def _feed_scope(tenants: frozenset[str] | None) -> tuple[str, list]:
    """The changes of `tenants` (all with None), by the changes_tenant index: a
    limited token's rows, and a tenant admin's earliest and latest cursors too,
    so they tell nothing about other tenants' activity."""
    if tenants is None:
        return "", []
    return f" AND tenant IN ({','.join('?' * len(tenants))})", sorted(tenants)


class SqliteStore(Store):
    errors = (sqlite3.Error,)

    def __init__(self, path: str, cache_kib: int = CACHE_KIB,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.cache_kib = cache_kib
        self.busy_timeout_ms = busy_timeout_ms
        # Each thread keeps one connection for its whole life: a fresh connection
        # per request would pay for the pragmas every time and start with a cold
        # page cache, which at a million peers costs more than the query.
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again after a fork)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = connect(self.path, self.cache_kib, self.busy_timeout_ms)
            local.conn, local.pid = conn, os.getpid()
        return conn

    def failure(self, exc: BaseException) -> str | None:
        name = getattr(exc, "sqlite_errorname", "")
        return FAILURES.get(name) if isinstance(exc, sqlite3.Error) else None

    def end_request(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.in_transaction:
            conn.rollback()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # schema

    def schema_version(self) -> int:
        return self.conn().execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, target: int | None = None) -> int:
        target = SCHEMA_VERSION if target is None else target
        conn = self.conn()
        if not _in_wal(conn):
            # WAL is a property of the file; set once, every later connection gets it.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        with write(conn):
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {current} is newer than this"
                                   f" wgjit ({SCHEMA_VERSION})")
            for version in range(current + 1, target + 1):
                for statement in _statements(MIGRATIONS[version - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
        return self.schema_version()

    def feed_id(self) -> str:
        row = self.conn().execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()
        return row[0] if row else ""

    # tenants

    def tenant_id(self, name: str) -> int | None:
        row = self.conn().execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
        return row["id"] if row else None

    def create_tenant(self, name: str) -> dict:
        conn = self.conn()
        with write(conn):
            if self.tenant_id(name) is not None:
                raise Conflict("tenant_exists", f"tenant {name!r} already exists")
            now = utcnow()
            conn.execute("INSERT INTO tenants (name, created_at) VALUES (?, ?)", (name, now))
        return {"name": name, "created_at": now, "peers": 0}

    def list_tenants(self, only_id: int | None = None) -> list[dict]:
        conn = self.conn()
        if only_id is None:
            rows = conn.execute(TENANT_SELECT + " ORDER BY t.name").fetchall()
        else:
            rows = conn.execute(TENANT_SELECT + " WHERE t.id = ?", (only_id,)).fetchall()
        return [dict(r) for r in rows]

    def get_tenant(self, name: str) -> dict | None:
        row = self.conn().execute(TENANT_SELECT + " WHERE t.name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def delete_tenant(self, name: str) -> None:
        conn = self.conn()
        with write(conn):
            row = conn.execute(TENANT_SELECT + " WHERE t.name = ?", (name,)).fetchone()
            if row is None:
                raise LookupError(name)
            if row["peers"]:
                raise Conflict("tenant_not_empty", f"tenant {name!r} still has {row['peers']}"
                               " peers; delete them first")
            if conn.execute("SELECT 1 FROM tokens WHERE tenant_id = ?", (row["id"],)).fetchone():
                raise Conflict("tenant_has_tokens",
                               f"tenant {name!r} still has tokens limited to it")
            conn.execute("DELETE FROM tenants WHERE id = ?", (row["id"],))

    # peers

    def find_overlap(self, net: Net) -> Overlap | None:
        """In O(log n): stored ranges never overlap (this check keeps it so), hence
        sorted by start they are also sorted by end: only the last range starting
        at or before our end can reach into us."""
        row = self.conn().execute(
            "SELECT cidr, hi, tenant_id FROM allowed_ips WHERE family = ? AND lo <= ?"
            " ORDER BY lo DESC LIMIT 1",
            (net.family, net.hi),
        ).fetchone()
        if row is not None and row["hi"] >= net.lo:
            return Overlap(row["cidr"], row["tenant_id"])
        return None

    def _record_change(self, conn: sqlite3.Connection, op: str, public_key: str,
                       tenant: str) -> None:
        conn.execute("INSERT INTO changes (op, public_key, tenant, at) VALUES (?, ?, ?, ?)",
                     (op, public_key, tenant, utcnow()))

    def _insert_ips(self, conn: sqlite3.Connection, peer_id: int, tid: int,
                    nets: Iterable[Net]) -> None:
        for position, net in enumerate(nets):
            clash = self.find_overlap(net)
            if clash is not None:
                raise overlap_conflict(net, clash, tid)
            conn.execute(
                "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (peer_id, tid, position, net.cidr, net.family, net.lo, net.hi),
            )

    def create_peer(self, tenant: str, public_key: str, nets: list[Net], name: str | None,
                    preshared_key: str | None) -> int:
        conn = self.conn()
        with write(conn):
            tid = self.tenant_id(tenant)
            if tid is None:
                raise LookupError(tenant)
            if conn.execute("SELECT 1 FROM peers WHERE public_key = ?",
                            (public_key,)).fetchone():
                raise Conflict("peer_exists", "public_key: a peer with this key already exists")
            now = utcnow()
            cur = conn.execute(
                "INSERT INTO peers (public_key, tenant_id, name, preshared_key, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (public_key, tid, name, preshared_key, now, now),
            )
            self._insert_ips(conn, cur.lastrowid, tid, nets)
            self._record_change(conn, "create", public_key, tenant)
        return cur.lastrowid

    def _peer_row(self, public_key: str, expect_tenant: int | None) -> sqlite3.Row:
        row = self.conn().execute(
            "SELECT p.*, t.name AS tenant FROM peers p JOIN tenants t ON t.id = p.tenant_id"
            " WHERE p.public_key = ?",
            (public_key,),
        ).fetchone()
        if row is None or (expect_tenant is not None and row["tenant_id"] != expect_tenant):
            raise LookupError(public_key)
        return row

    def update_peer(self, public_key: str, *, nets: list[Net] | None, name: Any = UNSET,
                    preshared_key: Any = UNSET, expect_tenant: int | None = None) -> None:
        conn = self.conn()
        with write(conn):
            row = self._peer_row(public_key, expect_tenant)
            sets, params = ["updated_at = ?"], [utcnow()]
            if name is not UNSET:
                sets.append("name = ?")
                params.append(name)
            if preshared_key is not UNSET:
                sets.append("preshared_key = ?")
                params.append(preshared_key)
            conn.execute(f"UPDATE peers SET {', '.join(sets)} WHERE id = ?",
                         (*params, row["id"]))
            if nets is not None:
                conn.execute("DELETE FROM allowed_ips WHERE peer_id = ?", (row["id"],))
                self._insert_ips(conn, row["id"], row["tenant_id"], nets)
            self._record_change(conn, "update", public_key, row["tenant"])

    def set_revoked(self, public_key: str, revoked: bool,
                    expect_tenant: int | None = None) -> bool:
        conn = self.conn()
        with write(conn):
            row = self._peer_row(public_key, expect_tenant)
            if (row["revoked_at"] is not None) == revoked:
                return False
            now = utcnow()
            conn.execute("UPDATE peers SET revoked_at = ?, updated_at = ? WHERE id = ?",
                         (now if revoked else None, now, row["id"]))
            self._record_change(conn, "revoke" if revoked else "restore", public_key,
                                row["tenant"])
        return True

    def delete_peer(self, public_key: str, expect_tenant: int | None = None) -> None:
        conn = self.conn()
        with write(conn):
            row = self._peer_row(public_key, expect_tenant)
            conn.execute("DELETE FROM peers WHERE id = ?", (row["id"],))
            self._record_change(conn, "delete", public_key, row["tenant"])

    def _peer_ips(self, peer_ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {pid: [] for pid in peer_ids}
        if not peer_ids:
            return out
        marks = ",".join("?" * len(peer_ids))
        for r in self.conn().execute(
            f"SELECT peer_id, cidr FROM allowed_ips WHERE peer_id IN ({marks})"
            " ORDER BY peer_id, position",
            peer_ids,
        ):
            out[r["peer_id"]].append(r["cidr"])
        return out

    def get_peer(self, public_key: str) -> dict | None:
        try:
            row = self._peer_row(public_key, None)
        except LookupError:
            return None
        return peer_dict(row, self._peer_ips([row["id"]])[row["id"]])

    def list_peers(self, after: int, limit: int, tenant_ids: Iterable[int] = (),
                   revoked: bool | None = None) -> tuple[list[dict], int | None]:
        where, params = ["p.id > ?"], [after]
        for tid in tenant_ids:
            where.append("p.tenant_id = ?")
            params.append(tid)
        if revoked is not None:
            where.append("p.revoked_at IS NOT NULL" if revoked else "p.revoked_at IS NULL")
        rows = self.conn().execute(
            "SELECT p.*, t.name AS tenant FROM peers p JOIN tenants t ON t.id = p.tenant_id"
            f" WHERE {' AND '.join(where)} ORDER BY p.id LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        ips = self._peer_ips([r["id"] for r in rows])
        return [peer_dict(r, ips[r["id"]]) for r in rows], rows[-1]["id"] if more else None

    # bulk

    def bulk_create_peers(self, tenant: str, peers: Iterable[NewPeer],
                          batch: int | None = BULK_CHUNK,
                          progress: Callable[[int], None] | None = None) -> int:
        """Rows go in with executemany, so peer ids are assigned here (we hold the
        write lock); overlaps are checked against the database per network and
        within each chunk by sorting it."""
        tid = self.tenant_id(tenant)
        if tid is None:
            raise LookupError(tenant)
        conn = self.conn()
        # The foreign keys hold by construction here (the tenant was just looked up,
        # the peer ids are the ones inserted beside their networks), and checking
        # them row by row is about a quarter of the insert time. The pragma cannot
        # change inside a transaction, hence around all of it.
        enforced = conn.execute("PRAGMA foreign_keys").fetchone()[0]
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            count = 0
            if batch is None:  # one transaction, all or nothing
                with write(conn):
                    for chunk in chunks(peers, BULK_CHUNK):
                        self._insert_chunk(conn, tid, tenant, chunk)
                        count += len(chunk)
                if progress is not None:
                    progress(count)
                return count
            for chunk in chunks(peers, batch):
                with write(conn):
                    self._insert_chunk(conn, tid, tenant, chunk)
                count += len(chunk)
                if progress is not None:
                    progress(count)
            return count
        finally:
            conn.execute(f"PRAGMA foreign_keys = {'ON' if enforced else 'OFF'}")

    def _insert_chunk(self, conn: sqlite3.Connection, tid: int, tenant: str,
                      chunk: list[NewPeer]) -> None:
        now = utcnow()
        next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM peers").fetchone()[0]
        # Address plans are usually allocated in order: a network that starts past
        # every stored range of its family cannot overlap one, which spares the
        # per-network query for such imports. Stored ranges never overlap, so the
        # range that starts last also ends last (an index probe, not max(hi)'s scan).
        top = {}
        for family in (4, 6):
            row = conn.execute("SELECT hi FROM allowed_ips WHERE family = ?"
                               " ORDER BY lo DESC LIMIT 1", (family,)).fetchone()
            top[family] = row[0] if row else None
        peer_rows, ip_rows = [], []
        for pid, (key, nets, name, psk) in enumerate(chunk, next_id):
            peer_rows.append((pid, key, tid, name, psk, now, now))
            for position, net in enumerate(nets):
                stored_top = top[net.family]
                if stored_top is not None and net.lo <= stored_top:
                    clash = self.find_overlap(net)
                    if clash is not None:
                        raise overlap_conflict(net, clash, tid, where=key)
                ip_rows.append((pid, tid, position, net.cidr, net.family, net.lo, net.hi))
        check_chunk_overlaps(ip_rows)
        try:
            conn.executemany(
                "INSERT INTO peers (id, public_key, tenant_id, name, preshared_key, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", peer_rows)
        except sqlite3.IntegrityError:
            raise duplicate([p.public_key for p in chunk], lambda key: conn.execute(
                "SELECT 1 FROM peers WHERE public_key = ? AND id < ?",
                (key, next_id)).fetchone() is not None) from None
        conn.executemany(
            "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", ip_rows)
        # The feed gets the chunk in peer id order; one statement instead of a
        # bound row per peer.
        conn.execute(
            "INSERT INTO changes (op, public_key, tenant, at) SELECT 'create', public_key, ?, ?"
            " FROM peers WHERE id BETWEEN ? AND ? ORDER BY id",
            (tenant, now, next_id, next_id + len(chunk) - 1))

    # gateways

    def gateway_lookup(self, public_key: str, tenants: frozenset[str] | None) -> dict | None:
        row = self.conn().execute(LOOKUP_SQL + " = ?", (public_key,)).fetchone()
        return None if row is None else _gateway_peer(row, tenants)

    def gateway_lookup_many(self, public_keys: list[str],
                            tenants: frozenset[str] | None) -> dict[str, dict]:
        if not public_keys:
            return {}
        marks = ",".join("?" * len(public_keys))
        rows = self.conn().execute(f"{LOOKUP_SQL} IN ({marks})", public_keys).fetchall()
        found = (_gateway_peer(row, tenants) for row in rows)
        return {peer["public_key"]: peer for peer in found if peer is not None}

    def changes(self, since: int, limit: int, tenants: frozenset[str] | None = None,
                hide_activity: bool = False) -> dict:
        conn = self.conn()
        scope, scope_params = _feed_scope(tenants)
        rows_scope, rows_params, horizon = scope, list(scope_params), None
        if tenants is not None and not hide_activity:
            # A pool's page: read first; every cursor up to it has committed (one
            # writer, in order), so the page may end there, past the others.
            horizon = conn.execute("SELECT coalesce(max(cursor), 0) FROM changes"
                                   ).fetchone()[0]
            rows_scope += " AND cursor <= ?"
            rows_params.append(horizon)
        rows = conn.execute(
            f"SELECT cursor, op, public_key, tenant, at FROM changes WHERE cursor > ?{rows_scope}"
            " ORDER BY cursor LIMIT ?",
            (since, *rows_params, limit + 1),
        ).fetchall()
        if not hide_activity:
            scope, scope_params = "", []
        bounds = conn.execute(f"SELECT min(cursor), max(cursor) FROM changes WHERE 1{scope}",
                              scope_params).fetchone()
        # The anchors too are within the scope that hides activity: a tenant
        # admin learns nothing from the digest at another tenant's cursor.
        anchors = conn.execute(f"SELECT cursor, op, public_key, tenant, at FROM changes"
                               f" WHERE cursor IN (?, ?, ?){scope}",
                               (since, horizon or since, bounds[1] or 0, *scope_params)
                               ).fetchall()
        return feed_page([dict(r) for r in rows], since, limit, bounds, self.feed_id(),
                         anchors, horizon)

    def active_keys(self, tenants: frozenset[str] | None = None,
                    hide_activity: bool = False) -> tuple[int, list[str]]:
        conn = self.conn()
        scope, scope_params = _feed_scope(tenants) if hide_activity else ("", [])
        cursor = conn.execute(f"SELECT max(cursor) FROM changes WHERE 1{scope}",
                              scope_params).fetchone()[0] or 0
        sql, params = "SELECT public_key FROM peers WHERE revoked_at IS NULL", []
        if tenants is not None:
            sql += (" AND tenant_id IN (SELECT id FROM tenants WHERE name IN"
                    f" ({','.join('?' * len(tenants))}))")
            params += sorted(tenants)
        return cursor, [k for (k,) in conn.execute(sql, params)]

    # tokens

    def add_token(self, token_id: str, digest: bytes, scope: str, tenant: str | None,
                  name: str | None, pool: Sequence[str] = ()) -> None:
        conn = self.conn()
        with write(conn):
            tenant_id = None
            if tenant is not None:
                tenant_id = self.tenant_id(tenant)
                if tenant_id is None:
                    raise ValueError(f"tenant {tenant!r} does not exist")
            try:
                conn.execute(
                    "INSERT INTO tokens (id, hash, scope, tenant_id, name, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (token_id, digest, scope, tenant_id, name, utcnow()),
                )
            except sqlite3.IntegrityError:
                raise Conflict("token_exists", f"token id {token_id} is taken") from None
            conn.executemany("INSERT INTO token_pools (token_id, tenant) VALUES (?, ?)",
                             [(token_id, t) for t in pool])

    def get_token(self, token_id: str) -> dict | None:
        conn = self.conn()
        row = conn.execute(
            "SELECT t.id, t.hash, t.scope, t.tenant_id, t.name, t.revoked_at, n.name AS tenant"
            " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id WHERE t.id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        return {**dict(row), "pool": [t for (t,) in conn.execute(
            "SELECT tenant FROM token_pools WHERE token_id = ? ORDER BY tenant", (token_id,))]}

    def set_token_limits(self, token_id: str, name: str | None, pool: list[str]) -> None:
        conn = self.conn()
        with write(conn):
            conn.execute("UPDATE tokens SET name = ? WHERE id = ?", (name, token_id))
            conn.execute("DELETE FROM token_pools WHERE token_id = ?", (token_id,))
            conn.executemany("INSERT INTO token_pools (token_id, tenant) VALUES (?, ?)",
                             [(token_id, t) for t in sorted(set(pool))])

    def revoke_token(self, token_id: str) -> bool:
        conn = self.conn()
        with write(conn):
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (utcnow(), token_id),
            )
        return cur.rowcount == 1

    def list_tokens(self) -> list[dict]:
        conn = self.conn()
        rows = conn.execute(
            "SELECT t.id, t.scope, n.name AS tenant, t.name, t.created_at, t.revoked_at"
            " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id ORDER BY t.created_at"
        ).fetchall()
        pools: dict[str, list[str]] = {}
        for token_id, tenant in conn.execute(
                "SELECT token_id, tenant FROM token_pools ORDER BY token_id, tenant"):
            pools.setdefault(token_id, []).append(tenant)
        return [{**dict(r), "pool": pools.get(r["id"], [])} for r in rows]

    def stats(self) -> dict[str, int]:
        conn = self.conn()
        active, revoked = conn.execute(
            "SELECT total(revoked_at IS NULL), total(revoked_at IS NOT NULL) FROM peers"
        ).fetchone()
        tenants = conn.execute("SELECT count(*) FROM tenants").fetchone()[0]
        latest, kept = conn.execute(
            "SELECT coalesce(max(cursor), 0), count(*) FROM changes").fetchone()
        return {"active": int(active), "revoked": int(revoked), "tenants": tenants,
                "latest": latest, "changes": kept}
