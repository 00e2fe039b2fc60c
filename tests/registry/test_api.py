"""The registry API through Flask's test client, over a real SQLite file and a real
PostgreSQL database (the `db` fixture runs each test on both)."""

from __future__ import annotations

import base64
import sqlite3
import time
import urllib.parse

import pytest
from prometheus_client import REGISTRY

from appliance.registry import tokens
from appliance.registry.store import open_store
from tests.conftest import make_token
from tests.registry.conftest import new_key


def q(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def add_peer(client, headers, tenant="acme", ips=("198.18.0.2/32",), key=None, **extra):
    key = key or new_key()
    body = {"tenant": tenant, "public_key": key, "allowed_ips": list(ips), **extra}
    return key, client.post("/v1/peers", json=body, headers=headers)


def test_create_show_and_gateway_view(client, admin, gateway, tenant):
    psk = new_key()
    key, r = add_peer(client, admin, ips=["198.18.0.2/32", "fd00::2/128"], name="laptop",
                      preshared_key=psk)
    assert r.status_code == 201, r.json
    assert r.json["public_key"] == key and r.json["has_preshared_key"] is True
    assert "preshared_key" not in r.json  # the admin view never shows the secret
    shown = client.get(f"/v1/peers/{q(key)}", headers=admin).json
    assert shown["allowed_ips"] == ["198.18.0.2/32", "fd00::2/128"]
    assert shown["name"] == "laptop" and shown["revoked"] is False
    gw = client.get(f"/v1/gateway/peers/{q(key)}", headers=gateway)
    assert gw.status_code == 200
    assert gw.json["preshared_key"] == psk
    assert gw.json["allowed_ips"] == ["198.18.0.2/32", "fd00::2/128"]


@pytest.mark.parametrize("raw", [bytes([0xFB, 0xFF] * 16), bytes([0xFF, 0xFB] * 16)])
def test_key_in_path_urlsafe_and_standard(client, admin, gateway, tenant, raw):
    # Keys with '+' and '/' in their standard base64, one starting with '/'.
    key = base64.b64encode(raw).decode()
    assert "+" in key and "/" in key
    add_peer(client, admin, key=key)
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    for spelled in (q(key), urlsafe, key):
        r = client.get(f"/v1/gateway/peers/{spelled}", headers=gateway)
        assert r.status_code == 200 and r.json["public_key"] == key
        assert client.get(f"/v1/peers/{spelled}", headers=admin).status_code == 200


def test_revoked_and_unknown_are_404_for_gateways(client, admin, gateway, tenant):
    key, _ = add_peer(client, admin)
    assert client.post(f"/v1/peers/{q(key)}/revoke", headers=admin).json["revoked"] is True
    r = client.get(f"/v1/gateway/peers/{q(key)}", headers=gateway)
    assert r.status_code == 404 and r.json["error"] == "not_found"
    assert client.get(f"/v1/gateway/peers/{q(new_key())}", headers=gateway).status_code == 404
    assert client.post(f"/v1/peers/{q(key)}/restore", headers=admin).json["revoked"] is False
    assert client.get(f"/v1/gateway/peers/{q(key)}", headers=gateway).status_code == 200


def test_update_and_delete(client, admin, gateway, tenant):
    key, _ = add_peer(client, admin)
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": ["198.18.1.0/24"]},
                     headers=admin)
    assert r.status_code == 200 and r.json["allowed_ips"] == ["198.18.1.0/24"]
    # The old address is free again, the new range is taken.
    assert add_peer(client, admin, ips=["198.18.0.2/32"])[1].status_code == 201
    assert add_peer(client, admin, ips=["198.18.1.7/32"])[1].status_code == 409
    assert client.delete(f"/v1/peers/{q(key)}", headers=admin).status_code == 204
    assert client.get(f"/v1/peers/{q(key)}", headers=admin).status_code == 404
    assert add_peer(client, admin, ips=["198.18.1.7/32"])[1].status_code == 201


