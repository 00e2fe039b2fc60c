"""`wgjit registry import`: JSON Lines into the database with the API's checks."""

from __future__ import annotations

import io
import json
import re
import subprocess

import pytest

from appliance.registry import importer
from appliance.registry.client import RegistryClient, RegistryError
from appliance.registry.store import open_store
from tests.conftest import WGJIT, make_token
from tests.registry.conftest import new_key


def line(key: str, *ips: str, **extra: str) -> str:
    return json.dumps({"public_key": key, "allowed_ips": list(ips), **extra})


def test_lines_become_peers_and_comments_are_skipped():
    key, psk = new_key(), new_key()
    text = ["# exported 2026-11-25", "", line(key, "198.18.0.1/32", "FD00::1/128",
                                              name="laptop", preshared_key=psk)]
    (peer,) = importer.parse_lines(text)
    assert peer.public_key == key and peer.name == "laptop" and peer.preshared_key == psk
    assert [n.cidr for n in peer.allowed_ips] == ["198.18.0.1/32", "fd00::1/128"]


@pytest.mark.parametrize("bad, words", [
    ("{not json", "line 2:"),
    ("[1, 2]", "JSON object"),
    (line("AAAA", "198.18.0.2/32"), "public_key"),
    (line(new_key(), "198.18.0.3/24"), "allowed_ips[0]"),
    (line(new_key(), "198.18.0.0/24", "198.18.0.9/32"), "overlaps"),
    (line(new_key()), "allowed_ips"),
    (json.dumps({"public_key": new_key(), "allowed_ips": ["198.18.0.4/32"], "tenant": "x"}),
     "tenant: unknown field"),
])
def test_bad_lines_name_the_line_and_the_field(bad, words):
    with pytest.raises(importer.ImportError_, match="^line 2: ") as e:
        list(importer.parse_lines([line(new_key(), "198.18.0.1/32"), bad]))
    assert words in str(e.value)


def test_bytes_that_are_not_utf8_are_refused():
    raw = (line(new_key(), "198.18.0.1/32") + "\n").encode() + b'{"name": "\xff"}\n'
    with pytest.raises(importer.ImportError_, match="not UTF-8"):
        list(importer.parse_lines(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")))


def wgjit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_import_then_serve(registry_server, db, tmp_path):
    dbfile = db
    store = open_store(db)
    store.migrate()
    store.create_tenant("acme")
    store.close()
    keys = [new_key() for _ in range(500)]
    psk = new_key()
    src = tmp_path / "peers.jsonl"
    src.write_text("\n".join(
        line(k, f"198.18.{i // 250}.{i % 250 + 1}/32", f"fd00::{i + 1}/128",
             **({"preshared_key": psk} if i == 7 else {}))
        for i, k in enumerate(keys)) + "\n")

    r = wgjit("registry", "import", "--db", str(dbfile), "--tenant", "acme", str(src))
    assert r.returncode == 0, r.stderr
    assert "imported 500 peers" in r.stdout
    assert psk not in r.stdout + r.stderr

    # A key that is already there is named, and the rest of its file stays out.
    again = tmp_path / "again.jsonl"
    again.write_text(line(new_key(), "198.18.8.1/32") + "\n" + line(keys[3], "198.18.8.2/32"))
    r = wgjit("registry", "import", "--db", str(dbfile), "--tenant", "acme", str(again))
    assert r.returncode == 1
    assert f"{keys[3]}: a peer with this key already exists" in r.stderr
    assert "nothing was imported" in r.stderr

    # An overlap deep in the file, all or nothing: nothing of it stays.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([line(new_key(), f"198.18.9.{i}/32") for i in range(1, 40)]
                             + [line(new_key(), "198.18.0.0/30")]) + "\n")
    r = wgjit("registry", "import", "--db", str(dbfile), "--tenant", "acme", str(bad))
    # Three stored addresses overlap it; an engine may name any of them.
    assert r.returncode == 1, r.stderr
    assert re.search(r"198\.18\.0\.0/30 overlaps 198\.18\.0\.[123]/32", r.stderr), r.stderr
    r = wgjit("registry", "import", "--db", str(dbfile), "--tenant", "nope", str(bad))
    assert r.returncode == 1 and "no tenant 'nope'" in r.stderr

    srv = registry_server(dbfile)
    gw = RegistryClient(srv.url, make_token(dbfile, "gateway"))
    got = gw.gateway_peer(keys[7])
    assert got["allowed_ips"] == ["198.18.0.8/32", "fd00::8/128"]
    assert got["preshared_key"] == psk
    with pytest.raises(RegistryError):
        gw.gateway_peer(new_key())
    feed = gw.changes(since=0, limit=1000)
    assert [c["op"] for c in feed["changes"]] == ["create"] * 500
    admin = RegistryClient(srv.url, make_token(dbfile, "admin"))
    assert sum(1 for _ in admin.iter_peers("acme")) == 500


def test_batches_report_what_was_kept(db, tmp_path):
    dbfile = db
    store = open_store(db)
    store.migrate()
    store.create_tenant("acme")
    src = tmp_path / "peers.jsonl"
    src.write_text("\n".join([line(new_key(), f"198.18.0.{i}/32") for i in range(1, 31)]
                             + ["{oops"]) + "\n")
    r = wgjit("registry", "import", "--db", str(dbfile), "--tenant", "acme", "--batch", "10",
              str(src))
    assert r.returncode == 1
    assert "line 31" in r.stderr and "30 peers were committed before it" in r.stderr
    assert store.stats()["active"] == 30
    store.close()
