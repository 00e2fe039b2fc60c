"""Errors from the database reach clients as the API's JSON, and operators in the log:
a locked database, a full disk, a database that stops answering."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import urllib.parse

import pytest

from appliance.registry import create_app, errors
from tests.conftest import make_token
from tests.registry.conftest import new_key


@contextlib.contextmanager
def write_lock_held(db: str):
    """Another connection holds what every peer write needs until the block ends:
    SQLite's write lock, or PostgreSQL's feed head row."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:  # not autocommit: the row lock lasts
            conn.execute("UPDATE feed_head SET cursor = cursor")
            yield
            conn.rollback()
    else:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def quick_app(db):
    """The app with a short busy timeout, so a test waits 0.2 s, not 2."""
    app = create_app({"DATABASE": db, "DB_BUSY_TIMEOUT_MS": 200})
    yield app
    app.extensions["wgjit_store"].close()


def test_locked_database_is_503_with_retry_after(quick_app, db):
    client = quick_app.test_client()
    h = {"Authorization": f"Bearer {make_token(db, 'admin')}"}
    gw = {"Authorization": f"Bearer {make_token(db, 'gateway')}"}
    assert client.post("/v1/tenants", json={"name": "acme"}, headers=h).status_code == 201
    key = new_key()
    body = {"tenant": "acme", "public_key": key, "allowed_ips": ["198.18.0.2/32"]}
    first = new_key()
    assert client.post("/v1/peers", headers=h, json=body | {
        "public_key": first, "allowed_ips": ["198.18.0.1/32"]}).status_code == 201
    with write_lock_held(db):
        r = client.post("/v1/peers", json=body, headers=h)
        assert r.status_code == 503, r.json
        assert r.json["error"] == "database_busy"
        assert r.headers["Retry-After"] == str(errors.RETRY_AFTER_S)
        # Reads do not queue behind the writer: gateways keep their lookups.
        path = f"/v1/gateway/peers/{urllib.parse.quote(first, safe='')}"
        assert client.get(path, headers=gw).status_code == 200
    # Nothing half-written: the retry goes through.
    assert client.post("/v1/peers", json=body, headers=h).status_code == 201
    assert client.get("/v1/gateway/changes", headers=gw).json["latest"] == 2


def test_disk_full_keeps_the_original_error(tmp_path, caplog):
    """SQLite rolls back by itself on SQLITE_FULL; the rollback that followed
    failed ("no transaction is active") and that error replaced the real one."""
    db = str(tmp_path / "registry.db")
    app = create_app({"DATABASE": db})
    store = app.extensions["wgjit_store"]
    client = app.test_client()
    h = {"Authorization": f"Bearer {make_token(db, 'admin')}"}
    assert client.post("/v1/tenants", json={"name": "acme"}, headers=h).status_code == 201
    # The test client runs requests in this thread, on this connection.
    pages = store.conn().execute("PRAGMA page_count").fetchone()[0]
    store.conn().execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError) as raised:
        store.create_tenant("x" * 200_000)
    assert raised.value.sqlite_errorname == "SQLITE_FULL"
    caplog.set_level(logging.WARNING)
    # Through the API: write until the pages left are used up.
    for i in range(100):
        ips = [f"198.{18 + i // 50}.{(i % 50) * 5 + j}.0/24" for j in range(5)]
        r = client.post("/v1/peers", headers=h, json={"tenant": "acme", "public_key": new_key(),
                                                      "allowed_ips": ips, "name": "x" * 120})
        if r.status_code != 201:
            break
    assert r.status_code == 507 and r.json["error"] == "storage_full", r.json
    assert "database or disk is full" in caplog.text
    assert "no transaction is active" not in caplog.text
    store.conn().execute("PRAGMA max_page_count = 1073741823")
    r = client.post("/v1/peers", headers=h, json={"tenant": "acme", "public_key": new_key(),
                                                  "allowed_ips": ["203.0.113.0/24"]})
    assert r.status_code == 201
    store.close()


def test_healthz_logs_database_errors_and_does_not_show_them(app, client, monkeypatch, caplog):
    store = app.extensions["wgjit_store"]
    secret = "could not open /srv/wgjit/registry.db: password authentication failed for wgjit"

    def down():
        raise store.errors[0](secret)

    monkeypatch.setattr(store, "schema_version", down)
    caplog.set_level(logging.WARNING)
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json == {"status": "error", "error": "database_unavailable",
                      "message": "the database is not answering"}
    assert secret in caplog.text


def test_unexpected_errors_name_nothing(app, client, db, monkeypatch):
    h = {"Authorization": f"Bearer {make_token(db, 'admin')}"}
    store = app.extensions["wgjit_store"]

    def boom(*_a, **_k):
        raise store.errors[0]("relation \"tenants\" does not exist at /var/lib/...")

    monkeypatch.setattr(store, "list_tenants", boom)
    r = client.get("/v1/tenants", headers=h)
    assert r.status_code == 500 and r.json == errors.INTERNAL

