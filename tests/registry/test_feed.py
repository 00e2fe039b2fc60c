"""The change feed under concurrent writers: a follower never skips a committed change.

On PostgreSQL a cursor taken from a sequence before commit could become visible
after a later one; a gateway that read the later cursor would never see the
earlier change. These tests run writers against a follower on both engines.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from appliance.registry import cidr
from appliance.registry.client import RegistryClient
from appliance.registry.store import open_store
from tests.conftest import make_token
from tests.registry.conftest import new_key


class Follower(threading.Thread):
    """Polls the feed in small pages as a gateway would, recording what it saw."""

    def __init__(self, read_page) -> None:
        super().__init__(daemon=True)
        self.read_page = read_page
        self.seen: list[dict] = []
        self.since = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def poll(self) -> bool:
        page = self.read_page(self.since)
        self.seen += page["changes"]
        self.since = page["cursor"]
        return page["more"]

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.poll():
                    time.sleep(0.002)
            while self.poll():  # drain after the writers are done
                pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def assert_exactly_once_in_order(seen: list[dict], expected: Counter) -> None:
    cursors = [c["cursor"] for c in seen]
    assert cursors == list(range(cursors[0], cursors[0] + len(cursors))), "gap or repeat"
    assert Counter((c["op"], c["public_key"]) for c in seen) == expected


@pytest.mark.slow
def test_concurrent_writers_through_gunicorn_follower_sees_every_change_once(
        registry_server, db):
    token = make_token(db, "admin")
    srv = registry_server(db, workers=3)
    RegistryClient(srv.url, token).create_tenant("feed")
    gw = RegistryClient(srv.url, make_token(db, "gateway"))
    follower = Follower(lambda since: gw.changes(since, limit=25))
    follower.start()
    writers, per_writer = 12, 15
    expected: Counter = Counter()
    lock = threading.Lock()

    def write(w: int) -> None:
        client = RegistryClient(srv.url, token)
        for i in range(per_writer):
            key = new_key()
            client.create_peer("feed", key, [f"198.18.{w}.{i}/32"])
            client.revoke_peer(key)
            client.update_peer(key, name=f"w{w}")
            with lock:
                expected.update([("create", key), ("revoke", key), ("update", key)])

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(writers)))
    follower.stop.set()
    follower.join(60)
    assert follower.error is None, follower.error
    assert len(follower.seen) == 3 * writers * per_writer
    assert_exactly_once_in_order(follower.seen, expected)


def test_a_writer_in_flight_holds_back_later_cursors(db, engine, store):
    """Deterministic: a transaction that has taken cursor N and not committed yet
    keeps every later change out of the feed until it commits, so a follower can
    never read N+1 before N."""
    store.create_tenant("t")
    first = new_key()
    store.create_peer("t", first, [cidr.parse("198.18.0.1/32")], None, None)
    in_flight = new_key()
    if engine == "sqlite":
        raw = sqlite3.connect(db, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO changes (op, public_key, tenant, at) VALUES"
                    " ('update', ?, 't', 'x')", (in_flight,))
    else:
        import psycopg

        raw = psycopg.connect(db)  # not autocommit: the transaction stays open
        (cursor,) = raw.execute("UPDATE feed_head SET cursor = cursor + 1"
                                " RETURNING cursor").fetchone()
        raw.execute("INSERT INTO changes (cursor, op, public_key, tenant, at) VALUES"
                    " (%s, 'update', %s, 't', 'x')", (cursor, in_flight))
    later = new_key()
    writer = threading.Thread(target=store.create_peer, args=(
        "t", later, [cidr.parse("198.18.0.2/32")], None, None))
    writer.start()
    writer.join(1.0)
    # The later writer waits for the in-flight one; the feed shows neither.
    assert writer.is_alive()
    reader = open_store(db)
    assert [c["public_key"] for c in reader.changes(0, 100)["changes"]] == [first]
    raw.commit()
    writer.join(30)
    assert not writer.is_alive()
    feed = reader.changes(0, 100)["changes"]
    assert [c["public_key"] for c in feed] == [first, in_flight, later]
    assert [c["cursor"] for c in feed] == [1, 2, 3]
    raw.close()
    reader.close()


def test_concurrent_store_writers_in_threads(db, store):
    """Writers straight on the store (the pool on PostgreSQL, per-thread connections
    on SQLite), racing a follower on its own store."""
    store.create_tenant("t")
    follower_store = open_store(db)
    follower = Follower(lambda since: follower_store.changes(since, 40))
    follower.start()
    expected: Counter = Counter()
    lock = threading.Lock()

    def write(w: int) -> None:
        for i in range(20):
            key = new_key()
            store.create_peer("t", key, [cidr.parse(f"198.18.{w}.{i}/32")], None, None)
            store.set_revoked(key, True)
            with lock:
                expected.update([("create", key), ("revoke", key)])

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(write, range(6)))
    follower.stop.set()
    follower.join(60)
    follower_store.close()
    assert follower.error is None, follower.error
    assert_exactly_once_in_order(follower.seen, expected)