def test_tenants(client, admin, tenant):
    assert client.post("/v1/tenants", json={"name": "acme"}, headers=admin).status_code == 409
    add_peer(client, admin)
    listed = client.get("/v1/tenants", headers=admin).json["tenants"]
    assert listed == [{"name": "acme", "created_at": listed[0]["created_at"], "peers": 1}]
    r = client.delete("/v1/tenants/acme", headers=admin)
    assert r.status_code == 409 and r.json["error"] == "tenant_not_empty"
    client.post("/v1/tenants", json={"name": "empty"}, headers=admin)
    assert client.delete("/v1/tenants/empty", headers=admin).status_code == 204
    assert client.get("/v1/tenants/empty", headers=admin).status_code == 404


def test_same_ips_in_two_tenants_conflict(client, admin, tenant):
    # Every tenant's peers share each gateway's interface (tests/registry/test_isolation.py).
    client.post("/v1/tenants", json={"name": "other"}, headers=admin)
    assert add_peer(client, admin, "acme", ["198.18.0.0/24"])[1].status_code == 201
    r = add_peer(client, admin, "other", ["198.18.0.0/24"])[1]
    assert r.status_code == 409 and r.json["field"] == "allowed_ips"


@pytest.mark.parametrize("existing,new,clash", [
    ("198.18.0.0/24", "198.18.0.77/32", True),
    ("198.18.0.77/32", "198.18.0.0/24", True),
    ("198.18.0.0/24", "198.18.1.0/24", False),
    ("198.18.0.0/24", "198.18.0.0/16", True),
    ("fd00::/64", "fd00::1/128", True),
    ("fd00::/64", "fd00:0:0:1::/64", False),
    ("198.18.0.0/24", "fd00::/48", False),
    ("0.0.0.0/0", "203.0.113.9/32", True),
])
def test_overlap_detection(client, admin, tenant, existing, new, clash):
    assert add_peer(client, admin, ips=[existing], allow_broad=True)[1].status_code == 201
    # Neighbours on both sides, so the O(log n) search must pick the right one.
    add_peer(client, admin, ips=["198.19.255.0/24"])
    r = add_peer(client, admin, ips=[new])[1]
    if clash:
        assert r.status_code == 409 and r.json["error"] == "allowed_ip_overlap"
        assert existing in r.json["message"]
    else:
        assert r.status_code == 201, r.json


BAD_PEERS = [
    ({"public_key": "not base64!"}, 400, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 31).decode() + "=="}, 400, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 33).decode()}, 400, "public_key"),
    ({"public_key": 42}, 400, "public_key"),
    ({"allowed_ips": ["198.18.0.300/32"]}, 400, "allowed_ips[0]"),
    ({"allowed_ips": ["198.18.0.1/24"]}, 400, "allowed_ips[0]"),  # host bits set
    ({"allowed_ips": ["198.18.0.1"]}, 400, "allowed_ips[0]"),
    ({"allowed_ips": []}, 400, "allowed_ips"),
    ({"allowed_ips": "198.18.0.1/32"}, 400, "allowed_ips"),
    ({"allowed_ips": ["198.18.0.0/24", "198.18.0.5/32"]}, 400, "allowed_ips[1]"),
    ({"tenant": "nope"}, 400, "tenant"),
    ({"tenant": None}, 400, "tenant"),
    ({"name": "x" * 500}, 400, "name"),
    ({"preshared_key": "short"}, 400, "preshared_key"),
    ({"colour": "red"}, 400, "colour"),
]


@pytest.mark.parametrize("override,status,field", BAD_PEERS)
def test_bad_peer_input_names_the_field(client, admin, tenant, override, status, field):
    body = {"tenant": "acme", "public_key": new_key(), "allowed_ips": ["198.18.0.9/32"]}
    body.update(override)
    r = client.post("/v1/peers", json=body, headers=admin)
    assert r.status_code == status
    assert r.json["error"] == "invalid_field" and r.json["field"] == field


def test_duplicate_key_conflicts(client, admin, tenant):
    key, _ = add_peer(client, admin)
    r = add_peer(client, admin, key=key, ips=["198.18.5.0/24"])[1]
    assert r.status_code == 409 and r.json["error"] == "peer_exists"


