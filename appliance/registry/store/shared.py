"""What both engines' rows, bulk paths and feed pages share (no SQL here)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from appliance.registry.store import Conflict, NewPeer


def peer_dict(row: Any, ips: list[str]) -> dict:
    """A peer as the API shows it, from a row of `SELECT p.*, t.name AS tenant` (a
    sqlite3.Row or a psycopg dict row) and its networks in order."""
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


def chunks(items: Iterable[NewPeer], size: int) -> Iterator[list[NewPeer]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def check_chunk_overlaps(ip_rows: list[tuple]) -> None:
    """ip_rows are (peer_id, tenant_id, position, cidr, family, lo, hi)."""
    ordered = sorted(ip_rows, key=lambda r: (r[4], r[5]))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a[4] == b[4] and b[5] <= a[6]:
            raise Conflict("allowed_ip_overlap", f"{b[3]} overlaps {a[3]} in the same import")


def duplicate(keys: list[str], stored_before: Callable[[str], bool]) -> Conflict:
    """Which key broke the unique constraint: only looked for once one did."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return Conflict("peer_exists", f"{key}: appears twice in the import")
        seen.add(key)
    for key in keys:
        if stored_before(key):
            return Conflict("peer_exists", f"{key}: a peer with this key already exists")
    return Conflict("peer_exists", "a peer in the import already exists")


def feed_page(rows: list[dict], since: int, limit: int, bounds: Any, feed_id: str,
              horizon: int | None = None) -> dict:
    """horizon: for a page filtered by tenant, the latest cursor read before its rows
    (every row up to it was scanned): a page that is not `more` continues from there,
    past the changes the reader may not see."""
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = rows[-1]["cursor"] if rows else since
    if horizon is not None and not more:
        cursor = max(since, horizon)
    return {
        "changes": rows,
        "cursor": cursor,
        "latest": bounds[1] or 0,
        "earliest": bounds[0] or 0,
        "more": more,
        "feed_id": feed_id,
    }
