"""API tokens: `wgj_<id>_<secret>`, stored as a SHA-256 of the whole token.

The id finds the row; the hash is compared in constant time, so neither the
index lookup nor the comparison leaks how much of a guessed secret was right.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass

from appliance.registry import db

PREFIX = "wgj"
SCOPES = ("admin", "gateway")


@dataclass(frozen=True)
class Token:
    id: str
    scope: str
    tenant_id: int | None
    tenant: str | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(conn: sqlite3.Connection, scope: str, tenant: str | None = None,
           name: str | None = None) -> str:
    """Create a token and return it; only its hash is kept."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if tenant is not None and scope != "admin":
        raise ValueError("only admin tokens can be limited to a tenant")
    token_id = secrets.token_hex(6)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    with db.write(conn):
        tenant_id = None
        if tenant is not None:
            row = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
            if row is None:
                raise ValueError(f"tenant {tenant!r} does not exist")
            tenant_id = row["id"]
        conn.execute(
            "INSERT INTO tokens (id, hash, scope, tenant_id, name, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (token_id, _digest(token), scope, tenant_id, name, db.utcnow()),
        )
    return token


def generate() -> str:
    """A new token, stored nowhere: for operators who keep tokens outside the registry
    (a deploy's secrets) and `import_token` them."""
    return f"{PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def import_token(conn: sqlite3.Connection, token: str, scope: str,
                 name: str | None = None) -> bool:
    """Store a token made elsewhere (only its hash). False if it is already there.

    Raises ValueError for a malformed token, a bad scope, or an id already taken by
    another token or revoked: an import never brings a revoked token back.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(parts[2]) < 32:
        raise ValueError(f"not a token of the form {PREFIX}_<id>_<secret of 32+ characters>")
    with db.write(conn):
        row = conn.execute("SELECT hash, scope, revoked_at FROM tokens WHERE id = ?",
                           (parts[1],)).fetchone()
        if row is not None:
            if not hmac.compare_digest(row["hash"], _digest(token)) or row["scope"] != scope:
                raise ValueError(f"token id {parts[1]} is taken by another token")
            if row["revoked_at"] is not None:
                raise ValueError(f"token {parts[1]} was revoked")
            return False
        conn.execute(
            "INSERT INTO tokens (id, hash, scope, tenant_id, name, created_at)"
            " VALUES (?, ?, ?, NULL, ?, ?)",
            (parts[1], _digest(token), scope, name, db.utcnow()),
        )
    return True


def verify(conn: sqlite3.Connection, token: str) -> Token | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    row = conn.execute(
        "SELECT t.id, t.hash, t.scope, t.tenant_id, t.revoked_at, n.name AS tenant"
        " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id WHERE t.id = ?",
        (parts[1],),
    ).fetchone()
    # Compare even when the row is missing so both paths cost the same.
    expected = row["hash"] if row is not None else b"\0" * 32
    if not hmac.compare_digest(expected, _digest(token)) or row is None:
        return None
    if row["revoked_at"] is not None:
        return None
    return Token(row["id"], row["scope"], row["tenant_id"], row["tenant"])


def revoke(conn: sqlite3.Connection, token_id: str) -> bool:
    with db.write(conn):
        cur = conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (db.utcnow(), token_id),
        )
    return cur.rowcount == 1


def list_tokens(conn: sqlite3.Connection) -> list[dict]:
    rows = conn.execute(
        "SELECT t.id, t.scope, n.name AS tenant, t.name, t.created_at, t.revoked_at"
        " FROM tokens t LEFT JOIN tenants n ON n.id = t.tenant_id ORDER BY t.created_at"
    ).fetchall()
    return [dict(r) for r in rows]
