"""A real gunicorn-served registry on loopback, driven by the real CLI and by load,
on both engines."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from appliance.keys import generate_keypair
from appliance.registry.client import RegistryClient, RegistryError
from appliance.registry.store import open_store
from tests.conftest import WGJIT, make_token

pytestmark = pytest.mark.slow


def wgjit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_against_gunicorn(registry_server, db, tmp_path):
    tokfile = tmp_path / "admin.token"
    out = wgjit("token", "create", "--db", db, "--scope", "admin", "--output", str(tokfile))
    assert "0600" in out.stdout and oct(tokfile.stat().st_mode & 0o777) == "0o600"
    srv = registry_server(db)
    common = ["--registry", srv.url, "--token-file", str(tokfile)]
    wgjit("tenant", "add", *common, "acme")
    key = generate_keypair()[1]
    psk_file = tmp_path / "psk"
    psk_file.write_text(generate_keypair()[1])
    psk_file.chmod(0o600)
    wgjit("peer", "add", *common, "--tenant", "acme", "--public-key", key,
          "--allowed-ip", "198.18.0.2/32", "--allowed-ip", "fd00::2/128",
          "--preshared-key-file", str(psk_file), "--name", "laptop")
    listed = json.loads(wgjit("peer", "list", *common, "--json").stdout)
    assert [p["public_key"] for p in listed] == [key]
    shown = json.loads(wgjit("peer", "show", *common, "--json", key).stdout)
    assert shown["allowed_ips"] == ["198.18.0.2/32", "fd00::2/128"] and shown["has_preshared_key"]
    wgjit("peer", "update", *common, key, "--allowed-ip", "198.18.0.3/32")
    wgjit("peer", "revoke", *common, key)
    assert json.loads(wgjit("peer", "show", *common, "--json", key).stdout)["revoked"] is True
    # Errors: a clear message and a non-zero exit, never a traceback.
    bad = wgjit("peer", "add", *common, "--tenant", "acme", "--public-key", "nope",
                "--allowed-ip", "198.18.0.9/32", check=False)
    assert bad.returncode == 1 and "public_key" in bad.stderr and "Traceback" not in bad.stderr
    wgjit("peer", "delete", *common, key)
    assert wgjit("peer", "show", *common, key, check=False).returncode == 1
    # A token file others can read is refused.
    tokfile.chmod(0o644)
    loose = wgjit("peer", "list", *common, check=False)
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    # Metrics from several workers are merged.
    text = requests.get(srv.url + "/metrics", timeout=5).text
    assert 'route="/v1/peers",status="201"} 1.0' in text
    assert "wgjit_registry_peers" in text


def test_serve_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "wgjit.toml"
    cfg.write_text('[registry]\ndb = "x.db"\nlisten = "nowhere"\n')
    r = wgjit("registry", "serve", "--config", str(cfg), check=False)
    assert r.returncode == 2 and "registry.listen" in r.stderr
    cfg.write_text('[registry]\ndb = "x.db"\nworkerz = 3\n')
    r = wgjit("registry", "serve", "--config", str(cfg), check=False)
    assert r.returncode == 2 and "registry.workerz" in r.stderr and "unknown" in r.stderr
    r = subprocess.run([*WGJIT, "registry", "serve", "--db", "x.db"], capture_output=True,
                       text=True, env=dict(os.environ, WGJIT_WORKERS="many"), timeout=30)
    assert r.returncode == 2 and "WGJIT_WORKERS" in r.stderr
    r = wgjit("registry", "serve", "--db", "x.db", "--db-pool-size", "0", check=False)
    assert r.returncode == 2 and "--db-pool-size" in r.stderr


@pytest.mark.parametrize("args,per_worker", [
    (("--threads", "3"), 3),  # the default: one connection per thread
    (("--threads", "6", "--db-pool-size", "2"), 2),
])
def test_postgres_connections_per_worker(registry_server, pg_server, args, per_worker):
    """Each worker opens at most its pool's size; requests beyond it queue for a
    connection instead of failing."""
    import psycopg

    db = pg_server.create_database()
    srv = None
    try:
        token = make_token(db, "gateway")
        srv = registry_server(db, workers=2, args=args)
        missing = requests.utils.quote(generate_keypair()[1], safe="")

        def lookup(_: int) -> int:
            return requests.get(f"{srv.url}/v1/gateway/peers/{missing}", timeout=30,
                                headers={"Authorization": f"Bearer {token}"}).status_code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(lookup, range(400))) == {404}
        with psycopg.connect(db) as conn:
            opened = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname ="
                                  " current_database() AND pid <> pg_backend_pid()"
                                  ).fetchone()[0]
        assert 2 <= opened <= 2 * per_worker
    finally:
        if srv is not None:
            srv.stop()
        pg_server.drop_database(db)


def test_parallel_writers_lose_nothing(registry_server, db):
    token = make_token(db, "admin")
    srv = registry_server(db, workers=3)
    RegistryClient(srv.url, token).create_tenant("load")
    writers, per_writer = 8, 40
    keys = [[generate_keypair()[1] for _ in range(per_writer)] for _ in range(writers)]

    def write(w: int) -> int:
        client = RegistryClient(srv.url, token)
        done = 0
        for i, key in enumerate(keys[w]):
            client.create_peer("load", key, [f"198.18.{w}.{i}/32"])
            client.update_peer(key, name=f"w{w}-{i}")
            done += 1
        return done

    with ThreadPoolExecutor(writers) as pool:
        assert sum(pool.map(write, range(writers))) == writers * per_writer
    store = open_store(db)
    rows, _ = store.list_peers(0, 1000)
    assert len(rows) == writers * per_writer
    assert {p["public_key"] for p in rows} == {k for ks in keys for k in ks}
    assert all(p["name"] is not None for p in rows)
    cursors = [c["cursor"] for c in store.changes(0, 1000)["changes"]]
    store.close()
    assert len(cursors) == 2 * writers * per_writer
    assert cursors == list(range(cursors[0], cursors[0] + len(cursors)))  # no gaps
    # Through the API too: the feed read in pages has every change exactly once.
    client = RegistryClient(srv.url, make_token(db, "gateway"))
    seen, since = [], 0
    while True:
        page = client.changes(since, limit=100)
        seen += [c["cursor"] for c in page["changes"]]
        since = page["cursor"]
        if not page["more"]:
            break
    assert seen == cursors


def test_kill9_mid_load_keeps_every_acknowledged_write(registry_server, db):
    token = make_token(db, "admin")
    srv = registry_server(db, workers=2)
    RegistryClient(srv.url, token).create_tenant("t")
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(w: int) -> None:
        client = RegistryClient(srv.url, token, timeout=5)
        i = 0
        while not stop.is_set():
            key = generate_keypair()[1]
            try:
                client.create_peer("t", key, [f"198.18.{w}.{i % 250}/32", f"fd00::{w}:{i}/128"])
            except RegistryError:
                return  # the server is gone; this write was never acknowledged
            with lock:
                acked.append(key)
            i += 1
            if i >= 250:
                return

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill9()
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) >= 150
    srv2 = registry_server(db)
    client = RegistryClient(srv2.url, token)
    stored = {p["public_key"] for p in client.iter_peers("t", page=1000)}
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged writes lost"
    assert requests.get(srv2.url + "/healthz", timeout=5).json()["status"] == "ok"


def _raw_http(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (requests would refuse or fix them); read one response."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = dict(line.split(": ", 1) for line in
                               head.decode("latin-1").split("\r\n")[1:])
                length = int(headers.get("Content-Length", "-1"))
                if len(body) >= length >= 0:
                    break
    status = int(head.split(b" ", 2)[1])
    return status, headers, body


def test_every_error_gunicorn_serves_is_json(registry_server, db):
    """Errors decided below Flask: gunicorn's own parser, the fast path, chunked bodies."""
    admin = make_token(db, "admin")
    gateway = make_token(db, "gateway")
    srv = registry_server(db)
    # gunicorn's request-line limit (4094 bytes) answers before any WSGI code runs.
    status, headers, body = _raw_http(
        srv.url, b"GET /v1/peers/" + b"A" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "uri_too_long"
    # A chunked body (no Content-Length) past the limit is "too large", as a
    # sized one is, not a parse error.
    h = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    big = (b'{"name": "' + b"x" * 100_000 + b'"}' for _ in range(1))
    r = requests.post(srv.url + "/v1/tenants", data=big, headers=h, timeout=10)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # Nesting deeper than the parser's recursion limit is bad input, not a crash.
    r = requests.post(srv.url + "/v1/tenants", data="[" * 20_000 + "]" * 20_000,
                      headers=h, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    # A database error on the gateway lookup's fast path: the same JSON 500 as
    # every route (the table disappears under the running server).
    RegistryClient(srv.url, admin).create_tenant("acme")
    key = generate_keypair()[1]
    RegistryClient(srv.url, admin).create_peer("acme", key, ["198.18.0.2/32"])
    assert RegistryClient(srv.url, gateway).gateway_peer(key)["public_key"] == key
    _rename_table(db, "allowed_ips", "allowed_ips_gone")
    r = requests.get(f"{srv.url}/v1/gateway/peers/{key.replace('/', '_').replace('+', '-')}",
                     headers={"Authorization": f"Bearer {gateway}"}, timeout=10)
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal server error"}
    assert "allowed_ips" not in r.text
    _rename_table(db, "allowed_ips_gone", "allowed_ips")
    assert RegistryClient(srv.url, gateway).gateway_peer(key)["public_key"] == key


def _rename_table(db: str, old: str, new: str) -> None:
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


def test_revoking_one_gateways_token_cuts_off_that_gateway_only(registry_server, db, tmp_path):
    """Two gateways, each with its own named token (gw1 limited to tenant acme):
    revoking gw1's token with the CLI shuts gw1 out within the registry's token
    cache period, on the fast path and the feed, while gw2 keeps working."""
    from appliance.registry import auth

    url = registry_server(db).url
    admin = RegistryClient(url, make_token(db, "admin"))
    files = {}
    for name, pool in (("gw1", ["--tenant", "acme"]), ("gw2", [])):
        files[name] = tmp_path / f"{name}.token"
        wgjit("token", "create", "--db", db, "--scope", "gateway", "--name", name, *pool,
              "--output", str(files[name]))
    keys = {}
    for n, tenant in enumerate(("acme", "globex"), 1):
        admin.create_tenant(tenant)
        keys[tenant] = generate_keypair()[1]
        admin.create_peer(tenant, keys[tenant], [f"198.18.{n}.1/32"])

    def get(gw: str, path: str) -> int:
        headers = {"Authorization": f"Bearer {files[gw].read_text().strip()}"}
        return requests.get(url + path, headers=headers, timeout=10).status_code

    def lookup(key: str) -> str:
        return "/v1/gateway/peers/" + key.replace("+", "-").replace("/", "_")

    assert get("gw1", lookup(keys["acme"])) == 200
    assert get("gw1", lookup(keys["globex"])) == 404  # outside its pool
    assert get("gw2", lookup(keys["globex"])) == 200
    token_id = files["gw1"].read_text().split("_")[1]
    listed = wgjit("token", "list", "--db", db).stdout
    assert any(line.split()[:3] == [token_id, "gateway", "acme"] and line.endswith("gw1")
               for line in listed.splitlines())
    wgjit("token", "revoke", "--db", db, token_id)
    # Every worker may hold the token verified for up to VERIFIED_TTL; well past
    # that, every request of gw1 is refused (polled, so no timing is asserted).
    deadline = time.monotonic() + auth.VERIFIED_TTL + 30
    while get("gw1", lookup(keys["acme"])) != 401 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(auth.VERIFIED_TTL)
    assert [get("gw1", lookup(keys["acme"])) for _ in range(6)] == [401] * 6
    assert get("gw1", "/v1/gateway/changes?since=0") == 401
    assert [get("gw2", lookup(keys["acme"])) for _ in range(6)] == [200] * 6
    assert get("gw2", "/v1/gateway/changes?since=0") == 200