def test_body_errors_are_json(client, admin, tenant):
    r = client.post("/v1/peers", data="tenant=acme", headers=admin,
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and r.json["error"] == "unsupported_media_type"
    r = client.post("/v1/peers", data="{not json", headers=admin, content_type="application/json")
    assert r.status_code == 400 and r.json["error"] == "invalid_json"
    r = client.post("/v1/peers", data="[1]", headers=admin, content_type="application/json")
    assert r.status_code == 400
    big = '{"name": "' + "x" * 100_000 + '"}'
    r = client.post("/v1/tenants", data=big, headers=admin, content_type="application/json")
    assert r.status_code == 413 and r.json["error"] == "body_too_large"


def test_404_405_are_json(client, admin):
    r = client.get("/v1/nothing-here", headers=admin)
    assert r.status_code == 404 and r.json["error"] == "not_found"
    r = client.put("/v1/tenants", headers=admin)
    assert r.status_code == 405 and r.json["error"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]
    assert client.get(f"/v1/peers/{q(new_key())}", headers=admin).status_code == 404
    r = client.get("/v1/peers/garbage", headers=admin)
    assert r.status_code == 404 and r.json["error"] == "not_found"


def test_500_is_json(app, client, admin, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app.extensions["wgjit_store"], "create_tenant", boom)
    r = client.post("/v1/tenants", json={"name": "x"}, headers=admin)
    assert r.status_code == 500 and r.json == {"error": "internal_error",
                                               "message": "internal server error"}


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer wgj_nope_nope",
                                    "Bearer garbage"])
def test_missing_or_invalid_token(client, header):
    headers = {"Authorization": header} if header else {}
    r = client.get("/v1/peers", headers=headers)
    assert r.status_code == 401 and r.json["error"] == "unauthorized"


def test_revoked_token(client, db, app, monkeypatch):
    from appliance.registry import auth

    store = app.extensions["wgjit_store"]
    tok = make_token(db, "admin")
    h = {"Authorization": f"Bearer {tok}"}
    assert client.get("/v1/peers", headers=h).status_code == 200
    assert tokens.revoke(store, tok.split("_")[1])
    # Verified tokens are remembered for VERIFIED_TTL; after that the revocation bites.
    later = time.monotonic() + auth.VERIFIED_TTL + 1
    monkeypatch.setattr(auth.time, "monotonic", lambda: later)
    assert client.get("/v1/peers", headers=h).status_code == 401
    # A revoked token never seen before is refused at once.
    tok2 = make_token(db, "admin")
    assert tokens.revoke(store, tok2.split("_")[1])
    assert client.get("/v1/peers", headers={"Authorization": f"Bearer {tok2}"}).status_code == 401


