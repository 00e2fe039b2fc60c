"""POST /v1/gateway/lookup: several gateway lookups in one request and one query."""

from __future__ import annotations

import urllib.parse

from appliance.registry.limits import MAX_LOOKUP_KEYS
from appliance.registry.store import open_store
from tests.registry.conftest import make_token, new_key


def add(client, admin, tenant: str, key: str, n: int) -> None:
    r = client.post("/v1/peers", json={"tenant": tenant, "public_key": key,
                                       "allowed_ips": [f"198.18.{n // 250}.{n % 250 + 1}/32"]},
                    headers=admin)
    assert r.status_code == 201, r.json


def test_each_key_gets_the_answer_of_its_single_lookup(client, admin, gateway, tenant):
    keys = [new_key() for _ in range(6)]
    for n, k in enumerate(keys):
        add(client, admin, tenant, k, n)
    revoked = keys[0]
    assert client.post(f"/v1/peers/{urllib.parse.quote(revoked, safe='')}/revoke",
                       headers=admin).status_code == 200
    unknown = new_key()
    # URL-safe spelling and a duplicate: answered once, under the canonical key.
    urlsafe = keys[1].replace("+", "-").replace("/", "_")
    asked = [revoked, urlsafe, *keys[2:], unknown, keys[2]]
    r = client.post("/v1/gateway/lookup", json={"keys": asked}, headers=gateway)
    assert r.status_code == 200, r.json
    assert sorted(r.json["not_found"]) == sorted([revoked, unknown])
    found = {p["public_key"]: p for p in r.json["peers"]}
    assert sorted(found) == sorted(keys[1:])
    for k in keys[1:]:
        single = client.get(f"/v1/gateway/peers/{urllib.parse.quote(k, safe='')}",
                            headers=gateway)
        assert single.status_code == 200 and single.json == found[k]
    assert single.json["allowed_ips"] == ["198.18.0.6/32"]


def test_a_tenant_token_finds_only_its_own_tenants_keys(client, admin, db, tenant):
    assert client.post("/v1/tenants", json={"name": "other"}, headers=admin).status_code == 201
    mine, theirs = new_key(), new_key()
    add(client, admin, tenant, mine, 1)
    add(client, admin, "other", theirs, 2)
    # Only admin tokens take a tenant; the route answers them as it answers gateways.
    scoped = {"Authorization": f"Bearer {make_token(db, 'admin', tenant)}"}
    r = client.post("/v1/gateway/lookup", json={"keys": [mine, theirs]}, headers=scoped)
    assert r.status_code == 200
    assert [p["public_key"] for p in r.json["peers"]] == [mine]
    assert r.json["not_found"] == [theirs]


def test_bad_requests_get_json_errors_naming_the_field(client, gateway, tenant):
    def post(body, **kw):
        return client.post("/v1/gateway/lookup", json=body, headers=gateway, **kw)

    too_many = [new_key() for _ in range(MAX_LOOKUP_KEYS + 1)]
    r = post({"keys": too_many})
    assert r.status_code == 413 and r.json["error"] == "too_many_keys"
    assert r.json["limit"] == MAX_LOOKUP_KEYS
    assert post({"keys": too_many[:MAX_LOOKUP_KEYS]}).status_code == 200
    for body, field in (({"keys": []}, "keys"), ({"keys": "x"}, "keys"), ({}, "keys"),
                        ({"keys": [new_key(), "nope"]}, "keys[1]"),
                        ({"keys": [new_key()], "extra": 1}, "extra")):
        r = post(body)
        assert r.status_code == 400 and r.json["field"] == field, (body, r.json)
    r = client.post("/v1/gateway/lookup", data="keys", headers=gateway)
    assert r.status_code == 415 and r.json["error"] == "unsupported_media_type"
    assert client.post("/v1/gateway/lookup", json={"keys": [new_key()]}).status_code == 401


def test_the_store_answers_many_keys_in_one_call(db, client, admin, tenant):
    keys = [new_key() for _ in range(300)]
    for n, k in enumerate(keys):
        add(client, admin, tenant, k, n)
    st = open_store(db)
    try:
        asked = keys[::2] + [new_key() for _ in range(10)]
        found = st.gateway_lookup_many(asked, None)
        assert sorted(found) == sorted(keys[::2])
        assert all(found[k] == st.gateway_lookup(k, None) for k in keys[:20:2])
        assert st.gateway_lookup_many([], None) == {}
    finally:
        st.close()
