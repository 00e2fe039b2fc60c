"""The registry on PostgreSQL: several registry servers over one database.

psycopg 3 with a connection pool per process (created on first use, so a
gunicorn worker never inherits its master's sockets). Connections run in
autocommit; every write is one explicit transaction. Allowed IPs are stored as
`cidr` beside their canonical text, with a btree index answering the overlap
question the way SQLite's range index does (see migration 6 and `_overlap`).

Concurrency, which SQLite never had to think about (it has one writer):
- The change feed. A sequence hands out values before commit, so with several
  writers cursor 11 can commit while 10 is still in flight; a gateway reading
  11 then moves past 10 and never sees it. Here every transaction that records
  a change first increments the single row of `feed_head` and takes its cursor
  from it. The row lock is held until commit, so the next writer gets its
  cursor only after the previous one committed (or rolled back, undoing its
  increment: no gaps either). PostgreSQL makes a commit visible before it
  releases the transaction's locks, so cursors become visible in cursor order,
  and a follower that has read N never later finds a committed N-1. The cost
  is that feed-recording commits are serialized, as every SQLite write is;
  the row is taken last in each transaction, which keeps the locked span
  short and keeps the row out of deadlocks (its holder waits for nobody).
- Overlapping allowed IPs: two writers could each check and find no clash,
  then both insert. Allowed IPs are unique across tenants (every tenant shares
  every gateway), so writes that add networks take one transaction-level
  advisory lock (ADDRESS_LOCK) before they look, and address changes are
  serialized across tenants: the check stays exact. They also lock their
  tenant's row (FOR NO KEY UPDATE, which foreign-key checks do not wait for),
  so the tenant cannot vanish under them.
- Lost updates on one peer: its row is locked (FOR UPDATE) before it is read.
- Lock order. Every write takes what it needs of these, in this order, so no
  two writers can each hold what the other waits for:
  1. the peer's row, FOR UPDATE (a lock only: another writer inserting the
     same key does not wait for it);
  2. the tenant's row (FOR NO KEY UPDATE);
  3. ADDRESS_LOCK, by every write that adds keys or networks: create, update
     with networks, each import transaction;
  4. rows written: a new key or a peer row's new version makes another
     writer inserting that key wait for this transaction to end;
  5. the feed head, last.
  Step 3 before step 4 is what keeps an import apart from an API create of one
  of its keys: the create waits for the import's address lock before writing
  its key, where it used to hold the key and wait while the import, holding
  the address lock, waited for that key. Two imports take turns at step 3.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pgerrors
from psycopg.rows import dict_row

from appliance.registry import cidr
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
from appliance.secrets import read_secret

# Connections a store opens at most when nobody says otherwise: the CLI and
# tools, which use one at a time (two while a lookup runs beside an import).
# `registry serve` sizes its workers' pools from their threads (serve.py).
POOL_SIZE = 2
# How long a request waits for a pooled connection (or for the server to answer
# the first connect) before it fails and /healthz reports the database down.
POOL_TIMEOUT = 10.0
MIGRATE_LOCK = 0x77676A6974  # "wgjit": serializes concurrent `migrate` runs
ADDRESS_LOCK = 0x77676A6961  # serializes writes that add allowed IPs (module docstring)

# The same schema versions as sqlite.py, in PostgreSQL's dialect. Never edit
# a released entry: append a new one.
MIGRATIONS: list[str] = [
    # 1: tenants, peers with their allowed IPs, hashed API tokens, change feed
    # and the feed head that orders its cursors (see the module docstring).
    """
    CREATE TABLE tenants (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        created_at text NOT NULL
    );
    CREATE TABLE peers (
        id bigserial PRIMARY KEY,
        public_key text NOT NULL UNIQUE,
        tenant_id bigint NOT NULL REFERENCES tenants(id),
        name text,
        preshared_key text,
        created_at text NOT NULL,
        updated_at text NOT NULL,
        revoked_at text
    );
    CREATE INDEX peers_tenant ON peers(tenant_id, id);
    -- cidr is the canonical text the API returns (PostgreSQL spells some IPv6
    -- networks differently from Python); net is the same network as a value.
    CREATE TABLE allowed_ips (
        peer_id bigint NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        tenant_id bigint NOT NULL REFERENCES tenants(id),
        position integer NOT NULL,
        cidr text NOT NULL,
        net cidr NOT NULL,
        PRIMARY KEY (peer_id, position)
    );
    CREATE INDEX allowed_ips_net ON allowed_ips USING gist (net inet_ops);
    CREATE TABLE tokens (
        id text PRIMARY KEY,
        hash bytea NOT NULL,
        scope text NOT NULL CHECK (scope IN ('admin', 'gateway')),
        tenant_id bigint REFERENCES tenants(id),
        name text,
        created_at text NOT NULL,
        revoked_at text
    );
    CREATE TABLE changes (
        cursor bigint PRIMARY KEY,
        op text NOT NULL CHECK (op IN ('create', 'update', 'revoke', 'restore', 'delete')),
        public_key text NOT NULL,
        tenant text NOT NULL,
        at text NOT NULL
    );
    CREATE TABLE feed_head (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        cursor bigint NOT NULL
    );
    INSERT INTO feed_head (cursor) VALUES (0);
    """,
    # 2: a random identity for the change feed (see sqlite.py).
    """
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    INSERT INTO meta (key, value)
        VALUES ('feed_id', substr(md5(random()::text || clock_timestamp()::text), 1, 16));
    """,
    # 3: on SQLite, allowed_ips lost its rowid; PostgreSQL tables are heaps
    # either way. Kept so both engines count versions alike.
    """
    SELECT 1;
    """,
    # 4: a tenant-limited token's feed by index (see sqlite.py).
    """
    CREATE INDEX changes_tenant ON changes(tenant, cursor);
    """,
    # 5: allowed IPs unique across tenants (see sqlite.py): the GiST index on net
    # alone already serves the global check; kept so both engines count alike.
    """
    SELECT 1;
    """,
    # 6: the pool of tenants a gateway token is limited to (see sqlite.py).
    """
    CREATE TABLE token_pools (
        token_id text NOT NULL REFERENCES tokens(id),
        tenant text NOT NULL,
        PRIMARY KEY (token_id, tenant)
    );
    """,
    # 7: cheaper bulk imports (server CPU for 125,000 peers with two networks
    # each, measured side by side on a loaded 2-core machine: 5.9 s before,
    # 3.8 s after; the wall time there was mostly waiting for a core).
    # - A btree on the cidr column replaces the GiST index: 0.5 s less per
    #   125,000 peers, and an overlap check is one btree descent (0.06-0.4 ms
    #   against GiST's 0.5-1.4 ms with 100,000 peers). Stored networks never
    #   overlap (across all tenants since 5), so sorted they are ordered by
    #   first and by last address alike: if any stored network overlaps a new
    #   one, so does the greatest stored network <= the new one's last address
    #   (for a host address h, `net <= h` holds exactly when net starts at or
    #   before h; IPv4 sorts before IPv6, and `&&` across families is false).
    #   As on SQLite since 5, overlaps between tenants stored before 5 stay,
    #   and the check may miss a clash with one of those.
    # - allowed_ips.tenant_id loses its foreign key, 1.6 s per 125,000 peers
    #   (a trigger query and a row lock per network): it is a copy of the
    #   peer's tenant for the overlap answer, and the peer it cascades from
    #   already references the tenant.
    # The name matches SQLite's range index of 5, which is another engine's.
    """
    DROP INDEX allowed_ips_net;
    CREATE INDEX allowed_ips_span ON allowed_ips (net);
    ALTER TABLE allowed_ips DROP CONSTRAINT allowed_ips_tenant_id_fkey;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

