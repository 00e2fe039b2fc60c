"""/v1/tenants: the groups peers belong to; allowed IPs are unique per tenant."""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance.registry import auth, db, model, validate
from appliance.registry.errors import APIError

bp = Blueprint("tenants", __name__, url_prefix="/v1/tenants")


def _tenant(row) -> dict:
    return {"name": row["name"], "created_at": row["created_at"], "peers": row["peers"]}


_SELECT = (
    "SELECT t.id, t.name, t.created_at,"
    " (SELECT count(*) FROM peers p WHERE p.tenant_id = t.id) AS peers FROM tenants t"
)


@bp.post("")
@auth.require("admin")
def create():
    if auth.tenant_limit() is not None:
        raise APIError(403, "forbidden", "a tenant-limited token cannot create tenants")
    body = validate.json_body()
    validate.reject_unknown(body, {"name"})
    name = validate.name(body.get("name"), "name", required=True)
    try:
        tenant = model.create_tenant(db.get_db(), name)
    except model.Conflict as e:
        raise APIError(409, e.error, e.message) from e
    return jsonify(tenant), 201


@bp.get("")
@auth.require("admin")
def list_():
    conn = db.get_db()
    limit = auth.tenant_limit()
    if limit is None:
        rows = conn.execute(_SELECT + " ORDER BY t.name").fetchall()
    else:
        rows = conn.execute(_SELECT + " WHERE t.id = ?", (limit,)).fetchall()
    return jsonify(tenants=[_tenant(r) for r in rows])


def _get(name: str):
    row = db.get_db().execute(_SELECT + " WHERE t.name = ?", (name,)).fetchone()
    if row is None:
        raise APIError(404, "not_found", f"no tenant {name!r}")
    auth.check_tenant(row["id"])
    return row


@bp.get("/<name>")
@auth.require("admin")
def show(name: str):
    return jsonify(_tenant(_get(name)))


@bp.delete("/<name>")
@auth.require("admin")
def delete(name: str):
    row = _get(name)
    if row["peers"]:
        raise APIError(409, "tenant_not_empty",
                       f"tenant {name!r} still has {row['peers']} peers; delete them first")
    conn = db.get_db()
    with db.write(conn):
        if conn.execute("SELECT 1 FROM tokens WHERE tenant_id = ?", (row["id"],)).fetchone():
            raise APIError(409, "tenant_has_tokens",
                           f"tenant {name!r} still has tokens limited to it")
        conn.execute("DELETE FROM tenants WHERE id = ?", (row["id"],))
    return "", 204
