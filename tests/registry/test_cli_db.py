"""The --db verbs on both engines, and how the PostgreSQL password reaches them."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import requests

from appliance.registry.store.postgres import SCHEMA_VERSION
from tests.conftest import WGJIT, free_port, wait_http


def wgjit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_migrate_and_tokens(db):
    r = wgjit("registry", "migrate", "--db", db)
    assert r.returncode == 0 and r.stdout.strip() == f"schema version {SCHEMA_VERSION}", r.stderr
    assert wgjit("registry", "migrate", "--db", db).stdout.strip() == \
        f"schema version {SCHEMA_VERSION}"
    token = wgjit("token", "create", "--db", db, "--scope", "gateway", "--name", "gw1").stdout
    token_id = token.strip().split("_")[1]
    listed = wgjit("token", "list", "--db", db).stdout
    assert token_id in listed and "gateway" in listed and "active" in listed
    assert token.strip() not in listed  # never the secret
    r = wgjit("token", "revoke", "--db", db, token_id)
    assert r.returncode == 0 and f"revoked {token_id}" in r.stdout
    assert "revoked" in wgjit("token", "list", "--db", db).stdout
    assert wgjit("token", "revoke", "--db", db, token_id).returncode == 1
    r = wgjit("token", "create", "--db", db, "--scope", "admin", "--tenant", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr



def test_token_import(db, tmp_path):
    held = tmp_path / "deploy.token"
    assert wgjit("token", "generate", "--output", str(held)).returncode == 0
    args = ["token", "import", "--db", db, "--scope", "gateway", "--token-file", str(held)]
    first, again = wgjit(*args), wgjit(*args)
    assert first.returncode == 0 and "imported gateway token" in first.stdout, first.stderr
    assert again.returncode == 0 and "already present" in again.stdout
    r = wgjit("token", "import", "--db", db, "--scope", "admin", "--token-file", str(held))
    assert r.returncode == 2 and "taken" in r.stderr


def test_password_in_the_url_is_refused(tmp_path):
    url = "postgresql://wgjit:hunter2@127.0.0.1:5432/registry"
    for argv in (["registry", "serve", "--db", url], ["registry", "migrate", "--db", url],
                 ["token", "list", "--db", url]):
        r = wgjit(*argv)
        assert r.returncode == 2, argv
        assert "--db-password-file" in r.stderr and "hunter2" not in r.stderr
        assert "Traceback" not in r.stderr
    r = wgjit("token", "list", "--db", "postgresql://127.0.0.1/registry?password=hunter2")
    assert r.returncode == 2 and "hunter2" not in r.stderr
    r = wgjit("token", "list", "--db", str(tmp_path / "r.db"), "--db-password-file", "x")
    assert r.returncode == 2 and "PostgreSQL" in r.stderr


def test_password_file_must_be_private_and_is_used(pg_server, tmp_path):
    url = pg_server.create_database()
    # Nothing from the session's PGPASSFILE: only the file given on the command line.
    env = dict(os.environ, PGPASSFILE=str(tmp_path / "none"))
    loose = tmp_path / "loose"
    loose.write_text(pg_server.password + "\n")
    loose.chmod(0o644)
    r = wgjit("registry", "migrate", "--db", url, "--db-password-file", str(loose), env=env)
    assert r.returncode == 2 and "chmod 600" in r.stderr
    assert pg_server.password not in r.stdout + r.stderr
    r = wgjit("registry", "migrate", "--db", url, env=env)  # no password at all
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = wgjit("registry", "migrate", "--db", url, "--db-password-file",
              str(pg_server.password_file), env=env)
    assert r.returncode == 0 and f"schema version {SCHEMA_VERSION}" in r.stdout, r.stderr
    pg_server.drop_database(url)


@pytest.mark.parametrize("bad", ["postgresql://127.0.0.1:1/nothing"])
def test_unreachable_database_is_a_clear_error(bad):
    r = wgjit("registry", "migrate", "--db", bad)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "wgjit:" in r.stderr


def test_serve_workers_get_the_password_file(pg_server, tmp_path):
    """gunicorn's workers open their own pools after the fork, with the password
    read from --db-password-file (no PGPASSFILE to fall back on)."""
    url = pg_server.create_database()
    port = free_port()
    env = dict(os.environ, PGPASSFILE=str(tmp_path / "none"))
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [*WGJIT, "registry", "serve", "--db", url, "--db-password-file",
             str(pg_server.password_file), "--listen", f"127.0.0.1:{port}", "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        for _ in range(4):  # reach both workers
            health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
            assert health == {"status": "ok", "schema_version": SCHEMA_VERSION}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert pg_server.password not in (tmp_path / "serve.log").read_text()
    pg_server.drop_database(url)


def test_healthz_reports_an_unreachable_database(monkeypatch, tmp_path, engine):
    from appliance.registry import create_app
    from appliance.registry.store import postgres

    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 1.0)
    if engine == "sqlite":
        db = str(tmp_path / "missing" / "registry.db")  # a directory that is not there
    else:
        db = "postgresql://wgjit@127.0.0.1:1/nothing"
    app = create_app({"DATABASE": db, "SKIP_MIGRATE": True})
    try:
        r = app.test_client().get("/healthz")
    finally:
        app.extensions["wgjit_store"].close()
    assert r.status_code == 503 and r.json["error"] == "database_unavailable"
