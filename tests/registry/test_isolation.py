"""Tenant isolation on shared gateways (issue 12): every tenant's peers sit on one
WireGuard interface per gateway, where an allowed IP goes to whichever peer set
it last and a broad network draws everyone's traffic. So the registry keeps
allowed IPs unique across tenants, refuses over-broad networks unless an
unlimited admin token allows them, and tells a tenant-limited token nothing
about what other tenants hold. On both engines, through the API, the store's
own bulk path and the import command."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from appliance.registry import cidr, importer
from appliance.registry.store import Conflict, NewPeer
from tests.conftest import WGJIT, make_token
from tests.registry.conftest import new_key

ACME_IP = "198.18.1.2/32"


def q(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def post(client, headers, tenant, ips, **extra):
    key = new_key()
    body = {"tenant": tenant, "public_key": key, "allowed_ips": list(ips), **extra}
    return key, client.post("/v1/peers", json=body, headers=headers)


@pytest.fixture
def two(client, admin, db, tenant):
    """acme holds ACME_IP; tenant evil exists; tokens limited to each."""
    assert client.post("/v1/tenants", json={"name": "evil"}, headers=admin).status_code == 201
    acme_key, r = post(client, admin, "acme", [ACME_IP, "fd00::1:2/128"])
    assert r.status_code == 201
    return {
        "acme_key": acme_key,
        "evil": {"Authorization": f"Bearer {make_token(db, 'admin', 'evil')}"},
        "acme": {"Authorization": f"Bearer {make_token(db, 'admin', 'acme')}"},
    }


@pytest.mark.parametrize("ips", [[ACME_IP], ["198.18.1.0/24"], ["198.18.0.0/16"],
                                 ["198.18.9.9/32", "fd00::1:0/112"]])
def test_another_tenants_network_is_refused_without_saying_whose(client, two, ips):
    _, r = post(client, two["evil"], "evil", ips)
    assert r.status_code == 409, r.json
    assert r.json["error"] == "allowed_ip_overlap" and r.json["field"] == "allowed_ips"
    assert "overlaps a network already registered" in r.json["message"]
    # Neither the holder's network, its key nor its tenant.
    for secret in (ACME_IP, "fd00::1:2/128", two["acme_key"], "acme", "another tenant"):
        assert secret not in r.json["message"].replace(ips[0], ""), r.json["message"]


def test_unlimited_admin_hears_who_holds_it(client, admin, two):
    _, r = post(client, admin, "evil", [ACME_IP])
    assert r.status_code == 409 and r.json["field"] == "allowed_ips"
    assert f"overlaps {ACME_IP} of another peer in another tenant" in r.json["message"]


def test_own_tenant_clash_is_named_for_a_limited_token(client, two):
    _, r = post(client, two["acme"], "acme", ["198.18.1.0/30"])
    assert r.status_code == 409
    assert f"overlaps {ACME_IP} of another peer in this tenant" in r.json["message"]


def test_update_into_another_tenants_network_is_refused(client, two):
    key, r = post(client, two["evil"], "evil", ["198.18.2.0/32"])
    assert r.status_code == 201
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": [ACME_IP]}, headers=two["evil"])
    assert r.status_code == 409 and r.json["field"] == "allowed_ips"
    assert ACME_IP not in r.json["message"].replace(f"allowed_ips: {ACME_IP} overlaps", "")
    assert client.get(f"/v1/peers/{q(key)}", headers=two["evil"]).json["allowed_ips"] == \
        ["198.18.2.0/32"]
    # Its own networks do not count against it.
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": ["198.18.2.0/31"]},
                     headers=two["evil"])
    assert r.status_code == 200, r.json


BROAD = [["0.0.0.0/0"], ["::/0"], ["0.0.0.0/1", "128.0.0.0/1"], ["198.18.0.0/15"],
         ["fd00::/8"], ["198.18.1.9/32", "fd00::/47"]]


@pytest.mark.parametrize("ips", BROAD)
def test_broad_networks_need_an_unlimited_admin(client, admin, two, ips):
    index = len(ips) - 1 if len(ips) == 2 and ips[0].endswith("/32") else 0
    _, r = post(client, two["evil"], "evil", ips)
    assert r.status_code == 400 and r.json["field"] == f"allowed_ips[{index}]", r.json
    assert "allow_broad" in r.json["message"]
    # A limited token may not allow it itself.
    _, r = post(client, two["evil"], "evil", ips, allow_broad=True)
    assert r.status_code == 403 and r.json["field"] == "allow_broad"
    # An unlimited admin must say so explicitly...
    _, r = post(client, admin, "evil", ips)
    assert r.status_code == 400 and r.json["field"] == f"allowed_ips[{index}]"
    # ...and then may (unless it overlaps, which the broad ones here mostly do).
    key, r = post(client, admin, "evil", ips, allow_broad=True)
    if any(cidr.overlaps(cidr.parse(a), cidr.parse(b)) for a in ips
           for b in (ACME_IP, "fd00::1:2/128")):
        assert r.status_code == 409
    else:
        assert r.status_code == 201, r.json


def test_the_limit_itself_is_allowed(client, two):
    assert post(client, two["evil"], "evil", ["198.19.0.0/16", "fd00:e::/48"])[1].status_code \
        == 201


def test_broad_update_and_bad_allow_broad(client, admin, two):
    key, r = post(client, two["evil"], "evil", ["198.18.3.0/24"])
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": ["::/0"]}, headers=two["evil"])
    assert r.status_code == 400 and r.json["field"] == "allowed_ips[0]"
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": ["fd00:f::/32"],
                                                  "allow_broad": True}, headers=two["evil"])
    assert r.status_code == 403 and r.json["field"] == "allow_broad"
    r = client.patch(f"/v1/peers/{q(key)}", json={"allowed_ips": ["fd00:f::/32"],
                                                  "allow_broad": True}, headers=admin)
    assert r.status_code == 200 and r.json["allowed_ips"] == ["fd00:f::/32"]
    _, r = post(client, admin, "evil", ["198.18.4.0/24"], allow_broad="yes")
    assert r.status_code == 400 and r.json["field"] == "allow_broad"


# The store itself (the bulk path the import uses, and update_peer).

def peer(*nets: str) -> NewPeer:
    return NewPeer(new_key(), [cidr.parse(n) for n in nets])


def test_bulk_import_refuses_another_tenants_network(store):
    store.create_tenant("acme")
    store.create_tenant("evil")
    store.bulk_create_peers("acme", [peer("198.18.0.4/30"), peer("198.18.1.0/24")])
    acme = store.tenant_id("acme")
    found = store.find_overlap(cidr.parse("198.18.1.7/32"))
    assert found is not None and found.cidr == "198.18.1.0/24" and found.tenant_id == acme
    # Inside the stored span (probed) and past its top (no clash, fast path).
    for clash in ("198.18.0.5/32", "198.18.1.128/25", "198.18.0.0/16"):
        with pytest.raises(Conflict) as e:
            store.bulk_create_peers("evil", [peer("198.19.7.1/32"), peer(clash)], batch=None)
        assert e.value.owner == acme and e.value.field == "allowed_ips"
    assert store.bulk_create_peers("evil", [peer("198.18.2.0/24"), peer("198.18.0.8/29")]) == 2
    assert store.stats()["active"] == 4


def test_update_peer_refuses_another_tenants_network(store):
    store.create_tenant("acme")
    store.create_tenant("evil")
    store.create_peer("acme", new_key(), [cidr.parse(ACME_IP)], None, None)
    key = new_key()
    store.create_peer("evil", key, [cidr.parse("198.18.5.0/24")], None, None)
    with pytest.raises(Conflict) as e:
        store.update_peer(key, nets=[cidr.parse("198.18.1.0/24")])
    assert e.value.owner == store.tenant_id("acme")
    assert store.get_peer(key)["allowed_ips"] == ["198.18.5.0/24"]
    with pytest.raises(Conflict):
        store.create_peer("evil", new_key(), [cidr.parse(ACME_IP)], None, None)


def test_import_lines_refuse_broad_networks_unless_allowed():
    lines = [json.dumps({"public_key": new_key(), "allowed_ips": ["198.18.0.1/32"]}),
             json.dumps({"public_key": new_key(), "allowed_ips": ["198.18.0.2/32", "::/0"]})]
    with pytest.raises(importer.ImportError_, match=r"line 2: allowed_ips\[1\]: ::/0 is broader"):
        list(importer.parse_lines(lines))
    assert len(list(importer.parse_lines(lines, allow_broad=True))) == 2


def test_import_command_across_tenants(db, tmp_path):
    import subprocess

    from appliance.registry.store import open_store

    store = open_store(db)
    store.migrate()
    store.create_tenant("acme")
    store.create_tenant("evil")
    store.create_peer("acme", new_key(), [cidr.parse(ACME_IP)], None, None)
    store.close()

    def run(*args: str, lines: list[list[str]]) -> subprocess.CompletedProcess:
        src = tmp_path / "peers.jsonl"
        src.write_text("".join(json.dumps({"public_key": new_key(), "allowed_ips": ips}) + "\n"
                               for ips in lines))
        return subprocess.run([*WGJIT, "registry", "import", "--db", db, "--tenant", "evil",
                               *args, str(src)], capture_output=True, text=True, timeout=120)

    r = run(lines=[["198.18.9.1/32"], [ACME_IP]])
    assert r.returncode == 1 and f"{ACME_IP} overlaps {ACME_IP}" in r.stderr, r.stderr
    r = run(lines=[["198.18.9.1/32"], ["0.0.0.0/0"]])
    assert r.returncode == 1 and "line 2: allowed_ips[0]: 0.0.0.0/0 is broader" in r.stderr
    r = run("--allow-broad", lines=[["198.18.9.1/32"], ["203.0.0.0/8"]])
    assert r.returncode == 0, r.stderr


def test_openapi_describes_the_rules(client):
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    for name in ("NewPeer", "PeerUpdate"):
        props = schemas[name]["properties"]
        assert props["allow_broad"]["type"] == "boolean"
        assert "across all tenants" in props["allowed_ips"]["description"]
        assert "/16" in props["allowed_ips"]["description"]


def test_concurrent_writers_in_two_tenants_cannot_both_take_a_network(db):
    # PostgreSQL runs writers at once: without the address lock, each could check,
    # find nothing, and insert. Rounds of 8 writers, 4 tenants, one network each round.
    from concurrent.futures import ThreadPoolExecutor

    from appliance.registry.store import open_store

    store = open_store(db, pool_size=8)  # a connection per writer (the default is 2)
    store.migrate()
    tenants = [f"t{i}" for i in range(4)]
    for t in tenants:
        store.create_tenant(t)

    def create(tenant: str, text: str) -> bool:
        try:
            store.create_peer(tenant, new_key(), [cidr.parse(text)], None, None)
            return True
        except Conflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        for r in range(10):
            # Half take the /24, half one /32 inside it: either the /24 alone
            # or the /32s (which do not overlap one another) get in, never both.
            wins = list(pool.map(create, tenants * 2, [f"198.18.{r}.0/24"] * 4
                                 + [f"198.18.{r}.{i}/32" for i in range(1, 5)]))
            assert wins[:4].count(True) + any(wins[4:]) == 1, (r, wins)
            assert not any(wins[4:]) or all(wins[4:]), (r, wins)
    found = [store.find_overlap(cidr.parse(f"198.18.{r}.0/24")) for r in range(10)]
    store.close()
    assert all(found)
