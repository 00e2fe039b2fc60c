"""The bulk import path (benchmarks, migrations from other registries)."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.registry import db, model
from tests.registry.conftest import new_key


def net(text: str):
    return ipaddress.ip_network(text)


@pytest.fixture
def conn(tmp_path):
    c = db.connect(tmp_path / "r.db")
    db.migrate(c)
    model.create_tenant(c, "t")
    yield c
    c.close()


def test_bulk_import_is_like_the_api(conn):
    rows = [(new_key(), [net(f"198.18.0.{i}/32"), net(f"fd00::{i}/128")], None)
            for i in range(1, 201)]
    assert model.bulk_create_peers(conn, "t", rows, batch=64) == 200
    assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 200
    assert conn.execute("SELECT count(*) FROM changes WHERE op = 'create'").fetchone()[0] == 200
    peer = model.get_peer(conn, rows[7][0])
    assert peer["allowed_ips"] == ["198.18.0.8/32", "fd00::8/128"]
    # The API's overlap check sees what the import stored.
    assert model.find_overlap(conn, 1, net("198.18.0.0/24")) is not None


@pytest.mark.parametrize("clash", ["198.18.0.5/32", "198.18.0.0/29", "198.18.1.128/25",
                                   "198.18.0.0/16"])
def test_overlap_with_stored_ranges_is_refused(conn, clash):
    model.bulk_create_peers(conn, "t", [(new_key(), [net("198.18.0.4/30")], None),
                                        (new_key(), [net("198.18.1.0/24")], None)])
    with pytest.raises(model.Conflict):
        model.bulk_create_peers(conn, "t", [(new_key(), [net(clash)], None)])
    assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 2


def test_overlap_inside_one_import_is_refused_and_nothing_is_written(conn):
    rows = [(new_key(), [net("198.18.2.0/24")], None), (new_key(), [net("198.18.2.9/32")], None)]
    with pytest.raises(model.Conflict):
        model.bulk_create_peers(conn, "t", rows)
    assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 0


def test_ranges_past_the_top_and_in_gaps_are_accepted(conn):
    model.bulk_create_peers(conn, "t", [(new_key(), [net("198.18.0.4/30")], None),
                                        (new_key(), [net("198.18.1.0/24")], None)])
    model.bulk_create_peers(conn, "t", [(new_key(), [net("198.18.0.8/29")], None),
                                        (new_key(), [net("198.18.2.0/24")], None)])
    assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 4
