"""One token per gateway, optionally limited to a pool of tenants: the lookup (both
the fast path and the blueprint), the change feed and the key snapshot see only
the pool; outside it everything looks like nothing is there."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.parse

import pytest

from appliance.gateway.keyfilter import KnownKeys
from appliance.registry import tokens
from appliance.registry.store import open_store
from tests.conftest import WGJIT
from tests.registry.conftest import new_key


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _pool_token(db: str, pool: list[str], name: str = "gw1") -> str:
    store = open_store(db)
    try:
        return tokens.create(store, "gateway", name=name, pool=pool)
    finally:
        store.close()


@pytest.fixture
def two_tenants(client, admin):
    """Tenants acme and globex, each with one active peer; returns {tenant: key}."""
    keys = {}
    for n, name in enumerate(("acme", "globex"), 1):
        assert client.post("/v1/tenants", json={"name": name}, headers=admin).status_code == 201
        keys[name] = new_key()
        r = client.post("/v1/peers", json={"tenant": name, "public_key": keys[name],
                                           "allowed_ips": [f"198.18.{n}.1/32"]}, headers=admin)
        assert r.status_code == 201, r.json
    return keys


def _lookup(client, key: str, headers: dict):
    return client.get(f"/v1/gateway/peers/{urllib.parse.quote(key, safe='')}", headers=headers)


def test_pool_token_finds_its_tenants_peers_and_nothing_else(client, db, two_tenants, gateway):
    pooled = _bearer(_pool_token(db, ["acme"]))
    ok = _lookup(client, two_tenants["acme"], pooled)
    assert ok.status_code == 200 and ok.json["tenant"] == "acme"
    # Another tenant's key answers exactly as an unknown key does: no leak.
    outside = _lookup(client, two_tenants["globex"], pooled)
    unknown = _lookup(client, new_key(), pooled)
    assert outside.status_code == unknown.status_code == 404
    assert outside.json == unknown.json
    # The URL-safe spelling goes through the same check.
    urlsafe = two_tenants["globex"].replace("+", "-").replace("/", "_")
    assert _lookup(client, urlsafe, pooled).status_code == 404
    # A fleet-wide gateway token still sees every tenant.
    assert _lookup(client, two_tenants["globex"], gateway).status_code == 200


def test_pool_may_name_a_tenant_created_later(client, admin, db, two_tenants):
    pooled = _bearer(_pool_token(db, ["acme", "initech"]))
    assert client.post("/v1/tenants", json={"name": "initech"}, headers=admin).status_code == 201
    key = new_key()
    assert client.post("/v1/peers", json={"tenant": "initech", "public_key": key,
                                          "allowed_ips": ["198.18.3.1/32"]},
                       headers=admin).status_code == 201
    assert _lookup(client, key, pooled).status_code == 200
    assert _lookup(client, two_tenants["globex"], pooled).status_code == 404


def test_feed_shows_the_pool_once_each_and_moves_past_the_rest(client, admin, db, two_tenants):
    """Interleaved changes of both tenants, read in small pages: the pool's changes
    each exactly once and in order, none of the others, and the cursor ends at
    the latest change even when that one was another tenant's."""
    pooled = _bearer(_pool_token(db, ["acme"]))
    for i in range(12):
        for n, tenant in enumerate(("acme", "globex", "globex"), 1):
            r = client.post("/v1/peers", json={
                "tenant": tenant, "public_key": new_key(),
                "allowed_ips": [f"198.18.{10 + n}.{i + 1}/32"]}, headers=admin)
            assert r.status_code == 201
    every = client.get("/v1/gateway/changes?since=0&limit=1000", headers=admin).json
    expected = [c["cursor"] for c in every["changes"] if c["tenant"] == "acme"]
    assert len(expected) == 13 and every["changes"][-1]["tenant"] == "globex"

    seen, since, pages = [], 0, 0
    while True:
        page = client.get(f"/v1/gateway/changes?since={since}&limit=4", headers=pooled).json
        assert {c["tenant"] for c in page["changes"]} <= {"acme"}
        seen += [c["cursor"] for c in page["changes"]]
        assert page["cursor"] >= since
        since, pages = page["cursor"], pages + 1
        if not page["more"]:
            break
    assert seen == expected
    assert since == every["latest"]  # past globex's trailing changes
    assert pages == 4  # 13 changes in pages of 4: no page wasted on the others

    # Only another tenant's news: nothing shown, the cursor still moves on.
    r = client.post("/v1/peers", json={"tenant": "globex", "public_key": new_key(),
                                       "allowed_ips": ["198.18.20.1/32"]}, headers=admin)
    assert r.status_code == 201
    page = client.get(f"/v1/gateway/changes?since={since}", headers=pooled).json
    assert page["changes"] == [] and page["cursor"] == since + 1 and not page["more"]
    # And the pool's own next change comes after it, exactly once.
    q = urllib.parse.quote(two_tenants["acme"], safe="")
    assert client.post(f"/v1/peers/{q}/revoke", headers=admin).status_code == 200
    page = client.get(f"/v1/gateway/changes?since={page['cursor']}", headers=pooled).json
    assert [(c["op"], c["public_key"]) for c in page["changes"]] == [
        ("revoke", two_tenants["acme"])]



