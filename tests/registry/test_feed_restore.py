"""A registry restored from an older copy reuses cursor numbers; the feed must say so.

The real registry (gunicorn) on both engines, and the gateway's own feed
follower and registry client against it; only the WireGuard device is a fake
(tests/lab/test_feed_restore.py runs the same story with wireguard-go).
The restore is real on SQLite (the backup API copies the old pages back into
the live file, under the running server) and a table-by-table copy on
PostgreSQL (what pg_restore --clean --data-only does).
"""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from appliance.gateway.batch import LookupBatcher
from appliance.gateway.cache import CachePolicy, PeerCache
from appliance.gateway.feed import FeedFollower
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.pull import build_gateway_registry
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.state import GatewayState
from appliance.registry import tokens
from appliance.registry.client import RegistryClient, RegistryError
from appliance.registry.store import is_postgres, open_store
from tests.conftest import make_token
from tests.registry.conftest import new_key
from tests.unit.test_evict import FakeDevice, sample

TABLES = ["tenants", "peers", "allowed_ips", "tokens", "token_pools", "changes", "meta"]


class Backup:
    """A copy of the registry database that can be put back over the live one."""

    def __init__(self, db: str, tmp_path) -> None:
        self.db = db
        if is_postgres(db):
            with psycopg.connect(db) as conn:
                self.rows = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}
                self.head = conn.execute("SELECT cursor FROM feed_head").fetchone()[0]
        else:
            self.path = tmp_path / "backup.db"
            with sqlite3.connect(db) as live, sqlite3.connect(self.path) as copy:
                live.backup(copy)

    def restore(self) -> None:
        if is_postgres(self.db):
            with psycopg.connect(self.db) as conn:
                conn.execute(f"TRUNCATE {', '.join(TABLES)}")
                for table, rows in self.rows.items():
                    for row in rows:
                        marks = ", ".join(["%s"] * len(row))
                        conn.execute(f"INSERT INTO {table} VALUES ({marks})", row)
                conn.execute("UPDATE feed_head SET cursor = %s", (self.head,))
        else:
            with sqlite3.connect(self.path) as copy, sqlite3.connect(self.db) as live:
                copy.backup(live)


class Gateway:
    """The gateway's feed path: real registry client, follower, state and cache."""

    def __init__(self, url: str, token: str, tmp_path) -> None:
        self.metrics = GatewayMetrics()
        self.registry = build_gateway_registry([url], token, self.metrics)
        self.dev = FakeDevice()
        self.installer = Installer(self.dev)
        db = tmp_path / "gateway.db"
        self.state = GatewayState(db)
        self.cache = PeerCache(db, LookupBatcher(self.registry.lookup, TokenBucket(100, 100)),
                               CachePolicy())
        self.feed = FeedFollower(self.registry, self.state, self.cache, self.installer,
                                 self.metrics, lambda key, why: None)

    def install(self, key: str) -> None:
        assert self.installer.install(self.registry.peer(key), "192.0.2.50:40000")


def test_a_revocation_on_a_reused_cursor_reaches_the_gateway(registry_server, db,
                                                             tmp_path) -> None:
    srv = registry_server(db)
    admin = RegistryClient(srv.url, make_token(db, "admin"))
    admin.create_tenant("acme")
    a, b = new_key(), new_key()
    admin.create_peer("acme", a, ["198.18.1.1/32"])
    admin.create_peer("acme", b, ["198.18.1.2/32"])
    gw = Gateway(srv.url, make_token(db, "gateway"), tmp_path)
    gw.feed.poll()
    gw.install(a)
    gw.install(b)
    backup = Backup(db, tmp_path)  # cursor 2
    admin.create_peer("acme", new_key(), ["198.18.1.3/32"])
    admin.create_peer("acme", new_key(), ["198.18.1.4/32"])
    gw.feed.poll()
    assert gw.feed.cursor == 4
    backup.restore()  # cursors 3 and 4 are gone; the feed_id is the same
    admin.revoke_peer(b)  # lands on cursor 3 again
    admin.create_peer("acme", new_key(), ["198.18.1.5/32"])  # and 4
    assert admin.request("GET", "/v1/gateway/changes", params={"since": 0}
                         )["latest"] == gw.feed.cursor, "the reuse a cursor alone misses"
    gw.feed.poll()
    assert b not in gw.dev.table and a in gw.dev.table
    assert sample(gw.metrics.reconciles) == 2
    # Followed by digest from the new position on.
    admin.revoke_peer(a)
    assert gw.feed.poll() == 1 and a not in gw.dev.table



