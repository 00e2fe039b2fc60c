"""/v1/gateway: what a gateway pulls. Read-only; a gateway token can do nothing else.

`GET /v1/gateway/peers/{key}` answers exactly what a gateway needs to install a
peer, and 404 for a key that is unknown or revoked (the gateway caches both).
`GET /v1/gateway/changes?since=CURSOR` is the change feed gateways poll to drop
revoked peers and update changed ones.
`GET /v1/gateway/keys?salt=HEX` is a compact snapshot of the active keys (salted
4-byte digests) from which a gateway builds its known-key filter, kept current
by the change feed from the cursor it names.

A gateway token limited to a pool of tenants (and a tenant-limited admin token)
sees only those tenants here: another tenant's key is "not found" like an
unknown one, and its changes and keys are left out.
"""

from __future__ import annotations

import base64
import hashlib

from flask import Blueprint, jsonify, request

from appliance.registry import auth, store, validate
from appliance.registry.errors import APIError, invalid
from appliance.registry.peers import path_key

bp = Blueprint("gateway", __name__, url_prefix="/v1/gateway")

MAX_CHANGES = 1000
KEY_DIGEST_SIZE = 4  # bytes per key in /keys: 4 MB for 1M keys
SALT_SIZE = 16


@bp.get("/peers/<wgkey:key>")
@auth.require("gateway", "admin")
def peer(key: str):
    found = store.current().gateway_lookup(path_key(key), auth.visible_tenants())
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
    return jsonify(store.current().changes(since, limit, auth.visible_tenants()))


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
    st = store.current()
    cursor, keys = st.active_keys(auth.visible_tenants())
    digests = sorted({key_digest(salt, base64.b64decode(k)) for k in keys})
    return jsonify(digest_size=KEY_DIGEST_SIZE, count=len(digests), cursor=cursor,
                   feed_id=st.feed_id(),
                   digests=base64.b64encode(b"".join(digests)).decode())
