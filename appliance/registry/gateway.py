"""/v1/gateway: what a gateway pulls. Read-only; a gateway token can do nothing else.

`GET /v1/gateway/peers/{key}` answers exactly what a gateway needs to install a
peer, and 404 for a key that is unknown or revoked (the gateway caches both).
`POST /v1/gateway/lookup` answers up to MAX_LOOKUP_KEYS keys in one request and
one query: the same answer as that many single lookups, so a gateway facing a
herd spends one of its rate-limit tokens on a whole batch (gateway/batch.py).
`GET /v1/gateway/changes?since=CURSOR` is the change feed gateways poll to drop
revoked peers and update changed ones.
`GET /v1/gateway/keys?salt=HEX` is a compact snapshot of the active keys (salted
4-byte digests) from which a gateway builds its known-key filter, kept current
by the change feed from the cursor it names.

A gateway token limited to a pool of tenants (and a tenant-limited admin token)
sees only those tenants here: another tenant's key is "not found" like an
unknown one, on the single and the batch lookup alike, and its changes and keys
are left out. A pool's feed cursor moves past the changes it is not shown (its
`cursor_digest` is then the digest of another tenant's change: the one stored
at that cursor); a tenant admin's cursor, earliest and latest stay within its
tenant (store.Store.changes).
"""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Blueprint, jsonify, request

from appliance.registry import auth, store, validate
from appliance.registry.errors import APIError, invalid
from appliance.registry.keysnapshot import KeySnapshots, salted_digests
from appliance.registry.limits import MAX_LOOKUP_KEYS
from appliance.registry.peers import path_key

bp = Blueprint("gateway", __name__, url_prefix="/v1/gateway")

MAX_CHANGES = 1000
KEY_DIGEST_SIZE = 4  # bytes per key in /keys: 4 MB for 1M keys
SALT_SIZE = 16
DIGEST_RE = re.compile(r"[0-9a-f]{16}")  # store.shared.change_digest
SNAPSHOTS = KeySnapshots()  # this worker's raw active keys per feed position


@bp.get("/peers/<wgkey:key>")
@auth.require("gateway", "admin")
def peer(key: str):
    found = store.current().gateway_lookup(path_key(key), auth.visible_tenants())
    if found is None:
        raise APIError(404, "not_found", "no active peer with this key")
    return jsonify(found)


@bp.post("/lookup")
@auth.require("gateway", "admin")
def lookup():
    """{"keys": [...]} -> {"peers": [GatewayPeer...], "not_found": [key...]}.

    Keys are answered in their canonical (standard base64) form; a key outside
    the token's tenants (a gateway's pool), unknown or revoked is not found, as
    on the single route.
    """
    body = validate.json_body()
    validate.reject_unknown(body, {"keys"})
    raw = body.get("keys")
    if not isinstance(raw, list) or not raw:
        raise invalid("keys", "must be a non-empty list of public keys")
    if len(raw) > MAX_LOOKUP_KEYS:
        raise APIError(413, "too_many_keys",
                       f"keys: at most {MAX_LOOKUP_KEYS} per request, got {len(raw)}",
                       field="keys", limit=MAX_LOOKUP_KEYS)
    keys = list(dict.fromkeys(validate.key(k, f"keys[{i}]") for i, k in enumerate(raw)))
    found = store.current().gateway_lookup_many(keys, auth.visible_tenants())
    return jsonify(peers=[found[k] for k in keys if k in found],
                   not_found=[k for k in keys if k not in found])


@bp.get("/changes")
@auth.require("gateway", "admin")
def changes():
    """Changes after `since`, oldest first.

    `cursor` is where to continue; `feed_id` changes when the database was
    replaced, and `earliest` is the oldest cursor still kept: a gateway whose
    cursor is older, or whose feed_id differs, must reconcile in full.
    Each change carries a `digest`; a follower that sends the one of the change
    at its cursor (`digest`, the page's `cursor_digest`) gets 409 cursor_mismatch
    when a different change now holds that number. Without `digest` nothing is
    checked, as before (older gateways).
    """
    since = validate.int_arg("since", 0, 0, 2**62)
    limit = validate.int_arg("limit", MAX_CHANGES, 1, MAX_CHANGES)
    digest = request.args.get("digest")
    if digest is not None and not DIGEST_RE.fullmatch(digest):
        raise invalid("digest", "must be the 16 hex digits of a change's `digest`")
    page = store.current().changes(since, limit, auth.visible_tenants(),
                                   auth.hides_activity())
    if digest is not None and since > 0 and page["since_digest"] != digest:
        # The change this follower applied at `since` is not the one stored
        # there now (a restored backup or a lost commit reused the number):
        # its position means nothing, and the changes after it may skip ones
        # it never saw. It must check what it holds against the registry.
        raise APIError(409, "cursor_mismatch",
                       f"the change at cursor {since} is not the one this digest names;"
                       " reconcile in full and restart the feed from `latest`",
                       latest=page["latest"], latest_digest=page["latest_digest"])
    return jsonify(page)


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
    cursor, raw = SNAPSHOTS.raw_keys(st, auth.visible_tenants(),
                                      auth.hides_activity())  # cached per feed position
    digests = salted_digests(salt, raw, KEY_DIGEST_SIZE)
    return jsonify(digest_size=KEY_DIGEST_SIZE, count=len(digests) // KEY_DIGEST_SIZE,
                   cursor=cursor, feed_id=st.feed_id(),
                   digests=base64.b64encode(digests).decode())
