"""Tenants, peers and the change feed as SQL: shared by the API and bulk tools.

Every peer write appends to `changes` in the same transaction, so the feed is
exactly the sequence of committed writes: writers hold the lock from BEGIN, so
cursors commit in order and a reader never sees cursor N+1 without N.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Iterable

from appliance.registry import db

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Conflict(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def _bounds(net: IPNetwork) -> tuple[bytes, bytes]:
    # Arithmetic on the integer: ipaddress's broadcast_address builds objects
    # and dominates a bulk import.
    size = 4 if net.version == 4 else 16
    first = int(net.network_address)
    last = first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
    return first.to_bytes(size, "big"), last.to_bytes(size, "big")


def find_overlap(conn: sqlite3.Connection, tenant_id: int, net: IPNetwork,
                 bounds: tuple[bytes, bytes] | None = None) -> str | None:
    """The CIDR in this tenant that overlaps `net`, if any, in O(log n).

    Stored ranges inside a tenant never overlap (this check keeps it so), hence
    sorted by start they are also sorted by end: only the last range starting at
    or before our end can reach into us.
    """
    lo, hi = bounds or _bounds(net)
    row = conn.execute(
        "SELECT cidr, hi FROM allowed_ips WHERE tenant_id = ? AND family = ? AND lo <= ?"
        " ORDER BY lo DESC LIMIT 1",
        (tenant_id, net.version, hi),
    ).fetchone()
    if row is not None and row["hi"] >= lo:
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
                nets: Iterable[IPNetwork]) -> None:
    for position, net in enumerate(nets):
        lo, hi = _bounds(net)
        clash = find_overlap(conn, tid, net, (lo, hi))
        if clash is not None:
            raise Conflict("allowed_ip_overlap",
                           f"allowed_ips: {net} overlaps {clash} of another peer in this tenant")
        conn.execute(
            "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (peer_id, tid, position, str(net), net.version, lo, hi),
        )


def create_peer(conn: sqlite3.Connection, tenant: str, public_key: str,
                nets: list[IPNetwork], name: str | None, preshared_key: str | None) -> int:
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


def update_peer(conn: sqlite3.Connection, public_key: str, *, nets: list[IPNetwork] | None,
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


def bulk_create_peers(conn: sqlite3.Connection, tenant: str,
                      peers: Iterable[tuple[str, list[IPNetwork], str | None]],
                      batch: int = 20_000) -> int:
    """Create many peers with the API's checks, `batch` per transaction.

    For imports and benchmarks. Rows go in with executemany, so peer ids are
    assigned here (we hold the write lock); overlaps are checked against the
    database per network and within the batch by sorting it.
    """
    tid = tenant_id(conn, tenant)
    if tid is None:
        raise LookupError(tenant)
    count = 0
    it = iter(peers)
    while True:
        chunk = [p for _, p in zip(range(batch), it, strict=False)]
        if not chunk:
            return count
        with db.write(conn):
            now = db.utcnow()
            next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM peers").fetchone()[0]
            # Address plans are usually allocated in order: a network that starts
            # past every stored range of its family cannot overlap one, which
            # spares the per-network query for such imports.
            top = {family: conn.execute(
                "SELECT max(hi) FROM allowed_ips WHERE tenant_id = ? AND family = ?",
                (tid, family)).fetchone()[0] for family in (4, 6)}
            peer_rows, ip_rows, change_rows = [], [], []
            for offset, (key, nets, name) in enumerate(chunk):
                pid = next_id + offset
                peer_rows.append((pid, key, tid, name, now, now))
                change_rows.append(("create", key, tenant, now))
                for position, net in enumerate(nets):
                    lo, hi = _bounds(net)
                    stored_top = top[net.version]
                    clash = None if stored_top is None or lo > stored_top else \
                        find_overlap(conn, tid, net, (lo, hi))
                    if clash is not None:
                        raise Conflict("allowed_ip_overlap", f"{key}: {net} overlaps {clash}")
                    ip_rows.append((pid, tid, position, str(net), net.version, lo, hi))
            _check_batch_overlaps(ip_rows)
            conn.executemany(
                "INSERT INTO peers (id, public_key, tenant_id, name, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", peer_rows)
            conn.executemany(
                "INSERT INTO allowed_ips (peer_id, tenant_id, position, cidr, family, lo, hi)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", ip_rows)
            conn.executemany(
                "INSERT INTO changes (op, public_key, tenant, at) VALUES (?, ?, ?, ?)",
                change_rows)
        count += len(chunk)


def _check_batch_overlaps(ip_rows: list[tuple]) -> None:
    ordered = sorted(ip_rows, key=lambda r: (r[4], r[5]))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a[4] == b[4] and b[5] <= a[6]:
            raise Conflict("allowed_ip_overlap", f"{b[3]} overlaps {a[3]} in the same import")