def test_batch_lookup_honours_the_pool_as_the_single_one_does(client, db, two_tenants,
                                                              gateway):
    pooled = _bearer(_pool_token(db, ["acme"]))
    acme, globex, unknown = two_tenants["acme"], two_tenants["globex"], new_key()
    r = client.post("/v1/gateway/lookup", json={"keys": [acme, globex, unknown]},
                    headers=pooled)
    assert r.status_code == 200, r.json
    assert [p["public_key"] for p in r.json["peers"]] == [acme]
    assert r.json["not_found"] == [globex, unknown]
    # Byte for byte: another tenant's key answers as a made-up key does.
    hidden = client.post("/v1/gateway/lookup", json={"keys": [globex]}, headers=pooled)
    absent = client.post("/v1/gateway/lookup", json={"keys": [unknown]}, headers=pooled)
    assert hidden.status_code == absent.status_code == 200
    assert hidden.get_data(as_text=True).replace(globex, "KEY") \
        == absent.get_data(as_text=True).replace(unknown, "KEY")
    # A fleet-wide gateway token finds both tenants' keys.
    r = client.post("/v1/gateway/lookup", json={"keys": [acme, globex]}, headers=gateway)
    assert sorted(p["public_key"] for p in r.json["peers"]) == sorted([acme, globex])


def test_a_pool_follows_by_digest_when_its_cursor_rests_on_another_tenants_change(
        client, admin, db, two_tenants):
    """A pool's page that is not `more` ends on the latest change, often another
    tenant's: cursor_digest is the digest of that change, so a gateway sending it
    back with the next poll is never told cursor_mismatch; a wrong one still is."""
    pooled = _bearer(_pool_token(db, ["acme"]))

    def add(tenant: str, ip: str) -> None:
        r = client.post("/v1/peers", json={"tenant": tenant, "public_key": new_key(),
                                           "allowed_ips": [ip]}, headers=admin)
        assert r.status_code == 201, r.json

    def poll(since: int, digest: str | None, limit: int = 2):
        query = {"since": since, "limit": limit} | ({"digest": digest} if digest else {})
        return client.get("/v1/gateway/changes", query_string=query, headers=pooled)

    def whole_feed() -> dict:
        return client.get("/v1/gateway/changes?since=0&limit=1000", headers=admin).json

    since, digest, rested_on_others = 0, None, 0
    for i in range(4):
        for n, tenant in enumerate(("globex", "acme", "globex", "globex"), 1):
            add(tenant, f"198.18.{10 + n}.{i + 1}/32")
        every = whole_feed()
        change_at = {c["cursor"]: c for c in every["changes"]}
        while True:
            r = poll(since, digest)
            assert r.status_code == 200, r.json  # never a false cursor_mismatch
            page = r.json
            assert page["since_digest"] == (change_at[since]["digest"] if since else None)
            assert page["cursor_digest"] == change_at[page["cursor"]]["digest"]
            # The bounds are the whole feed's, as the cursor is (cursor <= latest).
            assert page["latest"] == every["latest"] >= page["cursor"]
            assert page["latest_digest"] == change_at[every["latest"]]["digest"]
            rested_on_others += change_at[page["cursor"]]["tenant"] != "acme"
            since, digest = page["cursor"], page["cursor_digest"]
            if not page["more"]:
                break
        assert since == every["latest"]
    assert rested_on_others == 4  # each round ends on one of globex's changes

    # Nothing but another tenant's news: the cursor moves onto it, with its digest.
    add("globex", "198.18.30.1/32")
    page = poll(since, digest).json
    newest = whole_feed()["changes"][-1]
    assert page["changes"] == [] and page["cursor"] == newest["cursor"] == since + 1
    assert page["cursor_digest"] == newest["digest"]
    assert poll(page["cursor"], page["cursor_digest"]).status_code == 200
    # A digest naming some other change at that cursor is still a mismatch.
    r = poll(page["cursor"], "0" * 16)
    assert r.status_code == 409 and r.json["error"] == "cursor_mismatch"
    assert r.json["latest"] == newest["cursor"]
    assert r.json["latest_digest"] == newest["digest"]


