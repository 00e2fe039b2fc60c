"""/v1/gateway: what a gateway pulls. Read-only; a gateway token can do nothing else.

`GET /v1/gateway/peers/{key}` answers exactly what a gateway needs to install a
peer, and 404 for a key that is unknown or revoked (the gateway caches both).
`GET /v1/gateway/changes?since=CURSOR` is the change feed gateways poll to drop
revoked peers and update changed ones.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance.registry import auth, store, validate
from appliance.registry.errors import APIError
from appliance.registry.peers import path_key

bp = Blueprint("gateway", __name__, url_prefix="/v1/gateway")

MAX_CHANGES = 1000


@bp.get("/peers/<wgkey:key>")
@auth.require("gateway", "admin")
def peer(key: str):
    found = store.current().gateway_lookup(path_key(key), auth.tenant_limit())
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
    return jsonify(store.current().changes(since, limit, auth.tenant_limit()))
