"""The bulk import path (benchmarks, migrations from other registries)."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.registry import cidr
from appliance.registry.store import Conflict, NewPeer
from tests.registry.conftest import new_key


def net(text: str) -> cidr.Net:
    return cidr.parse(text)


def peer(*nets: str) -> NewPeer:
    return NewPeer(new_key(), [net(n) for n in nets])


@pytest.fixture
def conn(store):
    store.create_tenant("t")
    return store


def count(conn) -> int:
    return conn.stats()["active"]


def test_bulk_import_is_like_the_api(conn):
    rows = [peer(f"198.18.0.{i}/32", f"fd00::{i}/128") for i in range(1, 201)]
    assert conn.bulk_create_peers("t", rows, batch=64) == 200
    assert count(conn) == 200
    feed = conn.changes(0, 1000)["changes"]
    assert [c["op"] for c in feed] == ["create"] * 200
    assert [c["public_key"] for c in feed] == [r.public_key for r in rows]  # import order
    stored = conn.get_peer(rows[7].public_key)
    assert stored["allowed_ips"] == ["198.18.0.8/32", "fd00::8/128"]
    # The API's overlap check sees what the import stored.
    assert conn.find_overlap(net("198.18.0.0/24")) is not None


@pytest.mark.parametrize("clash", ["198.18.0.5/32", "198.18.0.0/29", "198.18.1.128/25",
                                   "198.18.0.0/16"])
def test_overlap_with_stored_ranges_is_refused(conn, clash):
    conn.bulk_create_peers("t", [peer("198.18.0.4/30"),
                                        peer("198.18.1.0/24")])
    with pytest.raises(Conflict):
        conn.bulk_create_peers("t", [peer(clash)])
    assert count(conn) == 2


def test_overlap_inside_one_import_is_refused_and_nothing_is_written(conn):
    rows = [peer("198.18.2.0/24"), peer("198.18.2.9/32")]
    with pytest.raises(Conflict):
        conn.bulk_create_peers("t", rows)
    assert count(conn) == 0


def test_ranges_past_the_top_and_in_gaps_are_accepted(conn):
    conn.bulk_create_peers("t", [peer("198.18.0.4/30"),
                                        peer("198.18.1.0/24")])
    conn.bulk_create_peers("t", [peer("198.18.0.8/29"),
                                        peer("198.18.2.0/24")])
    assert count(conn) == 4


def test_one_transaction_is_all_or_nothing(conn):
    # The clash sits in the third chunk: the two before it must not stay.
    rows = [peer(f"198.18.0.{i}/32") for i in range(1, 120)] + [peer("198.18.0.0/24")]
    seen = []
    with pytest.raises(Conflict):
        conn.bulk_create_peers("t", rows, batch=None, progress=seen.append)
    assert count(conn) == 0
    assert conn.stats()["changes"] == 0
    assert seen == []


def test_batches_keep_what_was_committed(conn):
    rows = [peer(f"198.18.0.{i}/32") for i in range(1, 101)] + [peer("198.18.0.0/24")]
    seen = []
    with pytest.raises(Conflict):
        conn.bulk_create_peers("t", rows, batch=50, progress=seen.append)
    assert seen == [50, 100]
    assert count(conn) == 100


def test_duplicate_keys_are_named(conn):
    first = peer("198.18.0.1/32")
    conn.bulk_create_peers("t", [first])
    again = NewPeer(first.public_key, [net("198.18.0.2/32")])
    with pytest.raises(Conflict, match=first.public_key.replace("+", r"\+")) as e:
        conn.bulk_create_peers("t", [peer("198.18.0.3/32"), again])
    assert e.value.error == "peer_exists" and "already exists" in e.value.message
    twice = peer("198.18.0.9/32")
    with pytest.raises(Conflict, match="twice"):
        conn.bulk_create_peers("t", [twice, NewPeer(twice.public_key,
                                                                 [net("198.18.0.10/32")])])
    assert count(conn) == 1


def test_preshared_key_and_name_are_stored(conn):
    psk = new_key()
    row = NewPeer(new_key(), [net("198.18.0.1/32")], "laptop", psk)
    conn.bulk_create_peers("t", [row])
    stored = conn.get_peer(row.public_key)
    assert stored["name"] == "laptop" and stored["has_preshared_key"] is True
    assert conn.gateway_lookup(row.public_key, None)["preshared_key"] == psk


# Two writers adding the same key at the same time, the second arriving between
# an all-or-nothing import's chunks. Whatever the engine, one of them stores
# the key, the other is refused with a clear conflict, and nobody waits forever.


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one peer, so a test can act between them."""
    from appliance.registry.store import postgres, sqlite

    monkeypatch.setattr(postgres, "BULK_CHUNK", 1)
    monkeypatch.setattr(sqlite, "BULK_CHUNK", 1)


