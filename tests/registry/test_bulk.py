"""The bulk import path (benchmarks, migrations from other registries)."""

from __future__ import annotations

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
    assert [c["op"] for c in conn.changes(0, 1000)["changes"]] == ["create"] * 200
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
