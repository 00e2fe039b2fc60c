"""What the API refuses to store, each a 400 naming the field: zone ids, keys
with which no handshake can work, names that display as something else, JSON
whose meaning depends on the parser."""

from __future__ import annotations

import base64
import json

import pytest

from appliance.keys import LOW_ORDER_POINTS
from appliance.registry import importer
from tests.registry.conftest import new_key

ZERO_KEY = base64.b64encode(bytes(32)).decode()
LOW_ORDER = [base64.b64encode(raw).decode() for raw in sorted(LOW_ORDER_POINTS)]


def post_peer(client, admin, **override):
    body = {"tenant": "acme", "public_key": new_key(), "allowed_ips": ["198.18.0.9/32"]}
    return client.post("/v1/peers", json=body | override, headers=admin)


@pytest.mark.parametrize("ips,field", [
    (["fe80::1%eth0/128"], "allowed_ips[0]"),
    (["fd00::1/128", "fd00::2%1/128"], "allowed_ips[1]"),
])
def test_zone_ids_are_refused(client, admin, tenant, ips, field):
    r = post_peer(client, admin, allowed_ips=ips)
    assert r.status_code == 400 and r.json["field"] == field and "zone id" in r.json["message"]


@pytest.mark.parametrize("key", [ZERO_KEY, LOW_ORDER[1], LOW_ORDER[-1]])
def test_low_order_public_keys_are_refused(client, admin, tenant, key):
    r = post_peer(client, admin, public_key=key)
    assert r.status_code == 400 and r.json["field"] == "public_key", r.json
    assert "low-order" in r.json["message"]


def test_all_zero_preshared_key_is_refused(client, admin, tenant):
    r = post_peer(client, admin, preshared_key=ZERO_KEY)
    assert r.status_code == 400 and r.json["field"] == "preshared_key"
    key = new_key()
    assert post_peer(client, admin, public_key=key).status_code == 201
    r = client.patch(f"/v1/peers/{key.replace('/', '_').replace('+', '-')}",
                     json={"preshared_key": ZERO_KEY}, headers=admin)
    assert r.status_code == 400 and r.json["field"] == "preshared_key"
    assert post_peer(client, admin, preshared_key=new_key(),
                     allowed_ips=["198.18.0.10/32"]).status_code == 201


@pytest.mark.parametrize("name", [
    "a/b", "/", "evil\x00", "tab\there", "del\x7f", "c1\x85", "line\u2028break",
    "\u202eevil", "rlo\u202dx", "isolate\u2066x\u2069", "zero\u200bwidth", "bom\ufeff",
])
def test_tenant_names_that_are_not_plain_names_are_refused(client, admin, name):
    r = client.post("/v1/tenants", json={"name": name}, headers=admin)
    assert r.status_code == 400 and r.json["field"] == "name", (name, r.json)
    assert client.get("/v1/tenants", headers=admin).json["tenants"] == []


@pytest.mark.parametrize("name", ["acme", "Ärzte Süd", "東京", "a-b_c.d e"])
def test_plain_tenant_names_are_fine(client, admin, name):
    assert client.post("/v1/tenants", json={"name": name}, headers=admin).status_code == 201


def test_peer_names_refuse_bidi_and_controls(client, admin, tenant):
    for bad in ("\u202elaptop", "a\nb", "x\x1b[31m"):
        r = post_peer(client, admin, name=bad)
        assert r.status_code == 400 and r.json["field"] == "name", bad
    # A peer name may hold '/' and emoji joined with zero-width joiners.
    assert post_peer(client, admin, name="home/laptop \U0001F469\u200d\U0001F4BB").status_code \
        == 201


def test_duplicate_json_keys_are_refused_naming_the_key(client, admin, tenant):
    key = new_key()
    raw = ('{"tenant": "acme", "public_key": "' + key + '", "allowed_ips": ["198.18.0.9/32"],'
           ' "allowed_ips": ["0.0.0.0/0"]}')
    r = client.post("/v1/peers", data=raw, content_type="application/json", headers=admin)
    assert r.status_code == 400 and r.json["field"] == "allowed_ips"
    assert "more than once" in r.json["message"]
    r = client.post("/v1/tenants", data='{"name": "a", "name": "b"}',
                    content_type="application/json", headers=admin)
    assert r.status_code == 400 and r.json["field"] == "name"
    assert [t["name"] for t in client.get("/v1/tenants", headers=admin).json["tenants"]] \
        == ["acme"]


def test_deep_json_is_400(client, admin):
    r = client.post("/v1/tenants", data="[" * 5000 + "]" * 5000,
                    content_type="application/json", headers=admin)
    assert r.status_code == 400 and r.json["error"] == "invalid_json"
    r = client.post("/v1/tenants", data='{"name": ' + "{\"a\": " * 5000 + "1" + "}" * 5001,
                    content_type="application/json", headers=admin)
    assert r.status_code == 400 and r.json["error"] == "invalid_json"


@pytest.mark.parametrize("line,problem", [
    (json.dumps({"public_key": ZERO_KEY, "allowed_ips": ["198.18.0.1/32"]}), "public_key"),
    ('{"public_key": "K", "public_key": "K", "allowed_ips": []}', "public_key: appears"),
    (json.dumps({"public_key": new_key(), "allowed_ips": ["fe80::1%eth0/128"]}), "zone id"),
    (json.dumps({"public_key": new_key(), "allowed_ips": ["198.18.0.1/32"],
                 "preshared_key": ZERO_KEY}), "preshared_key"),
    ("[" * 5000, "nested too deeply"),
])
def test_import_refuses_the_same(line, problem):
    with pytest.raises(importer.ImportError_, match=f"^line 1: .*{problem}"):
        list(importer.parse_lines([line]))
