"""CLI verbs beyond --help: registry migrate, token list|revoke, tenant list, peer restore.

Each through the real CLI (a subprocess), against a real database file and, where
the verb talks to the API, a real gunicorn registry on loopback.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import pytest

from appliance.keys import generate_keypair
from appliance.registry.client import RegistryClient, RegistryError
from appliance.registry.store import open_store
from appliance.registry.store.sqlite import SCHEMA_VERSION
from tests.conftest import WGJIT

pytestmark = pytest.mark.slow


def wgjit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def test_registry_migrate_upgrades_an_old_database_and_keeps_its_rows(tmp_path) -> None:
    path = tmp_path / "old.db"
    store = open_store(str(path))
    assert store.migrate(target=1) == 1  # the first schema wgjit ever wrote
    store.close()
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO tenants (name, created_at) VALUES ('acme', '2026-01-01')")

    out = wgjit("registry", "migrate", "--db", str(path)).stdout
    assert out.strip() == f"schema version {SCHEMA_VERSION}"
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert c.execute("SELECT name FROM tenants").fetchall() == [("acme",)]
    # Again: nothing to do, same answer.
    assert wgjit("registry", "migrate", "--db", str(path)).stdout == out

    # A database from a newer wgjit: refused with a message, not a traceback.
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = wgjit("registry", "migrate", "--db", str(path), check=False)
    assert newer.returncode == 1
    assert "newer than this wgjit" in newer.stderr


def test_token_list_and_revoke(registry_server, tmp_path) -> None:
    path = tmp_path / "registry.db"
    ops, gw = tmp_path / "ops.token", tmp_path / "gw.token"
    wgjit("token", "create", "--db", str(path), "--scope", "admin", "--name", "ops",
          "--output", str(ops))
    wgjit("token", "create", "--db", str(path), "--scope", "gateway", "--output", str(gw))
    secrets = [ops.read_text().strip(), gw.read_text().strip()]

    listed = wgjit("token", "list", "--db", str(path), "--json").stdout
    rows = json.loads(listed)
    assert sorted((r["scope"], r["name"], r["revoked_at"]) for r in rows) == \
        [("admin", "ops", None), ("gateway", None, None)]
    text = wgjit("token", "list", "--db", str(path)).stdout
    for secret in secrets:  # ids only, never the secret part
        assert secret not in listed and secret not in text
        assert secret.split("_", 2)[2] not in listed + text
    ops_id = next(r["id"] for r in rows if r["name"] == "ops")
    assert ops.read_text().split("_", 2)[1] == ops_id

    srv = registry_server(path)
    client = RegistryClient(srv.url, secrets[0])
    assert client.list_tenants() == []
    assert wgjit("token", "revoke", "--db", str(path), ops_id).stdout.strip() == \
        f"revoked {ops_id}"
    assert "revoked" in wgjit("token", "list", "--db", str(path)).stdout.splitlines()[
        [r["id"] for r in rows].index(ops_id)]

    # The running server stops taking it (workers cache a verified token for a few
    # seconds, so wait for the outcome, generously).
    def refused() -> bool:
        try:
            client.list_tenants()
        except RegistryError as e:
            return e.status == 401
        return False
    deadline = time.monotonic() + 30
    while not refused():
        assert time.monotonic() < deadline, "revoked token still accepted after 30 s"
        time.sleep(0.5)
    again = wgjit("token", "revoke", "--db", str(path), ops_id, check=False)
    assert again.returncode == 1 and f"no active token {ops_id}" in again.stderr


def test_tenant_list_and_peer_restore(registry_server, tmp_path) -> None:
    path = tmp_path / "registry.db"
    admin, gw = tmp_path / "admin.token", tmp_path / "gw.token"
    wgjit("token", "create", "--db", str(path), "--scope", "admin", "--output", str(admin))
    wgjit("token", "create", "--db", str(path), "--scope", "gateway", "--output", str(gw))
    srv = registry_server(path)
    common = ["--registry", srv.url, "--token-file", str(admin)]

    assert wgjit("tenant", "list", *common).stdout.strip() == "no tenants"
    wgjit("tenant", "add", *common, "acme")
    wgjit("tenant", "add", *common, "beta")
    key = generate_keypair()[1]
    wgjit("peer", "add", *common, "--tenant", "acme", "--public-key", key,
          "--allowed-ip", "198.18.0.2/32")
    tenants = json.loads(wgjit("tenant", "list", *common, "--json").stdout)
    assert sorted((t["name"], t["peers"]) for t in tenants) == [("acme", 1), ("beta", 0)]
    text = wgjit("tenant", "list", *common).stdout.splitlines()
    assert sorted(text) == ["acme  1 peers", "beta  0 peers"]

    gateway = RegistryClient(srv.url, gw.read_text().strip())
    assert gateway.gateway_peer(key)["allowed_ips"] == ["198.18.0.2/32"]
    wgjit("peer", "revoke", *common, key)
    with pytest.raises(RegistryError) as e:
        gateway.gateway_peer(key)  # a gateway no longer gets a revoked peer
    assert e.value.status == 404

    out = wgjit("peer", "restore", *common, key).stdout
    assert out.strip() == f"restored {key}"
    shown = json.loads(wgjit("peer", "show", *common, "--json", key).stdout)
    assert shown["revoked"] is False and shown["allowed_ips"] == ["198.18.0.2/32"]
    assert gateway.gateway_peer(key)["public_key"] == key
    # Restoring a peer that is not revoked, or one that does not exist: a clear error.
    missing = wgjit("peer", "restore", *common, generate_keypair()[1], check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
