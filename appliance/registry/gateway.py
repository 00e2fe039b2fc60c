"""/v1/gateway: what a gateway pulls. Read-only; a gateway token can do nothing else.

`GET /v1/gateway/peers/{key}` answers exactly what a gateway needs to install a
peer, and 404 for a key that is unknown or revoked (the gateway caches both).
`GET /v1/gateway/changes?since=CURSOR` is the change feed gateways poll to drop
revoked peers and update changed ones.
`GET /v1/gateway/keys?salt=HEX` is a compact snapshot of the active keys (salted
4-byte digests) from which a gateway builds its known-key filter, kept current
by the change feed from the cursor it names.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3

from flask import Blueprint, jsonify, request

from appliance.registry import auth, db, validate
from appliance.registry.errors import APIError, invalid
from appliance.registry.peers import path_key

bp = Blueprint("gateway", __name__, url_prefix="/v1/gateway")

MAX_CHANGES = 1000
KEY_DIGEST_SIZE = 4  # bytes per key in /keys: 4 MB for 1M keys
SALT_SIZE = 16


LOOKUP_SQL = (
    # One statement: this is the hot path every gateway's cache misses land on.
    "SELECT p.public_key, p.preshared_key, p.revoked_at, p.updated_at, p.tenant_id,"
    " t.name AS tenant, (SELECT group_concat(cidr, ' ') FROM (SELECT cidr FROM allowed_ips"
    " WHERE peer_id = p.id ORDER BY position)) AS ips"
    " FROM peers p JOIN tenants t ON t.id = p.tenant_id WHERE p.public_key = ?"
)


def lookup(conn: sqlite3.Connection, key: str, tenant_limit: int | None) -> dict | None:
    """What a gateway gets for a canonical key; None when unknown, revoked or
    outside the token's tenant."""
    row = conn.execute(LOOKUP_SQL, (key,)).fetchone()
    if row is None or row["revoked_at"] is not None:
        return None
    if tenant_limit is not None and tenant_limit != row["tenant_id"]:
        return None
    return {
        "public_key": row["public_key"],
        "tenant": row["tenant"],
        "allowed_ips": row["ips"].split(" ") if row["ips"] else [],
        "preshared_key": row["preshared_key"],
        "updated_at": row["updated_at"],
    }


@bp.get("/peers/<wgkey:key>")
@auth.require("gateway", "admin")
def peer(key: str):
    found = lookup(db.get_db(), path_key(key), auth.tenant_limit())
    if found is None:
        raise APIError(404, "not_found", "no active peer with this key")
    return jsonify(found)


@bp.get("/changes")
@auth.require("gateway", "admin")
def changes():
    """Changes after `since`, oldest first.

    `cursor` is where to continue; `feed_id` changes when the database was
    replaced, and `earliest` is the oldest cursor still kept: a gateway whose
    cursor is older, or whose feed_id differs, must reconcile in full.
    """
    since = validate.int_arg("since", 0, 0, 2**62)
    limit = validate.int_arg("limit", MAX_CHANGES, 1, MAX_CHANGES)
    conn = db.get_db()
    params: list = [since]
    where = "cursor > ?"
    if auth.tenant_limit() is not None:
        where += " AND tenant = (SELECT name FROM tenants WHERE id = ?)"
        params.append(auth.tenant_limit())
    rows = conn.execute(
        f"SELECT cursor, op, public_key, tenant, at FROM changes WHERE {where}"
        " ORDER BY cursor LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    bounds = conn.execute("SELECT min(cursor), max(cursor) FROM changes").fetchone()
    return jsonify(
        changes=[dict(r) for r in rows],
        cursor=rows[-1]["cursor"] if rows else since,
        latest=bounds[1] or 0,
        earliest=bounds[0] or 0,
        more=more,
        feed_id=db.feed_id(conn),
    )


def key_digest(salt: bytes, public_key: bytes) -> bytes:
    """The filter's entry for a raw 32-byte key: keyed BLAKE2s, KEY_DIGEST_SIZE bytes.

    Keyed with the gateway's secret salt so that nobody can make keys whose
    digests hit registered ones on purpose (with a plain 4-byte prefix that
    takes ~2^32/n tries, a few thousand at a million keys).
    """
    return hashlib.blake2s(public_key, key=salt, digest_size=KEY_DIGEST_SIZE).digest()


@bp.get("/keys")
@auth.require("gateway", "admin")
def keys():
    """Salted digests of every active key, sorted, and the feed cursor they reflect.

    The cursor is read first: a key created after it is in the feed from that
    cursor on, whether or not the snapshot also caught it.
    """
    raw = request.args.get("salt", "")
    try:
        salt = bytes.fromhex(raw)
    except ValueError:
        salt = b""
    if len(salt) != SALT_SIZE:
        raise invalid("salt", f"must be {SALT_SIZE} bytes in hex")
    conn = db.get_db()
    cursor = conn.execute("SELECT max(cursor) FROM changes").fetchone()[0] or 0
    sql, params = "SELECT public_key FROM peers WHERE revoked_at IS NULL", []
    if auth.tenant_limit() is not None:
        sql += " AND tenant_id = ?"
        params.append(auth.tenant_limit())
    digests = sorted({key_digest(salt, base64.b64decode(k)) for (k,) in conn.execute(sql, params)})
    return jsonify(digest_size=KEY_DIGEST_SIZE, count=len(digests), cursor=cursor,
                   feed_id=db.feed_id(conn),
                   digests=base64.b64encode(b"".join(digests)).decode())
