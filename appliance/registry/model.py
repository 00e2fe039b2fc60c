"""Tenants, peers and the change feed as SQL: shared by the API and bulk tools.

Every peer write appends to `changes` in the same transaction, so the feed is
exactly the sequence of committed writes: writers hold the lock from BEGIN, so
cursors commit in order and a reader never sees cursor N+1 without N.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from appliance.registry import db
from appliance.registry.cidr import Net


class Conflict(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def find_overlap(conn: sqlite3.Connection, tenant_id: int, net: Net) -> str | None:
    """The CIDR in this tenant that overlaps `net`, if any, in O(log n).

    Stored ranges inside a tenant never overlap (this check keeps it so), hence
    sorted by start they are also sorted by end: only the last range starting at
    or before our end can reach into us.
    """
    row = conn.execute(
        "SELECT cidr, hi FROM allowed_ips WHERE tenant_id = ? AND family = ? AND lo <= ?"
        " ORDER BY lo DESC LIMIT 1",
        (tenant_id, net.family, net.hi),
    ).fetchone()
    if row is not None and row["hi"] >= net.lo:
        return row["cidr"]
    return None


def tenant_id(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
    return row["id"] if row else None


def create_tenant(conn: sqlite3.Connection, name: str) -> dict:
    with db.write(conn):
        if tenant_id(conn, name) is not None:
            raise Conflict("tenant_exists", f"tenant {name!r} already exists")
        now = db.utcnow()
        conn.execute("INSERT INTO tenants (name, created_at) VALUES (?, ?)", (name, now))
    return {"name": name, "created_at": now, "peers": 0}


def _record_change(conn: sqlite3.Connection, op: str, public_key: str, tenant: str) -> int:
    cur = conn.execute(
        "INSERT INTO changes (op, public_key, tenant, at) VALUES (?, ?, ?, ?)",
        (op, public_key, tenant, db.utcnow()),
    )
    return cur.lastrowid


def _insert_ips(conn: sqlite3.Connection, peer_id: int, tid: int,
                nets: Iterable[Net]) -> None:
    for position, net in enumerate(nets):
        clash = find_overlap(conn, tid, net)
        if clash is not None:
            raise Conflict("allowed_ip_overlap", f"allowed_ips: {net.cidr} overlaps {clash}"
                           " of another peer in this tenant")
        conn.execute(
            "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (peer_id, tid, position, net.cidr, net.family, net.lo, net.hi),
        )


def create_peer(conn: sqlite3.Connection, tenant: str, public_key: str,
                nets: list[Net], name: str | None, preshared_key: str | None) -> int:
    with db.write(conn):
        tid = tenant_id(conn, tenant)
        if tid is None:
            raise LookupError(tenant)
        if conn.execute("SELECT 1 FROM peers WHERE public_key = ?", (public_key,)).fetchone():
            raise Conflict("peer_exists", "public_key: a peer with this key already exists")
        now = db.utcnow()
        cur = conn.execute(
            "INSERT INTO peers (public_key, tenant_id, name, preshared_key, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (public_key, tid, name, preshared_key, now, now),
        )
        _insert_ips(conn, cur.lastrowid, tid, nets)
        _record_change(conn, "create", public_key, tenant)
    return cur.lastrowid


UNSET = object()


def update_peer(conn: sqlite3.Connection, public_key: str, *, nets: list[Net] | None,
                name: object = UNSET, preshared_key: object = UNSET,
                expect_tenant: int | None = None) -> None:
    with db.write(conn):
        row = _peer_row(conn, public_key)
        if row is None or (expect_tenant is not None and row["tenant_id"] != expect_tenant):
            raise LookupError(public_key)
        sets, params = ["updated_at = ?"], [db.utcnow()]
        if name is not UNSET:
            sets.append("name = ?")
            params.append(name)
        if preshared_key is not UNSET:
            sets.append("preshared_key = ?")
            params.append(preshared_key)
        conn.execute(f"UPDATE peers SET {', '.join(sets)} WHERE id = ?", (*params, row["id"]))
        if nets is not None:
            conn.execute("DELETE FROM allowed_ips WHERE peer_id = ?", (row["id"],))
            _insert_ips(conn, row["id"], row["tenant_id"], nets)
        _record_change(conn, "update", public_key, row["tenant"])


def set_revoked(conn: sqlite3.Connection, public_key: str, revoked: bool,
                expect_tenant: int | None = None) -> bool:
    """Revoke or restore; returns False when it already was in that state."""
    with db.write(conn):
        row = _peer_row(conn, public_key)
        if row is None or (expect_tenant is not None and row["tenant_id"] != expect_tenant):
            raise LookupError(public_key)
        if (row["revoked_at"] is not None) == revoked:
            return False
        now = db.utcnow()
        conn.execute("UPDATE peers SET revoked_at = ?, updated_at = ? WHERE id = ?",
                     (now if revoked else None, now, row["id"]))
        _record_change(conn, "revoke" if revoked else "restore", public_key, row["tenant"])
    return True


def delete_peer(conn: sqlite3.Connection, public_key: str,
                expect_tenant: int | None = None) -> None:
    with db.write(conn):
        row = _peer_row(conn, public_key)
        if row is None or (expect_tenant is not None and row["tenant_id"] != expect_tenant):
            raise LookupError(public_key)
        conn.execute("DELETE FROM peers WHERE id = ?", (row["id"],))
        _record_change(conn, "delete", public_key, row["tenant"])


def _peer_row(conn: sqlite3.Connection, public_key: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT p.*, t.name AS tenant FROM peers p JOIN tenants t ON t.id = p.tenant_id"
        " WHERE p.public_key = ?",
        (public_key,),
    ).fetchone()


def peer_ips(conn: sqlite3.Connection, peer_ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {pid: [] for pid in peer_ids}
    if not peer_ids:
        return out
    marks = ",".join("?" * len(peer_ids))
    for r in conn.execute(
        f"SELECT peer_id, cidr FROM allowed_ips WHERE peer_id IN ({marks})"
        " ORDER BY peer_id, position",
        peer_ids,
    ):
        out[r["peer_id"]].append(r["cidr"])
    return out


def get_peer(conn: sqlite3.Connection, public_key: str) -> dict | None:
    row = _peer_row(conn, public_key)
    if row is None:
        return None
    return peer_dict(row, peer_ips(conn, [row["id"]])[row["id"]])


def peer_dict(row: sqlite3.Row, ips: list[str]) -> dict:
    """The admin view of a peer; the preshared key itself is never shown."""
    return {
        "public_key": row["public_key"],
        "tenant": row["tenant"],
        "name": row["name"],
        "allowed_ips": ips,
        "has_preshared_key": row["preshared_key"] is not None,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "revoked": row["revoked_at"] is not None,
        "revoked_at": row["revoked_at"],
        "tenant_id": row["tenant_id"],
    }


# Peers per executemany in a bulk insert: bounds the rows held in memory.
BULK_CHUNK = 20_000


class NewPeer(NamedTuple):
    public_key: str
    allowed_ips: list[Net]
    name: str | None = None
    preshared_key: str | None = None


def bulk_create_peers(conn: sqlite3.Connection, tenant: str, peers: Iterable[NewPeer],
                      batch: int | None = BULK_CHUNK,
                      progress: Callable[[int], None] | None = None) -> int:
    """Create many peers with the API's checks; returns how many.

    For imports and benchmarks. `batch` peers go in per transaction, or all of
    them in one (all or nothing) with batch=None; `progress` hears the running
    total after each commit. Rows go in with executemany, so peer ids are
    assigned here (we hold the write lock); overlaps are checked against the
    database per network and within each chunk by sorting it.
    """
    tid = tenant_id(conn, tenant)
    if tid is None:
        raise LookupError(tenant)
    # The foreign keys hold by construction here (the tenant was just looked up,
    # the peer ids are the ones inserted beside their networks), and checking
    # them row by row is about a quarter of the insert time. The pragma cannot
    # change inside a transaction, hence around all of it.
    enforced = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        return _bulk_insert(conn, tid, tenant, peers, batch, progress)
    finally:
        conn.execute(f"PRAGMA foreign_keys = {'ON' if enforced else 'OFF'}")


def _bulk_insert(conn: sqlite3.Connection, tid: int, tenant: str, peers: Iterable[NewPeer],
                 batch: int | None, progress: Callable[[int], None] | None) -> int:
    count = 0
    if batch is None:  # one transaction, all or nothing
        with db.write(conn):
            for chunk in _chunks(peers, BULK_CHUNK):
                _insert_chunk(conn, tid, tenant, chunk)
                count += len(chunk)
        if progress is not None:
            progress(count)
        return count
    for chunk in _chunks(peers, batch):
        with db.write(conn):
            _insert_chunk(conn, tid, tenant, chunk)
        count += len(chunk)
        if progress is not None:
            progress(count)
    return count


def _chunks(items: Iterable[NewPeer], size: int) -> Iterator[list[NewPeer]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _insert_chunk(conn: sqlite3.Connection, tid: int, tenant: str, chunk: list[NewPeer]) -> None:
    now = db.utcnow()
    next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM peers").fetchone()[0]
    # Address plans are usually allocated in order: a network that starts past
    # every stored range of its family cannot overlap one, which spares the
    # per-network query for such imports. Stored ranges never overlap, so the
    # range that starts last also ends last (an index probe, not max(hi)'s scan).
    top = {}
    for family in (4, 6):
        row = conn.execute("SELECT hi FROM allowed_ips WHERE tenant_id = ? AND family = ?"
                           " ORDER BY lo DESC LIMIT 1", (tid, family)).fetchone()
        top[family] = row[0] if row else None
    peer_rows, ip_rows = [], []
    for pid, (key, nets, name, psk) in enumerate(chunk, next_id):
        peer_rows.append((pid, key, tid, name, psk, now, now))
        for position, net in enumerate(nets):
            stored_top = top[net.family]
            if stored_top is not None and net.lo <= stored_top:
                clash = find_overlap(conn, tid, net)
                if clash is not None:
                    raise Conflict("allowed_ip_overlap", f"{key}: {net.cidr} overlaps {clash}")
            ip_rows.append((pid, tid, position, net.cidr, net.family, net.lo, net.hi))
    _check_chunk_overlaps(ip_rows)
    try:
        conn.executemany(
            "INSERT INTO peers (id, public_key, tenant_id, name, preshared_key, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", peer_rows)
    except sqlite3.IntegrityError:
        raise _duplicate(conn, [p.public_key for p in chunk], next_id) from None
    conn.executemany(
        "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)", ip_rows)
    # The feed gets the chunk in peer id order; one statement instead of a
    # bound row per peer.
    conn.execute(
        "INSERT INTO changes (op, public_key, tenant, at) SELECT 'create', public_key, ?, ?"
        " FROM peers WHERE id BETWEEN ? AND ? ORDER BY id",
        (tenant, now, next_id, next_id + len(chunk) - 1))


def _duplicate(conn: sqlite3.Connection, keys: list[str], first_new_id: int) -> Conflict:
    """Which key broke the unique constraint: only looked for once one did.

    executemany has already inserted the rows before the failing one, so
    only peers stored before this chunk count as existing.
    """
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return Conflict("peer_exists", f"{key}: appears twice in the import")
        seen.add(key)
    for key in keys:
        if conn.execute("SELECT 1 FROM peers WHERE public_key = ? AND id < ?",
                        (key, first_new_id)).fetchone():
            return Conflict("peer_exists", f"{key}: a peer with this key already exists")
    return Conflict("peer_exists", "a peer in the import already exists")


def _check_chunk_overlaps(ip_rows: list[tuple]) -> None:
    ordered = sorted(ip_rows, key=lambda r: (r[4], r[5]))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a[4] == b[4] and b[5] <= a[6]:
            raise Conflict("allowed_ip_overlap", f"{b[3]} overlaps {a[3]} in the same import")
