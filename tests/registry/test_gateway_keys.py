"""GET /v1/gateway/keys: the snapshot a gateway builds its known-key filter from."""

from __future__ import annotations

import base64
import secrets
import urllib.parse

from appliance.gateway.keyfilter import KnownKeys, load_filter
from appliance.keys import decode_key
from tests.registry.conftest import new_key


def add(client, admin, key: str) -> None:
    add.n = getattr(add, "n", 0) + 1
    ip = f"198.18.{add.n // 250}.{add.n % 250 + 1}/32"  # allowed IPs may not overlap
    r = client.post("/v1/peers", json={"tenant": "acme", "public_key": key,
                                       "allowed_ips": [ip]}, headers=admin)
    assert r.status_code == 201, r.json


def test_snapshot_holds_the_active_keys_salted_and_the_feed_keeps_it_current(
        client, admin, gateway, tenant):
    keys = [new_key() for _ in range(20)]
    for k in keys:
        add(client, admin, k)
    q = urllib.parse.quote(keys[0], safe="")
    assert client.post(f"/v1/peers/{q}/revoke", headers=admin).status_code == 200

    known = KnownKeys()

    def fetch(salt: bytes) -> dict:
        r = client.get("/v1/gateway/keys", query_string={"salt": salt.hex()}, headers=gateway)
        assert r.status_code == 200, r.json
        return r.json

    def changes(since: int) -> dict:
        return client.get(f"/v1/gateway/changes?since={since}", headers=gateway).json

    snapshot = fetch(known.salt)
    assert snapshot["count"] == 19 and len(base64.b64decode(snapshot["digests"])) == 19 * 4
    assert snapshot["cursor"] == changes(0)["latest"]
    raw = base64.b64decode(snapshot["digests"])
    assert [raw[i:i + 4] for i in range(0, len(raw), 4)] == \
        sorted(raw[i:i + 4] for i in range(0, len(raw), 4))
    # Another salt, other digests: nobody without ours can aim at them.
    assert fetch(secrets.token_bytes(16))["digests"] != snapshot["digests"]

    load_filter(known, fetch, changes)
    assert all(known.knows(decode_key(k)) for k in keys[1:])
    assert known.knows(decode_key(keys[0])) is False  # revoked
    strangers = [decode_key(new_key()) for _ in range(2000)]
    assert sum(bool(known.knows(k)) for k in strangers) <= 1  # ~19/2^32 each

    # A key created after the snapshot: the feed's changes from its cursor add it.
    late = new_key()
    add(client, admin, late)
    assert known.knows(decode_key(late)) is False
    known.add(changes(snapshot["cursor"])["changes"][-1]["public_key"])
    assert known.knows(decode_key(late)) is True


def test_snapshot_refuses_a_bad_salt_and_a_client_token(client, admin, gateway, tenant):
    for salt in ("", "zz" * 16, "00" * 15):
        r = client.get("/v1/gateway/keys", query_string={"salt": salt}, headers=gateway)
        assert r.status_code == 400 and r.json["field"] == "salt"
    r = client.get("/v1/gateway/keys", query_string={"salt": "00" * 16})
    assert r.status_code == 401


def test_an_unloaded_filter_answers_none() -> None:
    assert KnownKeys().knows(bytes(32)) is None