def test_a_pool_gateway_follows_other_tenants_cursors_by_digest_and_sees_a_restore(
        registry_server, db, tmp_path) -> None:
    """A gateway limited to acme's pool, its feed interleaved with globex's changes:
    its cursor comes to rest on globex's changes and the digest it keeps is theirs,
    so polling by digest never reconciles for nothing; a restore that reuses the
    cursor it rests on is still caught and the revocation behind it applied."""
    srv = registry_server(db)
    admin = RegistryClient(srv.url, make_token(db, "admin"))
    store = open_store(db)
    try:
        pool_token = tokens.create(store, "gateway", name="gw1", pool=["acme"])
    finally:
        store.close()
    for tenant in ("acme", "globex"):
        admin.create_tenant(tenant)
    ips = (f"198.18.{n // 250}.{n % 250 + 1}/32" for n in range(1000))

    def globex() -> None:
        admin.create_peer("globex", new_key(), [next(ips)])

    def acme() -> str:
        key = new_key()
        admin.create_peer("acme", key, [next(ips)])
        return key

    def head() -> dict:
        page = admin.request("GET", "/v1/gateway/changes", params={"since": 0})
        return page["changes"][-1]

    a, b = acme(), acme()
    globex()
    gw = Gateway(srv.url, pool_token, tmp_path)
    gw.feed.poll()  # first start: one reconcile
    gw.install(a)
    gw.install(b)
    for _ in range(3):
        acme()
        globex()
        globex()
        gw.feed.poll()
        last = head()
        assert last["tenant"] == "globex"
        assert (gw.feed.cursor, gw.state.get("feed_digest")) == (last["cursor"], last["digest"])
    assert sample(gw.metrics.reconciles) == 1, "a false cursor_mismatch or a lost digest"
    c = acme()
    gw.install(c)
    admin.revoke_peer(c)
    globex()
    assert gw.feed.poll() >= 1 and c not in gw.dev.table
    assert sample(gw.metrics.reconciles) == 1

    backup = Backup(db, tmp_path)
    acme()
    globex()
    gw.feed.poll()
    resting = gw.feed.cursor
    assert head()["tenant"] == "globex" and head()["cursor"] == resting
    backup.restore()  # the last two cursors are gone; the feed_id is the same
    admin.revoke_peer(b)  # reuses the first of them
    globex()  # and the one the gateway rests on, for another globex change
    assert head()["cursor"] == resting, "the reuse a cursor alone misses"
    gw.feed.poll()
    assert b not in gw.dev.table and a in gw.dev.table
    assert sample(gw.metrics.reconciles) == 2
    admin.revoke_peer(a)
    globex()
    assert gw.feed.poll() == 1 and a not in gw.dev.table
    assert sample(gw.metrics.reconciles) == 2


def test_the_route_answers_409_for_a_digest_that_names_another_change(
        registry_server, db) -> None:
    srv = registry_server(db)
    admin = RegistryClient(srv.url, make_token(db, "admin"))
    admin.create_tenant("acme")
    admin.create_peer("acme", new_key(), ["198.18.1.1/32"])
    gw = RegistryClient(srv.url, make_token(db, "gateway"))
    page = gw.changes(0)
    change = page["changes"][0]
    assert page["cursor_digest"] == change["digest"] == page["latest_digest"]
    assert gw.changes(1, digest=change["digest"])["changes"] == []
    with pytest.raises(RegistryError) as e:
        gw.changes(1, digest="0" * 16)
    assert e.value.status == 409 and e.value.error == "cursor_mismatch"
    with pytest.raises(RegistryError) as e:
        gw.changes(1, digest="not hex")
    assert e.value.status == 400 and "digest" in e.value.message
    assert gw.changes(1)["changes"] == [], "no digest: nothing checked, as before"