LOOKUP_SQL = (
    "SELECT p.public_key, p.preshared_key, p.revoked_at, p.updated_at, p.tenant_id,"
    " t.name AS tenant, ARRAY(SELECT cidr FROM allowed_ips WHERE peer_id = p.id"
    " ORDER BY position) AS ips"
    " FROM peers p JOIN tenants t ON t.id = p.tenant_id WHERE p.public_key"
)



def _gateway_peer(row: dict, tenants: frozenset[str] | None) -> dict | None:
    if row["revoked_at"] is not None:
        return None
    if tenants is not None and row["tenant"] not in tenants:
        return None
    return {
        "public_key": row["public_key"],
        "tenant": row["tenant"],
        "allowed_ips": row["ips"],
        "preshared_key": row["preshared_key"],
        "updated_at": row["updated_at"],
    }


TENANT_SELECT = (
    "SELECT t.id, t.name, t.created_at,"
    " (SELECT count(*) FROM peers p WHERE p.tenant_id = t.id) AS peers FROM tenants t"
)

PEER_SELECT = "SELECT p.*, t.name AS tenant FROM peers p JOIN tenants t ON t.id = p.tenant_id"


# Retrying soon may succeed: a lock or a pooled connection was not had in time.
BUSY = (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected, pgerrors.SerializationFailure,
        psycopg_pool.PoolTimeout)


