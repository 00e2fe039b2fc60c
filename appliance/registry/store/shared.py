"""What both engines' rows, bulk paths and feed pages share (no SQL here)."""

from __future__ import annotations

import hashlib
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
            raise Conflict("allowed_ip_overlap", f"{b[3]} overlaps {a[3]} in the same import",
                           field="allowed_ips")


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


CHANGE_FIELDS = ("cursor", "op", "public_key", "tenant", "at")
DIGEST_BYTES = 8  # 16 hex characters: a reused cursor gets a matching digest 1 in 2**64


def change_digest(row: Any) -> str:
    """What identifies one change beyond its cursor number.

    A restored backup, or a commit lost to a power cut, makes the registry hand
    out cursor numbers again for different changes (the feed_id stays the same).
    A follower that keeps the digest of the change at its cursor can ask whether
    that change is still there (`since` + `digest`); the millisecond timestamp
    makes two changes differ even for the same op on the same key.
    """
    text = "\x1f".join(str(row[f]) for f in CHANGE_FIELDS)
    return hashlib.blake2s(text.encode(), digest_size=DIGEST_BYTES).hexdigest()


def feed_page(rows: list[dict], since: int, limit: int, bounds: Any, feed_id: str,
              anchors: Iterable[Any] = (), horizon: int | None = None) -> dict:
    """One page of the feed.

    horizon: for a gateway pool's page, the latest cursor read before its rows
    (every row up to it was scanned): a page that is not `more` continues from
    there, past the changes the reader may not see.
    anchors: the stored rows at `since`, at `horizon` and at the latest cursor
    (any may be absent), for the digests a follower keeps. The cursor a page
    returns may be another tenant's change (the horizon): its digest is still
    the one of the change stored there, which the next poll's `digest` is
    checked against.
    """
    more = len(rows) > limit
    rows = [{**r, "digest": change_digest(r)} for r in rows[:limit]]
    cursor = rows[-1]["cursor"] if rows else since
    if horizon is not None and not more:
        cursor = max(cursor, horizon)
    at = {a["cursor"]: change_digest(a) for a in anchors}
    at.update((r["cursor"], r["digest"]) for r in rows)
    latest = bounds[1] or 0
    return {
        "changes": rows,
        "cursor": cursor,
        # The digest of the change at `cursor`: what to send back as `digest`.
        "cursor_digest": at.get(cursor),
        "since_digest": at.get(since),
        "latest": latest,
        "latest_digest": at.get(latest),
        "earliest": bounds[0] or 0,
        "more": more,
        "feed_id": feed_id,
    }
