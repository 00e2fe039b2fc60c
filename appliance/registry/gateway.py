"""/v1/gateway: what a gateway pulls. Read-only; a gateway token can do nothing else.

`GET /v1/gateway/peers/{key}` answers exactly what a gateway needs to install a
peer, and 404 for a key that is unknown or revoked (the gateway caches both).
`GET /v1/gateway/changes?since=CURSOR` is the change feed gateways poll to drop
revoked peers and update changed ones.
"""

from __future__ import annotations

import sqlite3

from flask import Blueprint, jsonify

from appliance.registry import auth, db, validate
from appliance.registry.errors import APIError
from appliance.registry.peers import path_key

bp = Blueprint("gateway", __name__, url_prefix="/v1/gateway")

MAX_CHANGES = 1000


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
