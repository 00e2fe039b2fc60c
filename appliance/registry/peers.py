"""/v1/peers: the admin API for peers (create, list, show, update, revoke, delete).

A public key in a path may be standard base64 (percent-encoded) or URL-safe.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request, url_for

from appliance.registry import auth, store, validate
from appliance.registry.errors import APIError, invalid

bp = Blueprint("peers", __name__, url_prefix="/v1/peers")

MAX_PAGE = 1000


def path_key(raw: str) -> str:
    try:
        return validate.key(raw, "public_key")
    except APIError as e:
        raise APIError(404, "not_found", f"no peer with key {raw!r}: {e.message}") from e


def _not_found(key: str) -> APIError:
    return APIError(404, "not_found", f"no peer with key {key}")


def _public(peer: dict) -> dict:
    return {k: v for k, v in peer.items() if k != "tenant_id"}


def _load(key: str) -> dict:
    peer = store.current().get_peer(key)
    if peer is None:
        raise _not_found(key)
    auth.check_tenant(peer["tenant_id"], _not_found(key))
    return peer


def _optional_psk(body: dict) -> str | None:
    return validate.preshared_key(body.get("preshared_key"))


@bp.post("")
@auth.require("admin")
def create():
    body = validate.json_body()
    validate.reject_unknown(body, {"tenant", "public_key", "allowed_ips", "name", "preshared_key"})
    tenant = validate.name(body.get("tenant"), "tenant", required=True)
    key = validate.public_key(body.get("public_key"))
    nets = validate.allowed_ips(body.get("allowed_ips"))
    name = validate.name(body.get("name"))
    psk = _optional_psk(body)
    db = store.current()
    tid = db.tenant_id(tenant)
    limit = auth.tenant_limit()
    if tid is None or (limit is not None and limit != tid):
        raise invalid("tenant", f"no tenant {tenant!r}")
    try:
        db.create_peer(tenant, key, nets, name, psk)
    except store.Conflict as e:
        raise APIError(409, e.error, e.message) from e
    except LookupError as e:  # the tenant vanished between the check and the write
        raise invalid("tenant", f"no tenant {tenant!r}") from e
    peer = _public(db.get_peer(key))
    resp = jsonify(peer)
    resp.status_code = 201
    resp.headers["Location"] = url_for("peers.show", key=key.replace("/", "_").replace("+", "-"))
    return resp


@bp.get("")
@auth.require("admin")
def list_():
    """Keyset pagination: `after` is the opaque cursor from the previous page."""
    db = store.current()
    limit = validate.int_arg("limit", 100, 1, MAX_PAGE)
    after = validate.int_arg("after", 0, 0, 2**62)
    tenant_ids = []
    tenant = request.args.get("tenant")
    if tenant is not None:
        tid = db.tenant_id(tenant)
        scope = auth.tenant_limit()
        # Another tenant's name is as unknown to a limited token as a made-up one.
        if tid is None or (scope is not None and scope != tid):
            raise invalid("tenant", f"no tenant {tenant!r}")
        tenant_ids.append(tid)
    if auth.tenant_limit() is not None:
        tenant_ids.append(auth.tenant_limit())
    revoked = request.args.get("revoked")
    if revoked is not None and revoked not in ("true", "false"):
        raise invalid("revoked", "must be true or false")
    rows, next_after = db.list_peers(after, limit, tenant_ids,
                                     None if revoked is None else revoked == "true")
    return jsonify(peers=[_public(r) for r in rows],
                   next=None if next_after is None else str(next_after))


@bp.get("/<wgkey:key>")
@auth.require("admin")
def show(key: str):
    return jsonify(_public(_load(path_key(key))))


@bp.patch("/<wgkey:key>")
@auth.require("admin")
def update(key: str):
    key = path_key(key)
    peer = _load(key)
    body = validate.json_body()
    validate.reject_unknown(body, {"allowed_ips", "name", "preshared_key"})
    if not body:
        raise APIError(400, "invalid_json", "nothing to update")
    kwargs: dict = {"nets": None}
    if "allowed_ips" in body:
        kwargs["nets"] = validate.allowed_ips(body["allowed_ips"])
    if "name" in body:
        kwargs["name"] = validate.name(body["name"])
    if "preshared_key" in body:
        kwargs["preshared_key"] = _optional_psk(body)
    db = store.current()
    try:
        db.update_peer(key, expect_tenant=peer["tenant_id"], **kwargs)
    except store.Conflict as e:
        raise APIError(409, e.error, e.message) from e
    except LookupError as e:
        raise _not_found(key) from e
    return jsonify(_public(db.get_peer(key)))


def _set_revoked(key: str, revoked: bool):
    key = path_key(key)
    peer = _load(key)
    try:
        store.current().set_revoked(key, revoked, expect_tenant=peer["tenant_id"])
    except LookupError as e:
        raise _not_found(key) from e
    return jsonify(_public(store.current().get_peer(key)))


@bp.post("/<wgkey:key>/revoke")
@auth.require("admin")
def revoke(key: str):
    return _set_revoked(key, True)


@bp.post("/<wgkey:key>/restore")
@auth.require("admin")
def restore(key: str):
    return _set_revoked(key, False)


@bp.delete("/<wgkey:key>")
@auth.require("admin")
def delete(key: str):
    key = path_key(key)
    peer = _load(key)
    try:
        store.current().delete_peer(key, expect_tenant=peer["tenant_id"])
    except LookupError as e:
        raise _not_found(key) from e
    return "", 204
