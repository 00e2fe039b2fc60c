"""GET /v1/gateway/keys: the snapshot a gateway builds its known-key filter from."""

from __future__ import annotations

import base64
import secrets
import urllib.parse

from appliance.gateway.keyfilter import KnownKeys, load_filter
from appliance.keys import decode_key
from appliance.registry.gateway import key_digest
from appliance.registry.keysnapshot import salted_digests
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


def test_snapshot_reuses_the_keys_read_while_the_feed_stands_still(
        client, app, admin, gateway, tenant, monkeypatch):
    """Each worker keeps the raw active keys per feed position (keysnapshot.py): a
    second gateway's request at the same position reads no keys; a create or a
    revoke moves the position, and the next snapshot has it."""
    keys = [new_key() for _ in range(5)]
    for k in keys:
        add(client, admin, k)
    st = app.extensions["wgjit_store"]
    reads = []
    real = type(st).active_keys
    monkeypatch.setattr(type(st), "active_keys",
                        lambda self, *a: reads.append(1) or real(self, *a))

    def digests(salt: bytes) -> set[bytes]:
        r = client.get("/v1/gateway/keys", query_string={"salt": salt.hex()}, headers=gateway)
        assert r.status_code == 200, r.json
        raw = base64.b64decode(r.json["digests"])
        assert r.json["count"] * 4 == len(raw)
        return {raw[i:i + 4] for i in range(0, len(raw), 4)}

    def expected(salt: bytes, active: list[str]) -> set[bytes]:
        return {key_digest(salt, decode_key(k)) for k in active}

    a, b = secrets.token_bytes(16), secrets.token_bytes(16)
    assert digests(a) == expected(a, keys) and len(reads) == 1
    assert digests(b) == expected(b, keys) and len(reads) == 1  # another gateway: cached
    late = new_key()
    add(client, admin, late)
    assert digests(b) == expected(b, keys + [late]) and len(reads) == 2
    q = urllib.parse.quote(keys[0], safe="")
    assert client.post(f"/v1/peers/{q}/revoke", headers=admin).status_code == 200
    assert digests(a) == expected(a, keys[1:] + [late]) and len(reads) == 3
    assert digests(a) == expected(a, keys[1:] + [late]) and len(reads) == 3


def test_salted_digests_match_the_digest_of_each_key() -> None:
    raw = [secrets.token_bytes(32) for _ in range(300)]
    salt = secrets.token_bytes(16)
    out = salted_digests(salt, b"".join(raw + raw[:10]), 4)  # duplicates count once
    assert out == b"".join(sorted({key_digest(salt, k) for k in raw}))