def wait_until_waiting_or_done(store, engine: str, writer: threading.Thread) -> None:
    """Until `writer` finished or (PostgreSQL) some session waits for a lock.
    SQLite shows no lock waits: a writer there waits for the one write lock,
    so a short pause lets it get that far."""
    if engine == "sqlite":
        writer.join(timeout=0.5)
        return
    import psycopg

    deadline = time.monotonic() + 20
    with psycopg.connect(store.url, autocommit=True) as db:
        while writer.is_alive() and time.monotonic() < deadline:
            if db.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                          " AND datname = current_database()").fetchone():
                return
            time.sleep(0.02)


def outcome(call) -> str:
    try:
        call()
    except Conflict as e:
        return e.error
    return "stored"


def test_import_and_api_create_of_the_same_key_do_not_deadlock(conn, engine, small_chunks):
    conn.create_tenant("other")
    contested = peer("198.18.0.3/32")
    api_result: list[str] = []
    api = threading.Thread(target=lambda: api_result.append(outcome(
        lambda: conn.create_peer("other", contested.public_key, [net("198.18.1.3/32")],
                                 None, None))))

    def rows():
        yield peer("198.18.0.1/32")
        yield peer("198.18.0.2/32")
        api.start()  # after the import's first chunks, before the one with the key
        wait_until_waiting_or_done(conn, engine, api)
        yield contested
        yield peer("198.18.0.4/32")

    imported = outcome(lambda: conn.bulk_create_peers("t", rows(), batch=None))
    api.join(timeout=30)
    assert not api.is_alive()
    # Exactly one writer stored the key; the other was told it exists. (Before
    # the fix PostgreSQL broke a deadlock here and one side got its error.)
    assert sorted([imported, *api_result]) == ["peer_exists", "stored"]
    winner = "t" if imported == "stored" else "other"
    assert conn.get_peer(contested.public_key)["tenant"] == winner
    # All or nothing: a refused import left none of its peers.
    assert conn.get_tenant("t")["peers"] == (4 if imported == "stored" else 0)
    feed = conn.changes(0, 100)["changes"]
    assert [c["cursor"] for c in feed] == list(range(1, len(feed) + 1))  # no gaps
    assert len(feed) == conn.stats()["active"]


def test_import_and_network_update_of_one_of_its_keys_do_not_deadlock(conn, engine,
                                                                        small_chunks):
    """An update with networks locks its peer and the addresses before it writes
    the peer's row: a new row version would make the import, which holds the
    address lock, wait for the update while the update waits for that lock."""
    conn.create_tenant("other")
    key = new_key()
    conn.create_peer("other", key, [net("198.18.1.3/32")], None, None)
    api_result: list[str] = []
    api = threading.Thread(target=lambda: api_result.append(outcome(
        lambda: conn.update_peer(key, nets=[net("198.18.1.4/32")], name="moved"))))

    def rows():
        yield peer("198.18.0.1/32")
        api.start()  # after the import's first chunk, before the one with the key
        wait_until_waiting_or_done(conn, engine, api)
        yield NewPeer(key, [net("198.18.0.2/32")])

    imported = outcome(lambda: conn.bulk_create_peers("t", rows(), batch=None))
    api.join(timeout=30)
    assert not api.is_alive()
    assert (imported, api_result) == ("peer_exists", ["stored"])
    stored = conn.get_peer(key)
    assert (stored["tenant"], stored["name"], stored["allowed_ips"]) == \
        ("other", "moved", ["198.18.1.4/32"])
    assert conn.get_tenant("t")["peers"] == 0


def test_two_imports_of_the_same_keys_in_opposite_orders(conn, engine, small_chunks):
    """Each would hold the key the other needs next, were they to run at once.
    They take turns instead (PostgreSQL's address lock, SQLite's one writer):
    the second finds a key stored, is refused and keeps nothing."""
    conn.create_tenant("other")
    a, b = new_key(), new_key()
    first_copied = threading.Event()
    results: dict[str, str] = {}

    def first_rows():
        yield NewPeer(a, [net("198.18.0.1/32")])
        first_copied.set()
        yield NewPeer(new_key(), [net("198.18.0.2/32")])  # a's chunk is in now
        second_copied.wait(timeout=2)
        yield NewPeer(b, [net("198.18.0.3/32")])

    second_copied = threading.Event()

    def second_rows():
        first_copied.wait(timeout=2)
        yield NewPeer(b, [net("198.18.1.1/32")])
        yield NewPeer(new_key(), [net("198.18.1.2/32")])  # b's chunk is in now
        second_copied.set()
        wait_until_waiting_or_done(conn, engine, first)
        yield NewPeer(a, [net("198.18.1.3/32")])

    first = threading.Thread(target=lambda: results.__setitem__("t", outcome(
        lambda: conn.bulk_create_peers("t", first_rows(), batch=None))))
    first.start()
    results["other"] = outcome(lambda: conn.bulk_create_peers("other", second_rows(),
                                                              batch=None))
    first.join(timeout=60)
    assert not first.is_alive()
    assert sorted(results.values()) == ["peer_exists", "stored"], results
    winner = next(t for t, r in results.items() if r == "stored")
    loser = "other" if winner == "t" else "t"
    assert conn.get_peer(a)["tenant"] == conn.get_peer(b)["tenant"] == winner
    assert conn.get_tenant(winner)["peers"] == 3 and conn.get_tenant(loser)["peers"] == 0
