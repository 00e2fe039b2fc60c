"""API tokens: `wgj_<id>_<secret>`, stored as a SHA-256 of the whole token.

The id finds the row; the hash is compared in constant time, so neither the
index lookup nor the comparison leaks how much of a guessed secret was right.

Limits: an admin token may be limited to one tenant; a gateway token (one per
gateway, named after it) may be limited to a pool of tenants, named: a pool may
name a tenant before it is created, as a deploy does. A limited token sees
nothing of the tenants outside its limit (see `visible_tenants`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.registry.store import Conflict, Store

PREFIX = "wgj"
SCOPES = ("admin", "gateway")


@dataclass(frozen=True)
class Token:
    id: str
    scope: str
    tenant_id: int | None
    tenant: str | None
    # A gateway token's pool: the tenants whose peers it may pull (None: every tenant).
    pool: frozenset[str] | None = None

    def visible_tenants(self) -> frozenset[str] | None:
        """The tenants (by name) this token may read peers and changes of; None: all."""
        if self.tenant is not None:
            return frozenset((self.tenant,))
        return self.pool

    def hides_activity(self) -> bool:
        """True for a tenant admin's token: its feed's earliest, latest and cursor
        are its tenant's, so it learns nothing of how busy the others are. A
        gateway's pool follows the whole feed's cursor instead (moving past the
        changes it is not shown): it is the operator's, serving its tenants."""
        return self.tenant is not None


def _pool(scope: str, pool: Iterable[str]) -> list[str]:
    names = sorted(set(pool))
    if names and scope != "gateway":
        raise ValueError("only gateway tokens can be limited to a pool of tenants")
    for name in names:
        if not name or not name.isprintable() or "/" in name:
            raise ValueError(f"tenant {name!r}: not a tenant name")
    return names


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(db: Store, scope: str, tenant: str | None = None, name: str | None = None,
           pool: Iterable[str] = ()) -> str:
    """Create a token and return it; only its hash is kept.

    tenant: limit an admin token to that (existing) tenant; pool: limit a gateway
    token to these tenants.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if tenant is not None and scope != "admin":
        raise ValueError("only admin tokens can be limited to one tenant;"
                         " a gateway token takes a pool of tenants")
    names = _pool(scope, pool)
    token_id = secrets.token_hex(6)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    db.add_token(token_id, _digest(token), scope, tenant, name, names)
    return token


def generate() -> str:
    """A new token, stored nowhere: for operators who keep tokens outside the registry
    (a deploy's secrets) and `import_token` them."""
    return f"{PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def import_token(db: Store, token: str, scope: str, name: str | None = None,
                 pool: Iterable[str] = ()) -> str:
    """Store a token made elsewhere (only its hash), with this name and pool.

    Returns "added", "updated" (it was there with another name or pool, now set to
    these: a deploy whose inventory moved a gateway to another pool) or "present".
    name None keeps the stored name.
    Raises ValueError for a malformed token, a bad scope, or an id already taken by
    another token or revoked: an import never brings a revoked token back.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    names = _pool(scope, pool)
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(parts[2]) < 32:
        raise ValueError(f"not a token of the form {PREFIX}_<id>_<secret of 32+ characters>")
    # Insert first and look only on a clash: two deploys importing the same
    # token at once both end up with "present", never with an error.
    try:
        db.add_token(parts[1], _digest(token), scope, None, name, names)
        return "added"
    except Conflict:
        pass
    row = db.get_token(parts[1])
    if row is None or not hmac.compare_digest(bytes(row["hash"]), _digest(token)) \
            or row["scope"] != scope:
        raise ValueError(f"token id {parts[1]} is taken by another token")
    if row["revoked_at"] is not None:
        raise ValueError(f"token {parts[1]} was revoked and is never brought back;"
                         " give its holder a new token")
    name = row["name"] if name is None else name
    if row["name"] == name and set(row["pool"]) == set(names):
        return "present"
    db.set_token_limits(parts[1], name, names)
    return "updated"


def verify(db: Store, token: str) -> Token | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    row = db.get_token(parts[1])
    # Compare even when the row is missing so both paths cost the same.
    expected = bytes(row["hash"]) if row is not None else b"\0" * 32
    if not hmac.compare_digest(expected, _digest(token)) or row is None:
        return None
    if row["revoked_at"] is not None:
        return None
    return Token(row["id"], row["scope"], row["tenant_id"], row["tenant"],
                 frozenset(row["pool"]) if row["pool"] else None)


def revoke(db: Store, token_id: str) -> bool:
    return db.revoke_token(token_id)


def list_tokens(db: Store) -> list[dict]:
    return db.list_tokens()
