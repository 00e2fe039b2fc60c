"""/v1/tenants: the groups peers belong to; allowed IPs are unique across tenants."""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance.registry import auth, store, validate
from appliance.registry.errors import APIError

bp = Blueprint("tenants", __name__, url_prefix="/v1/tenants")


def _tenant(row: dict) -> dict:
    return {"name": row["name"], "created_at": row["created_at"], "peers": row["peers"]}


@bp.post("")
@auth.require("admin")
def create():
    if auth.tenant_limit() is not None:
        raise APIError(403, "forbidden", "a tenant-limited token cannot create tenants")
    body = validate.json_body()
    validate.reject_unknown(body, {"name"})
    name = validate.tenant_name(body.get("name"))
    try:
        tenant = store.current().create_tenant(name)
    except store.Conflict as e:
        raise APIError(409, e.error, e.message) from e
    return jsonify(tenant), 201


@bp.get("")
@auth.require("admin")
def list_():
    return jsonify(tenants=[_tenant(r) for r in store.current().list_tenants(auth.tenant_limit())])


def _missing(name: str) -> APIError:
    return APIError(404, "not_found", f"no tenant {name!r}")


def _get(name: str) -> dict:
    row = store.current().get_tenant(name)
    if row is None:
        raise _missing(name)
    auth.check_tenant(row["id"], _missing(name))
    return row


@bp.get("/<name>")
@auth.require("admin")
def show(name: str):
    return jsonify(_tenant(_get(name)))


@bp.delete("/<name>")
@auth.require("admin")
def delete(name: str):
    _get(name)
    try:
        store.current().delete_tenant(name)
    except store.Conflict as e:
        raise APIError(409, e.error, e.message) from e
    except LookupError as e:
        raise _missing(name) from e
    return "", 204