class PostgresStore(Store):
    errors = (psycopg.Error, psycopg_pool.PoolTimeout)

    def __init__(self, url: str, password_file: str | None = None,
                 pool_size: int = POOL_SIZE, busy_timeout_ms: int | None = None) -> None:
        """pool_size: connections this process opens at most; busy_timeout_ms: the
        pooled connections' lock_timeout (None: wait for locks as long as it
        takes, PostgreSQL's default)."""
        self.url = url
        self.pool_size = pool_size
        self.busy_timeout_ms = busy_timeout_ms
        # Read now so a bad file is refused at startup; libpq reads PGPASSFILE itself.
        self._kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if password_file is not None:
            self._kwargs["password"] = read_secret(password_file, what="database password")
        self._pool_obj: psycopg_pool.ConnectionPool | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()

    def _pool(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool_obj
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._pool_lock:
            if self._pool_obj is None or self._pool_pid != os.getpid():
                self._pool_obj = psycopg_pool.ConnectionPool(
                    self.url, kwargs=self._kwargs, min_size=1, max_size=self.pool_size,
                    timeout=POOL_TIMEOUT, open=True, name="wgjit-registry",
                    configure=self._configure)
                self._pool_pid = os.getpid()
            return self._pool_obj

    def _configure(self, conn: psycopg.Connection) -> None:
        # Only pooled connections: migrate's own connection may wait for the
        # advisory lock of another process's migration as long as that takes.
        if self.busy_timeout_ms is not None:
            conn.execute(f"SET lock_timeout = {int(self.busy_timeout_ms)}")

    def failure(self, exc: BaseException) -> str | None:
        if isinstance(exc, BUSY):
            return "busy"
        return "full" if isinstance(exc, pgerrors.DiskFull) else None

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Cursor]:
        with self._pool().connection() as conn:
            yield conn.cursor()

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Cursor]:
        with self._pool().connection() as conn, conn.transaction():
            yield conn.cursor()

    def end_request(self) -> None:
        pass  # connections go back to the pool after each call

    def close(self) -> None:
        if self._pool_obj is not None and self._pool_pid == os.getpid():
            self._pool_obj.close()
        self._pool_obj = None

    # schema

    def schema_version(self) -> int:
        with self._read() as cur:
            return _version(cur)

    def migrate(self, target: int | None = None) -> int:
        target = SCHEMA_VERSION if target is None else target
        # Its own connection: migrate runs in a master before workers fork.
        with psycopg.connect(self.url, **self._kwargs) as conn, conn.transaction():
            cur = conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS wgjit_schema (version integer NOT NULL)")
            current = _version(cur)
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {current} is newer than this"
                                   f" wgjit ({SCHEMA_VERSION})")
            for version in range(current + 1, target + 1):
                cur.execute(MIGRATIONS[version - 1])
                cur.execute("DELETE FROM wgjit_schema")
                cur.execute("INSERT INTO wgjit_schema (version) VALUES (%s)", (version,))
            return _version(cur)

    def feed_id(self) -> str:
        with self._read() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()
        return row["value"] if row else ""

    # tenants

    def tenant_id(self, name: str) -> int | None:
        with self._read() as cur:
            row = cur.execute("SELECT id FROM tenants WHERE name = %s", (name,)).fetchone()
        return row["id"] if row else None

    def create_tenant(self, name: str) -> dict:
        now = utcnow()
        try:
            with self._write() as cur:
                cur.execute("INSERT INTO tenants (name, created_at) VALUES (%s, %s)", (name, now))
        except pgerrors.UniqueViolation:
            raise Conflict("tenant_exists", f"tenant {name!r} already exists") from None
        return {"name": name, "created_at": now, "peers": 0}

    def list_tenants(self, only_id: int | None = None) -> list[dict]:
        with self._read() as cur:
            if only_id is None:
                return cur.execute(TENANT_SELECT + " ORDER BY t.name").fetchall()
            return cur.execute(TENANT_SELECT + " WHERE t.id = %s", (only_id,)).fetchall()

    def get_tenant(self, name: str) -> dict | None:
        with self._read() as cur:
            return cur.execute(TENANT_SELECT + " WHERE t.name = %s", (name,)).fetchone()

    def delete_tenant(self, name: str) -> None:
        with self._write() as cur:
            row = cur.execute("SELECT id FROM tenants WHERE name = %s FOR UPDATE",
                              (name,)).fetchone()
            if row is None:
                raise LookupError(name)
            peers = cur.execute("SELECT count(*) AS n FROM peers WHERE tenant_id = %s",
                                (row["id"],)).fetchone()["n"]
            if peers:
                raise Conflict("tenant_not_empty",
                               f"tenant {name!r} still has {peers} peers; delete them first")
            if cur.execute("SELECT 1 FROM tokens WHERE tenant_id = %s",
                           (row["id"],)).fetchone():
                raise Conflict("tenant_has_tokens",
                               f"tenant {name!r} still has tokens limited to it")
            cur.execute("DELETE FROM tenants WHERE id = %s", (row["id"],))

    # peers

    def find_overlap(self, net: Net) -> Overlap | None:
        with self._read() as cur:
            return _overlap(cur, net)

    def _lock_tenant(self, cur: psycopg.Cursor, name: str) -> int:
        row = cur.execute("SELECT id FROM tenants WHERE name = %s FOR NO KEY UPDATE",
                          (name,)).fetchone()
        if row is None:
            raise LookupError(name)
        return row["id"]

    def _record_change(self, cur: psycopg.Cursor, op: str, public_key: str,
                       tenant: str) -> None:
        cursor = _take_cursors(cur, 1)
        cur.execute("INSERT INTO changes (cursor, op, public_key, tenant, at)"
                    " VALUES (%s, %s, %s, %s, %s)", (cursor, op, public_key, tenant, utcnow()))

    def _insert_ips(self, cur: psycopg.Cursor, peer_id: int, tid: int,
                    nets: Iterable[Net]) -> None:
        """The caller holds the address lock (taken before it wrote the peer's row)."""
        for position, net in enumerate(nets):
            clash = _overlap(cur, net)
            if clash is not None:
                raise overlap_conflict(net, clash, tid)
            cur.execute("INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, net)"
                        " VALUES (%s, %s, %s, %s, %s::cidr)",
                        (peer_id, tid, position, net.cidr, net.cidr))

    def create_peer(self, tenant: str, public_key: str, nets: list[Net], name: str | None,
                    preshared_key: str | None) -> int:
        try:
            with self._write() as cur:
                tid = self._lock_tenant(cur, tenant)
                _lock_addresses(cur)  # before the key: see "Lock order" in the docstring
                if cur.execute("SELECT 1 FROM peers WHERE public_key = %s",
                               (public_key,)).fetchone():
                    raise Conflict("peer_exists",
                                   "public_key: a peer with this key already exists")
                now = utcnow()
                peer_id = cur.execute(
                    "INSERT INTO peers (public_key, tenant_id, name, preshared_key, created_at,"
                    " updated_at) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (public_key, tid, name, preshared_key, now, now),
                ).fetchone()["id"]
                self._insert_ips(cur, peer_id, tid, nets)
                self._record_change(cur, "create", public_key, tenant)
        except pgerrors.UniqueViolation:  # the same key created by another writer just now
            raise Conflict("peer_exists",
                           "public_key: a peer with this key already exists") from None
        return peer_id

    def _peer_row(self, cur: psycopg.Cursor, public_key: str,
                  expect_tenant: int | None) -> dict:
        row = cur.execute(PEER_SELECT + " WHERE p.public_key = %s FOR UPDATE OF p",
                          (public_key,)).fetchone()
        if row is None or (expect_tenant is not None and row["tenant_id"] != expect_tenant):
            raise LookupError(public_key)
        return row

    def update_peer(self, public_key: str, *, nets: list[Net] | None, name: Any = UNSET,
                    preshared_key: Any = UNSET, expect_tenant: int | None = None) -> None:
        with self._write() as cur:
            row = self._peer_row(cur, public_key, expect_tenant)
            if nets is not None:  # before the row's new version: see "Lock order"
                self._lock_tenant(cur, row["tenant"])
                _lock_addresses(cur)
            sets, params = ["updated_at = %s"], [utcnow()]
            if name is not UNSET:
                sets.append("name = %s")
                params.append(name)
            if preshared_key is not UNSET:
                sets.append("preshared_key = %s")
                params.append(preshared_key)
            cur.execute(f"UPDATE peers SET {', '.join(sets)} WHERE id = %s",
                        (*params, row["id"]))
            if nets is not None:
                cur.execute("DELETE FROM allowed_ips WHERE peer_id = %s", (row["id"],))
                self._insert_ips(cur, row["id"], row["tenant_id"], nets)
            self._record_change(cur, "update", public_key, row["tenant"])

    def set_revoked(self, public_key: str, revoked: bool,
                    expect_tenant: int | None = None) -> bool:
        with self._write() as cur:
            row = self._peer_row(cur, public_key, expect_tenant)
            if (row["revoked_at"] is not None) == revoked:
                return False
            now = utcnow()
            cur.execute("UPDATE peers SET revoked_at = %s, updated_at = %s WHERE id = %s",
                        (now if revoked else None, now, row["id"]))
            self._record_change(cur, "revoke" if revoked else "restore", public_key,
                                row["tenant"])
        return True

    def delete_peer(self, public_key: str, expect_tenant: int | None = None) -> None:
        with self._write() as cur:
            row = self._peer_row(cur, public_key, expect_tenant)
            cur.execute("DELETE FROM peers WHERE id = %s", (row["id"],))
            self._record_change(cur, "delete", public_key, row["tenant"])

    def _peer_ips(self, cur: psycopg.Cursor, peer_ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {pid: [] for pid in peer_ids}
        if peer_ids:
            for r in cur.execute("SELECT peer_id, cidr FROM allowed_ips WHERE peer_id = ANY(%s)"
                                 " ORDER BY peer_id, position", (peer_ids,)):
                out[r["peer_id"]].append(r["cidr"])
        return out

    def get_peer(self, public_key: str) -> dict | None:
        with self._read() as cur:
            row = cur.execute(PEER_SELECT + " WHERE p.public_key = %s",
                              (public_key,)).fetchone()
            if row is None:
                return None
            return peer_dict(row, self._peer_ips(cur, [row["id"]])[row["id"]])

    def list_peers(self, after: int, limit: int, tenant_ids: Iterable[int] = (),
                   revoked: bool | None = None) -> tuple[list[dict], int | None]:
        where, params = ["p.id > %s"], [after]
        for tid in tenant_ids:
            where.append("p.tenant_id = %s")
            params.append(tid)
        if revoked is not None:
            where.append("p.revoked_at IS NOT NULL" if revoked else "p.revoked_at IS NULL")
        with self._read() as cur:
            rows = cur.execute(
                PEER_SELECT + f" WHERE {' AND '.join(where)} ORDER BY p.id LIMIT %s",
                (*params, limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            ips = self._peer_ips(cur, [r["id"] for r in rows])
        return [peer_dict(r, ips[r["id"]]) for r in rows], rows[-1]["id"] if more else None

    # bulk

    def bulk_create_peers(self, tenant: str, peers: Iterable[NewPeer],
                          batch: int | None = BULK_CHUNK,
                          progress: Callable[[int], None] | None = None) -> int:
        """Rows go in with COPY; the database checks overlaps with one query per chunk."""
        if self.tenant_id(tenant) is None:
            raise LookupError(tenant)
        try:
            count = self._bulk(tenant, peers, batch, progress)
        except pgerrors.DeadlockDetected:
            # Writers keep the lock order of the module docstring, so none is
            # known to close a cycle with an import (two imports take turns on
            # the address lock). Should PostgreSQL still stop one, say so
            # plainly instead of failing with a driver error.
            raise Conflict("write_conflict", "another write was adding some of the same"
                           " keys at the same time and PostgreSQL stopped this import to"
                           " break the deadlock; run it again") from None
        # Fresh statistics, so the API's queries plan for the new size at once
        # instead of after autovacuum gets round to it.
        with self._read() as cur:
            cur.execute("ANALYZE peers, allowed_ips")
        return count

    def _bulk(self, tenant: str, peers: Iterable[NewPeer], batch: int | None,
              progress: Callable[[int], None] | None) -> int:
        """Each transaction records its creates in the feed at its very end. The
        feed head stays locked until commit, so a writer holding it must never
        wait for another. When each chunk took it, an all-or-nothing import
        held it from its first chunk on, and an API create (in another tenant)
        of a key in a later chunk held that key and waited for the head while
        the import held the head and waited for the key: PostgreSQL broke the
        deadlock by failing one of them. The address lock, taken first (by
        _stored_top), keeps the same order with it (the module's lock order)."""
        count = 0
        with self._pool().connection() as conn:
            if batch is None:  # one transaction, all or nothing
                with conn.transaction():
                    cur = conn.cursor()
                    tid = self._lock_tenant(cur, tenant)
                    top = _stored_top(cur)
                    ids = array.array("q")
                    for chunk in chunks(peers, BULK_CHUNK):
                        ids.extend(self._copy_chunk(conn, cur, tid, chunk, top))
                    _feed_creates(cur, tenant, ids)
                    count = len(ids)
                if progress is not None:
                    progress(count)
                return count
            for chunk in chunks(peers, batch):
                with conn.transaction():
                    cur = conn.cursor()
                    tid = self._lock_tenant(cur, tenant)
                    ids = self._copy_chunk(conn, cur, tid, chunk, _stored_top(cur))
                    _feed_creates(cur, tenant, ids)
                count += len(chunk)
                if progress is not None:
                    progress(count)
        return count

    def _copy_chunk(self, conn: psycopg.Connection, cur: psycopg.Cursor, tid: int,
                    chunk: list[NewPeer], top: dict[int, bytes | None]) -> list[int]:
        """Returns the new peers' ids. `top` is the last address of the stored
        networks per family, kept up to date here (the address lock, taken by
        _stored_top, keeps other writers out)."""
        now = utcnow()
        ids = [r["id"] for r in cur.execute(
            "SELECT nextval(pg_get_serial_sequence('peers', 'id')) AS id"
            " FROM generate_series(1, %s)", (len(chunk),))]
        ip_rows = [(pid, tid, position, net.cidr, net.family, net.lo, net.hi)
                   for pid, peer in zip(ids, chunk, strict=True)
                   for position, net in enumerate(peer.allowed_ips)]
        nets = [net for peer in chunk for net in peer.allowed_ips]
        check_chunk_overlaps(ip_rows)
        # Against the stored networks: as on SQLite, a network starting past every
        # stored one of its family cannot overlap (address plans are mostly
        # allocated in order: 13.2 -> 6.7 s for 50,000 peers); the rest look up
        # their predecessor, all in one statement. Statistics lag behind a bulk
        # load, and believing the table empty the planner scans it per network
        # instead: 50,000 peers took 490 s that way.
        probe = [(r, net) for r, net in zip(ip_rows, nets, strict=True)
                 if top[r[4]] is not None and r[5] <= top[r[4]]]
        if probe:
            cur.execute("SET LOCAL enable_seqscan = off")
            clash = cur.execute(
                "SELECT n.i, o.cidr, o.tenant_id FROM unnest(%s::text[], %s::text[])"
                " WITH ORDINALITY AS n(cidr, last, i) CROSS JOIN LATERAL (SELECT cidr, net,"
                " tenant_id FROM allowed_ips WHERE net <= n.last::cidr ORDER BY net DESC"
                " LIMIT 1) o WHERE o.net && n.cidr::cidr LIMIT 1",
                ([r[3] for r, _ in probe], [_last(net) for _, net in probe])).fetchone()
            if clash is not None:
                pid, _tid, _pos, text, *_ = probe[clash["i"] - 1][0]
                key = chunk[ids.index(pid)].public_key
                raise overlap_conflict(cidr.parse(text), Overlap(clash["cidr"],
                                       clash["tenant_id"]), tid, where=key)
        for family in (4, 6):
            ends = [r[6] for r in ip_rows if r[4] == family]
            if ends:
                top[family] = max(ends) if top[family] is None else max(top[family], *ends)
        try:
            # A savepoint: on a duplicate, the transaction lives on to find which key.
            with conn.transaction(), cur.copy(
                    "COPY peers (id, public_key, tenant_id, name, preshared_key, created_at,"
                    " updated_at) FROM STDIN") as copy:
                for pid, (key, _nets, name, psk) in zip(ids, chunk, strict=True):
                    copy.write_row((pid, key, tid, name, psk, now, now))
        except pgerrors.UniqueViolation:
            raise duplicate([p.public_key for p in chunk], lambda key: cur.execute(
                "SELECT 1 FROM peers WHERE public_key = %s", (key,)).fetchone() is not None
            ) from None
        with cur.copy("COPY allowed_ips (peer_id, tenant_id, position, cidr, net)"
                      " FROM STDIN") as copy:
            for pid, _tid, position, text, *_ in ip_rows:
                copy.write_row((pid, tid, position, text, text))
        return ids

    # gateways

    def gateway_lookup(self, public_key: str, tenants: frozenset[str] | None) -> dict | None:
        with self._read() as cur:
            row = cur.execute(LOOKUP_SQL + " = %s", (public_key,)).fetchone()
        return None if row is None else _gateway_peer(row, tenants)

    def gateway_lookup_many(self, public_keys: list[str],
                            tenants: frozenset[str] | None) -> dict[str, dict]:
        if not public_keys:
            return {}
        with self._read() as cur:
            rows = cur.execute(LOOKUP_SQL + " = ANY(%s)", (list(public_keys),)).fetchall()
        found = (_gateway_peer(row, tenants) for row in rows)
        return {peer["public_key"]: peer for peer in found if peer is not None}

    def changes(self, since: int, limit: int, tenants: frozenset[str] | None = None,
                hide_activity: bool = False) -> dict:
        scope, scope_params = _feed_scope(tenants)
        rows_scope, rows_params, horizon = scope, list(scope_params), None
        with self._read() as cur:
            if tenants is not None and not hide_activity:
                # A pool's page: read first; cursors become visible in order (module
                # docstring), so every one up to it has committed.
                horizon = cur.execute("SELECT coalesce(max(cursor), 0) AS hi FROM changes"
                                      ).fetchone()["hi"]
                rows_scope += " AND cursor <= %s"
                rows_params.append(horizon)
            rows = cur.execute(
                f"SELECT cursor, op, public_key, tenant, at FROM changes"
                f" WHERE cursor > %s{rows_scope} ORDER BY cursor LIMIT %s",
                (since, *rows_params, limit + 1)).fetchall()
            if not hide_activity:
                scope, scope_params = "", []
            bounds = cur.execute("SELECT min(cursor) AS lo, max(cursor) AS hi FROM changes"
                                 f" WHERE true{scope}", scope_params).fetchone()
            # Anchors within the scope that hides activity, as in sqlite.py.
            anchors = cur.execute("SELECT cursor, op, public_key, tenant, at FROM changes"
                                  f" WHERE cursor IN (%s, %s, %s){scope}",
                                  (since, horizon or since, bounds["hi"] or 0, *scope_params)
                                  ).fetchall()
            feed = cur.execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()
        return feed_page(rows, since, limit, (bounds["lo"], bounds["hi"]),
                         feed["value"] if feed else "", anchors, horizon)

    def active_keys(self, tenants: frozenset[str] | None = None,
                    hide_activity: bool = False) -> tuple[int, list[str]]:
        scope, scope_params = _feed_scope(tenants) if hide_activity else ("", [])
        sql, params = "SELECT public_key FROM peers WHERE revoked_at IS NULL", []
        if tenants is not None:
            sql += " AND tenant_id IN (SELECT id FROM tenants WHERE name = ANY(%s))"
            params.append(sorted(tenants))
        with self._read() as cur:
            cursor = cur.execute(f"SELECT max(cursor) AS hi FROM changes WHERE true{scope}",
                                 scope_params).fetchone()["hi"] or 0
            return cursor, [r["public_key"] for r in cur.execute(sql, params)]

    # tokens

    def add_token(self, token_id: str, digest: bytes, scope: str, tenant: str | None,
                  name: str | None, pool: Sequence[str] = ()) -> None:
        try:
            with self._write() as cur:
                tenant_id = None
                if tenant is not None:
                    row = cur.execute("SELECT id FROM tenants WHERE name = %s",
                                      (tenant,)).fetchone()
                    if row is None:
                        raise ValueError(f"tenant {tenant!r} does not exist")
                    tenant_id = row["id"]
                cur.execute("INSERT INTO tokens (id, hash, scope, tenant_id, name, created_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s)",
                            (token_id, digest, scope, tenant_id, name, utcnow()))
                cur.executemany("INSERT INTO token_pools (token_id, tenant) VALUES (%s, %s)",
                                [(token_id, t) for t in pool])
        except pgerrors.UniqueViolation:
            raise Conflict("token_exists", f"token id {token_id} is taken") from None

    def get_token(self, token_id: str) -> dict | None:
        with self._read() as cur:
            return cur.execute(
                "SELECT t.id, t.hash, t.scope, t.tenant_id, t.name, t.revoked_at,"
                " n.name AS tenant, ARRAY(SELECT tenant FROM token_pools WHERE token_id = t.id"
                " ORDER BY tenant) AS pool"
                " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id WHERE t.id = %s",
                (token_id,)).fetchone()

    def set_token_limits(self, token_id: str, name: str | None, pool: list[str]) -> None:
        with self._write() as cur:
            cur.execute("UPDATE tokens SET name = %s WHERE id = %s", (name, token_id))
            cur.execute("DELETE FROM token_pools WHERE token_id = %s", (token_id,))
            cur.executemany("INSERT INTO token_pools (token_id, tenant) VALUES (%s, %s)",
                            [(token_id, t) for t in sorted(set(pool))])

    def revoke_token(self, token_id: str) -> bool:
        with self._write() as cur:
            cur.execute("UPDATE tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
                        (utcnow(), token_id))
            return cur.rowcount == 1

    def list_tokens(self) -> list[dict]:
        with self._read() as cur:
            return cur.execute(
                "SELECT t.id, t.scope, n.name AS tenant, t.name,"
                " ARRAY(SELECT tenant FROM token_pools WHERE token_id = t.id ORDER BY tenant)"
                " AS pool, t.created_at, t.revoked_at"
                " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id ORDER BY t.created_at"
            ).fetchall()

    def stats(self) -> dict[str, int]:
        with self._read() as cur:
            peers = cur.execute(
                "SELECT count(*) FILTER (WHERE revoked_at IS NULL) AS active,"
                " count(*) FILTER (WHERE revoked_at IS NOT NULL) AS revoked FROM peers"
            ).fetchone()
            tenants = cur.execute("SELECT count(*) AS n FROM tenants").fetchone()["n"]
            feed = cur.execute("SELECT coalesce(max(cursor), 0) AS latest, count(*) AS kept"
                               " FROM changes").fetchone()
        return {"active": peers["active"], "revoked": peers["revoked"], "tenants": tenants,
                "latest": feed["latest"], "changes": feed["kept"]}


def _feed_scope(tenants: frozenset[str] | None) -> tuple[str, list]:
    """The changes of `tenants` (all with None), by index (see sqlite.py)."""
    if tenants is None:
        return "", []
    return " AND tenant = ANY(%s)", [sorted(tenants)]


def _version(cur: psycopg.Cursor) -> int:
    if cur.execute("SELECT to_regclass('wgjit_schema') AS t").fetchone()["t"] is None:
        return 0
    row = cur.execute("SELECT max(version) AS v FROM wgjit_schema").fetchone()
    return row["v"] or 0


# The stored network that can overlap one ending at address %s (a host cidr):
# the greatest network <= that address (migration 6 says why). Allowed IPs are
# unique across tenants, so the first row of the backward scan is the answer.
PREDECESSOR = ("SELECT cidr, net, tenant_id FROM allowed_ips WHERE net <= %s::cidr"
               " ORDER BY net DESC LIMIT 1")

# The greatest address of each family as a host cidr, for _stored_top.
FAMILY_TOP = {4: "255.255.255.255/32", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"}


def _last(net: Net) -> str:
    """The last address of `net` as a host cidr."""
    if net.family == 4:
        return socket.inet_ntop(socket.AF_INET, net.hi) + "/32"
    return socket.inet_ntop(socket.AF_INET6, net.hi) + "/128"


def _overlap(cur: psycopg.Cursor, net: Net) -> Overlap | None:
    # One btree descent: 0.06-0.4 ms a check where the GiST index it replaced
    # took 0.5-1.4 ms (100,000 peers, loaded machine).
    row = cur.execute(f"SELECT p.cidr, p.tenant_id FROM ({PREDECESSOR}) p"
                      " WHERE p.net && %s::cidr", (_last(net), net.cidr)).fetchone()
    return Overlap(row["cidr"], row["tenant_id"]) if row else None


def _lock_addresses(cur: psycopg.Cursor) -> None:
    """Serialize writes that add allowed IPs, until commit (see the module docstring)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADDRESS_LOCK,))


def _stored_top(cur: psycopg.Cursor) -> dict[int, bytes | None]:
    """The last address of every tenant's networks per family (4 or 16 bytes).
    Stored networks never overlap, so the greatest one also ends last. Takes
    the address lock first: the bulk path's overlap check trusts this answer
    until its transaction commits, and other tenants' writers could move it."""
    _lock_addresses(cur)
    top: dict[int, bytes | None] = {}
    for family, last in FAMILY_TOP.items():
        row = cur.execute(f"SELECT p.net::text AS net, family(p.net) AS family"
                          f" FROM ({PREDECESSOR}) p", (last,)).fetchone()
        top[family] = cidr.parse(row["net"]).hi if row and row["family"] == family else None
    return top


def _feed_creates(cur: psycopg.Cursor, tenant: str, ids: Sequence[int]) -> None:
    """The feed's "create" changes for these new peers, in this order; last in
    its transaction (see PostgresStore._bulk)."""
    first = _take_cursors(cur, len(ids)) - len(ids)
    now = utcnow()
    # The planner may still believe peers empty (statistics lag a bulk load)
    # and join it by a scan per batch instead of its primary key.
    cur.execute("SET LOCAL enable_seqscan = off")
    for start in range(0, len(ids), BULK_CHUNK):
        cur.execute(
            "INSERT INTO changes (cursor, op, public_key, tenant, at)"
            " SELECT %s + u.n, 'create', p.public_key, %s, %s"
            " FROM unnest(%s::bigint[]) WITH ORDINALITY AS u(id, n) JOIN peers p ON p.id = u.id",
            (first + start, tenant, now, list(ids[start:start + BULK_CHUNK])))


def _take_cursors(cur: psycopg.Cursor, n: int) -> int:
    """Reserve n feed cursors; returns the last. Locks the feed head until commit."""
    return cur.execute("UPDATE feed_head SET cursor = cursor + %s RETURNING cursor",
                       (n,)).fetchone()["cursor"]
