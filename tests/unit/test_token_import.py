"""Operator-held tokens: `wgjit token generate` makes one, `token import` stores its hash."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.registry import tokens
from appliance.registry.store import open_store

WGJIT = [sys.executable, "-m", "appliance"]


@pytest.fixture
def conn(tmp_path):
    store = open_store(tmp_path / "r.db")
    store.migrate()
    yield store
    store.close()


def test_imported_token_verifies_with_its_scope(conn):
    t = tokens.generate()
    assert tokens.import_token(conn, t, "gateway", "deploy") == "added"
    got = tokens.verify(conn, t)
    assert got is not None and got.scope == "gateway"
    assert tokens.import_token(conn, t, "gateway") == "present"  # idempotent


def test_import_refuses_clashes_malformed_and_revoked(conn):
    t = tokens.generate()
    tokens.import_token(conn, t, "admin")
    with pytest.raises(ValueError, match="taken"):
        tokens.import_token(conn, t, "gateway")  # same id, other scope
    other = t.rsplit("_", 1)[0] + "_" + "x" * 43  # same id, other secret
    with pytest.raises(ValueError, match="taken"):
        tokens.import_token(conn, other, "admin")
    with pytest.raises(ValueError, match="form"):
        tokens.import_token(conn, "wgj_abc_short", "admin")
    assert tokens.revoke(conn, t.split("_")[1])
    with pytest.raises(ValueError, match="revoked"):
        tokens.import_token(conn, t, "admin")
    assert tokens.verify(conn, t) is None


def test_cli_generate_then_import(tmp_path):
    tok, dbf = tmp_path / "t", tmp_path / "r.db"
    subprocess.run([*WGJIT, "token", "generate", "--output", str(tok)], check=True,
                   capture_output=True)
    assert oct(tok.stat().st_mode & 0o777) == "0o600"
    p = subprocess.run([*WGJIT, "token", "import", "--db", str(dbf), "--scope", "gateway",
                        "--token-file", str(tok)], capture_output=True, text=True)
    assert p.returncode == 0 and "imported gateway token" in p.stdout
    assert tok.read_text().strip() not in p.stdout + p.stderr
    p = subprocess.run([*WGJIT, "token", "import", "--db", str(dbf), "--scope", "gateway",
                        "--token-file", str(tok)], capture_output=True, text=True)
    assert p.returncode == 0 and "already present" in p.stdout