def test_key_snapshot_holds_only_the_pool(client, db, two_tenants, gateway):
    known = KnownKeys()
    pooled = _bearer(_pool_token(db, ["acme"]))

    def digests(headers: dict) -> set[bytes]:
        r = client.get("/v1/gateway/keys", query_string={"salt": known.salt.hex()},
                       headers=headers)
        assert r.status_code == 200, r.json
        raw = base64.b64decode(r.json["digests"])
        size = r.json["digest_size"]
        return {raw[i:i + size] for i in range(0, len(raw), size)}

    from appliance.keys import decode_key
    from appliance.registry.gateway import key_digest

    acme, globex = (key_digest(known.salt, decode_key(two_tenants[t])) for t in ("acme", "globex"))
    assert digests(pooled) == {acme}
    assert digests(gateway) == {acme, globex}


def test_pool_is_for_gateway_tokens_and_admins_keep_one_tenant(store):
    store.create_tenant("acme")
    with pytest.raises(ValueError, match="pool"):
        tokens.create(store, "admin", pool=["acme"])
    with pytest.raises(ValueError, match="one tenant"):
        tokens.create(store, "gateway", tenant="acme")
    with pytest.raises(ValueError, match="not a tenant name"):
        tokens.create(store, "gateway", pool=["a/b"])
    t = tokens.create(store, "gateway", name="gw1", pool=["globex", "acme", "acme"])
    got = tokens.verify(store, t)
    assert got.pool == frozenset({"acme", "globex"})
    assert got.visible_tenants() == frozenset({"acme", "globex"})
    row = next(r for r in store.list_tokens() if r["id"] == got.id)
    assert row["name"] == "gw1" and sorted(row["pool"]) == ["acme", "globex"]
    everyone = tokens.verify(store, tokens.create(store, "gateway", name="gw2"))
    assert everyone.pool is None and everyone.visible_tenants() is None


def test_import_sets_and_updates_the_pool(store):
    t = tokens.generate()
    assert tokens.import_token(store, t, "gateway", "gw1", ["acme"]) == "added"
    assert tokens.import_token(store, t, "gateway", "gw1", ["acme"]) == "present"
    assert tokens.import_token(store, t, "gateway", "gw1", ["acme", "globex"]) == "updated"
    assert tokens.verify(store, t).pool == frozenset({"acme", "globex"})
    assert tokens.import_token(store, t, "gateway", "gw1", []) == "updated"
    assert tokens.verify(store, t).pool is None


def _wgjit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=60)


def test_cli_creates_lists_and_imports_named_pool_tokens(db, tmp_path):
    out = tmp_path / "gw1.token"
    r = _wgjit("token", "create", "--db", db, "--scope", "gateway", "--name", "gw1",
               "--tenant", "acme", "--tenant", "globex", "--output", str(out))
    assert r.returncode == 0, r.stderr
    token_id = out.read_text().split("_")[1]
    listed = _wgjit("token", "list", "--db", db).stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith(token_id))
    assert line.split() == [token_id, "gateway", "acme,globex", "active", "gw1"]
    rows = json.loads(_wgjit("token", "list", "--db", db, "--json").stdout)
    assert sorted(rows[0]["pool"]) == ["acme", "globex"] and rows[0]["name"] == "gw1"
    r = _wgjit("token", "create", "--db", db, "--scope", "admin", "--tenant", "a",
               "--tenant", "b")
    assert r.returncode == 2 and "one tenant" in r.stderr and "Traceback" not in r.stderr

    held = tmp_path / "gw2.token"
    assert _wgjit("token", "generate", "--output", str(held)).returncode == 0
    args = ["token", "import", "--db", db, "--scope", "gateway", "--name", "gw2",
            "--token-file", str(held)]
    assert "imported" in _wgjit(*args, "--tenant", "acme").stdout
    assert "already present" in _wgjit(*args, "--tenant", "acme").stdout
    assert "pool updated" in _wgjit(*args, "--tenant", "globex").stdout
    rows = {r["name"]: r for r in json.loads(_wgjit("token", "list", "--db", db,
                                                     "--json").stdout)}
    assert rows["gw2"]["pool"] == ["globex"]
    r = _wgjit("token", "import", "--db", db, "--scope", "admin", "--tenant", "acme",
               "--token-file", str(held))
    assert r.returncode == 2 and "pool" in r.stderr