def test_token_with_right_id_wrong_secret(client, db, app):
    tok = make_token(db, "admin")
    forged = tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB")
    assert client.get("/v1/peers", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_gateway_token_cannot_write_or_list(client, admin, gateway, tenant):
    key, _ = add_peer(client, admin)
    for method, url, body in [
        ("post", "/v1/peers", {"tenant": "acme", "public_key": new_key(),
                               "allowed_ips": ["198.18.9.9/32"]}),
        ("post", "/v1/tenants", {"name": "evil"}),
        ("patch", f"/v1/peers/{q(key)}", {"name": "x"}),
        ("post", f"/v1/peers/{q(key)}/revoke", None),
        ("delete", f"/v1/peers/{q(key)}", None),
        ("get", "/v1/peers", None),
        ("get", "/v1/tenants", None),
    ]:
        r = getattr(client, method)(url, json=body, headers=gateway)
        assert r.status_code == 403, (method, url)
        assert r.json["error"] == "forbidden"
    assert client.get(f"/v1/peers/{q(key)}", headers=admin).json["revoked"] is False


def test_tenant_limited_admin(client, admin, db, tenant):
    client.post("/v1/tenants", json={"name": "other"}, headers=admin)
    mine, _ = add_peer(client, admin, "acme", ["198.18.0.2/32"])
    theirs, _ = add_peer(client, admin, "other", ["198.18.0.3/32"])
    lim = {"Authorization": f"Bearer {make_token(db, 'admin', 'acme')}"}
    assert [p["public_key"] for p in client.get("/v1/peers", headers=lim).json["peers"]] == [mine]
    assert [t["name"] for t in client.get("/v1/tenants", headers=lim).json["tenants"]] == ["acme"]
    assert client.get(f"/v1/peers/{q(theirs)}", headers=lim).status_code == 404
    assert client.post(f"/v1/peers/{q(theirs)}/revoke", headers=lim).status_code == 404
    assert client.delete(f"/v1/peers/{q(theirs)}", headers=lim).status_code == 404
    assert client.get("/v1/tenants/other", headers=lim).status_code == 404
    assert add_peer(client, lim, "other", ["198.18.7.0/24"])[1].status_code == 400
    assert add_peer(client, lim, "acme", ["198.18.7.0/24"])[1].status_code == 201
    assert client.post("/v1/tenants", json={"name": "x"}, headers=lim).status_code == 403
    assert client.get(f"/v1/peers/{q(theirs)}", headers=admin).json["revoked"] is False


def test_pagination_visits_every_peer_once(client, admin, tenant):
    keys = {add_peer(client, admin, ips=[f"198.18.{i // 250}.{i % 250}/32"])[0]
            for i in range(257)}
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 50} | ({"after": after} if after else {})
        page = client.get("/v1/peers", query_string=params, headers=admin).json
        seen += [p["public_key"] for p in page["peers"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert pages == 6 and len(seen) == 257 and set(seen) == keys
    r = client.get("/v1/peers", query_string={"limit": 0}, headers=admin)
    assert r.status_code == 400 and r.json["field"] == "limit"
    r = client.get("/v1/peers", query_string={"after": "x"}, headers=admin)
    assert r.status_code == 400 and r.json["field"] == "after"


def test_change_feed_orders_every_write(client, admin, gateway, tenant):
    k1, _ = add_peer(client, admin, ips=["198.18.0.1/32"])
    k2, _ = add_peer(client, admin, ips=["198.18.0.2/32"])
    client.patch(f"/v1/peers/{q(k1)}", json={"allowed_ips": ["198.18.0.9/32"]}, headers=admin)
    client.post(f"/v1/peers/{q(k2)}/revoke", headers=admin)
    client.post(f"/v1/peers/{q(k2)}/restore", headers=admin)
    client.delete(f"/v1/peers/{q(k1)}", headers=admin)
    feed = client.get("/v1/gateway/changes?since=0", headers=gateway).json
    ops = [(c["op"], c["public_key"]) for c in feed["changes"]]
    assert ops == [("create", k1), ("create", k2), ("update", k1), ("revoke", k2),
                   ("restore", k2), ("delete", k1)]
    cursors = [c["cursor"] for c in feed["changes"]]
    assert cursors == list(range(cursors[0], cursors[0] + 6))
    assert feed["cursor"] == cursors[-1] == feed["latest"] and feed["more"] is False
    assert len(feed["feed_id"]) == 16
    later = client.get(f"/v1/gateway/changes?since={cursors[2]}&limit=2", headers=gateway).json
    assert [c["cursor"] for c in later["changes"]] == cursors[3:5] and later["more"] is True
    empty = client.get(f"/v1/gateway/changes?since={feed['cursor']}", headers=gateway).json
    assert empty["changes"] == [] and empty["cursor"] == feed["cursor"]
    # A failed write leaves no trace in the feed.
    add_peer(client, admin, ips=["198.18.0.2/32"])
    after = client.get(f"/v1/gateway/changes?since={feed['cursor']}", headers=gateway).json
    assert after["changes"] == []


def test_healthz_openapi_metrics(app, client, admin, tenant):
    assert client.get("/healthz").json["status"] == "ok"
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    described = {(path, m) for path, item in spec["paths"].items() for m in item
                 if m != "parameters"}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<wgkey:key>", "{key}").replace("<name>", "{name}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in described, (path, method)
    add_peer(client, admin)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'wgjit_registry_peers{state="active"} 1.0' in text
    assert 'wgjit_registry_requests_total{method="POST",route="/v1/peers",status="201"}' in text


def test_migration_from_v1_keeps_data(db, engine):
    from appliance.registry import cidr

    store = open_store(db)
    assert store.migrate(target=1) == 1
    store.create_tenant("acme")
    key = new_key()
    store.create_peer("acme", key, [cidr.parse("198.18.0.1/32")], None, None)
    latest = store.migrate()
    assert latest == store.schema_version() >= 3
    assert store.get_peer(key)["allowed_ips"] == ["198.18.0.1/32"]
    assert len(store.feed_id()) == 16
    assert store.find_overlap(cidr.parse("198.18.0.0/24"))
    assert store.migrate() == latest  # idempotent
    if engine == "sqlite":
        conn = store.conn()
        # v3 rebuilt allowed_ips without its rowid; the rows came along, and the
        # range index (across tenants since v5) answers the overlap question.
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("SELECT rowid FROM allowed_ips")
        plan = " ".join(r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT hi FROM allowed_ips WHERE family = 4"
            " ORDER BY lo DESC LIMIT 1"))
        assert "allowed_ips_span" in plan
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    else:
        import psycopg

        with psycopg.connect(db) as conn:
            conn.execute("SET enable_seqscan = off")  # a tiny table would be scanned anyway
            plan = " ".join(r[0] for r in conn.execute(
                "EXPLAIN SELECT cidr FROM allowed_ips WHERE net <= '198.18.0.255/32'::cidr"
                " ORDER BY net DESC LIMIT 1"))
            indexes = {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'allowed_ips'")}
            foreign_keys = {r[0] for r in conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'allowed_ips'::regclass"
                " AND contype = 'f'")}
        # v7 replaced the GiST index with a btree that finds the predecessor.
        assert "Index Scan Backward using allowed_ips_span" in plan, plan
        assert "allowed_ips_net" not in indexes
        # The peer's foreign key stays (it cascades); the tenant's went in v7.
        assert foreign_keys == {"allowed_ips_peer_id_fkey"}
    store.delete_peer(key)  # the cascade survived the migrations
    assert store.find_overlap(cidr.parse("198.18.0.0/24")) is None
    store.close()


def test_engines_count_schema_versions_alike():
    from appliance.registry.store import postgres, sqlite

    assert len(sqlite.MIGRATIONS) == len(postgres.MIGRATIONS)


def test_newer_schema_is_refused(db, engine):
    store = open_store(db)
    store.migrate()
    newer = store.schema_version() + 1
    if engine == "sqlite":
        store.conn().execute(f"PRAGMA user_version = {newer}")
    else:
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE wgjit_schema SET version = %s", (newer,))
    with pytest.raises(RuntimeError, match="newer"):
        store.migrate()
    store.close()


def test_fast_path_answers_exactly_like_the_blueprint(app, client, admin, gateway, tenant):
    from appliance.registry.fastpath import GatewayLookupFastPath

    key, _ = add_peer(client, admin, ips=["198.18.0.2/32", "fd00::2/128"],
                      preshared_key=new_key())
    assert isinstance(app.wsgi_app, GatewayLookupFastPath)
    labels = {"method": "GET", "route": "/v1/gateway/peers/<wgkey:key>", "status": "200"}
    before = REGISTRY.get_sample_value("wgjit_registry_requests_total", labels) or 0
    fast = client.get(f"/v1/gateway/peers/{q(key)}", headers=gateway)
    flask_only = app.wsgi_app.next
    app.wsgi_app = flask_only  # the same request through Flask alone
    slow = client.get(f"/v1/gateway/peers/{q(key)}", headers=gateway)
    assert fast.status_code == slow.status_code == 200
    assert fast.json == slow.json
    assert fast.headers["Content-Type"] == slow.headers["Content-Type"]
    # Counted once by each path, under the same labels.
    assert REGISTRY.get_sample_value("wgjit_registry_requests_total", labels) == before + 2
