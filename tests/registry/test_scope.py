"""A tenant-limited token learns nothing about other tenants: their objects answer
exactly as made-up ones do, and its feed's bounds are its own tenant's."""

from __future__ import annotations

import urllib.parse

import pytest

from tests.conftest import make_token
from tests.registry.conftest import new_key


def q(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def add_peer(client, headers, tenant, ip):
    key = new_key()
    r = client.post("/v1/peers", headers=headers,
                    json={"tenant": tenant, "public_key": key, "allowed_ips": [ip]})
    assert r.status_code == 201, r.json
    return key


@pytest.fixture
def two_tenants(client, admin, db):
    for name in ("acme", "other"):
        assert client.post("/v1/tenants", json={"name": name}, headers=admin).status_code == 201
    mine = add_peer(client, admin, "acme", "198.18.0.2/32")
    theirs = add_peer(client, admin, "other", "198.18.0.3/32")
    lim = {"Authorization": f"Bearer {make_token(db, 'admin', 'acme')}"}
    return mine, theirs, lim


def same_answer(a, b, a_name: str, b_name: str) -> None:
    assert a.status_code == b.status_code
    assert a.get_data(as_text=True).replace(a_name, "NAME") \
        == b.get_data(as_text=True).replace(b_name, "NAME")


@pytest.mark.parametrize("method,suffix,body", [
    ("get", "", None), ("patch", "", {"name": "x"}), ("delete", "", None),
    ("post", "/revoke", None), ("post", "/restore", None),
])
def test_other_tenants_peers_look_like_no_peer(client, two_tenants, method, suffix, body):
    _mine, theirs, lim = two_tenants
    nobody = new_key()
    hidden = getattr(client, method)(f"/v1/peers/{q(theirs)}{suffix}", json=body, headers=lim)
    absent = getattr(client, method)(f"/v1/peers/{q(nobody)}{suffix}", json=body, headers=lim)
    assert hidden.status_code == 404
    same_answer(hidden, absent, theirs, nobody)


def test_other_tenants_look_like_no_tenant(client, admin, two_tenants):
    *_, lim = two_tenants
    for method in ("get", "delete"):
        hidden = getattr(client, method)("/v1/tenants/other", headers=lim)
        absent = getattr(client, method)("/v1/tenants/nosuch", headers=lim)
        assert hidden.status_code == 404
        same_answer(hidden, absent, "other", "nosuch")
    hidden = client.get("/v1/peers", query_string={"tenant": "other"}, headers=lim)
    absent = client.get("/v1/peers", query_string={"tenant": "nosuch"}, headers=lim)
    assert hidden.status_code == 400 and hidden.json["field"] == "tenant"
    same_answer(hidden, absent, "other", "nosuch")
    own = client.get("/v1/peers", query_string={"tenant": "acme", "limit": 5}, headers=lim)
    assert own.status_code == 200 and [p["tenant"] for p in own.json["peers"]] == ["acme"]
    body = {"public_key": new_key(), "allowed_ips": ["198.18.9.0/24"]}
    hidden = client.post("/v1/peers", json=body | {"tenant": "other"}, headers=lim)
    absent = client.post("/v1/peers", json=body | {"tenant": "nosuch"}, headers=lim)
    same_answer(hidden, absent, "other", "nosuch")
    # The unlimited admin still sees it all.
    assert client.get("/v1/tenants/other", headers=admin).status_code == 200


def test_feed_bounds_are_the_tenants_own(client, admin, db, two_tenants):
    mine, _theirs, gw_acme = two_tenants  # (gateway tokens limited to tenants: issue 12)
    gw_all = {"Authorization": f"Bearer {make_token(db, 'gateway')}"}
    # Other tenants' activity: it must not move what the acme token sees.
    for i in range(5):
        add_peer(client, admin, "other", f"198.18.1.{i}/32")

    def feed(h, since=0):
        return client.get("/v1/gateway/changes", query_string={"since": since}, headers=h).json

    full, scoped = feed(gw_all), feed(gw_acme)
    assert full["latest"] == 7 and full["earliest"] == 1
    assert [c["public_key"] for c in scoped["changes"]] == [mine]
    assert (scoped["earliest"], scoped["latest"], scoped["cursor"]) == (1, 1, 1)
    salt = "00" * 16
    keys = client.get("/v1/gateway/keys", query_string={"salt": salt}, headers=gw_acme).json
    assert keys["cursor"] == 1 and keys["count"] == 1
    # A gateway following from its scoped cursor sees its tenant's next change,
    # with no gap or reset by the rules in appliance/gateway/feed.py.
    assert client.post(f"/v1/peers/{q(mine)}/revoke", headers=admin).status_code == 200
    page = feed(gw_acme, since=scoped["cursor"])
    assert [(c["op"], c["cursor"]) for c in page["changes"]] == [("revoke", 8)]
    assert page["earliest"] <= scoped["cursor"] + 1 and page["latest"] >= scoped["cursor"]
    assert page["latest"] == page["cursor"] == 8



def test_a_tenant_admin_gets_no_digest_of_another_tenants_change(client, admin, two_tenants):
    """The digests' anchors stay within the tenant too: a tenant-limited token
    cannot have another tenant's change confirmed by its digest (a gateway's pool,
    which follows the whole feed's cursor, can: test_gateway_pools.py)."""
    mine, theirs, lim = two_tenants
    every = client.get("/v1/gateway/changes", headers=admin).json["changes"]
    own, other = (next(c for c in every if c["public_key"] == k) for k in (mine, theirs))

    def feed(since: int, digest: str | None = None):
        query = {"since": since} | ({"digest": digest} if digest else {})
        return client.get("/v1/gateway/changes", query_string=query, headers=lim)

    page = feed(0).json
    assert page["cursor"] == page["latest"] == own["cursor"]
    assert page["cursor_digest"] == page["latest_digest"] == own["digest"]
    assert feed(own["cursor"], own["digest"]).status_code == 200
    assert feed(other["cursor"]).json["since_digest"] is None
    r = feed(other["cursor"], other["digest"])
    assert r.status_code == 409 and r.json["error"] == "cursor_mismatch"
    assert (r.json["latest"], r.json["latest_digest"]) == (own["cursor"], own["digest"])


def test_scoped_feed_bounds_use_the_index(db, engine, store):
    if engine != "sqlite":
        # PostgreSQL plans a tiny table as a scan whatever its indexes; the
        # index's existence is what the migration promises.
        import psycopg

        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT to_regclass('changes_tenant')").fetchone()[0]
        return
    plan = " ".join(r[-1] for r in store.conn().execute(
        "EXPLAIN QUERY PLAN SELECT min(cursor), max(cursor) FROM changes"
        " WHERE 1 AND tenant IN ('acme')"))
    assert "changes_tenant" in plan
