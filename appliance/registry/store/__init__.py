"""The registry's storage: one interface, one module per engine owning every query.

`open_store(db)` picks the engine from the `--db` value: a path is SQLite (the
embedded default, `sqlite.py`), a `postgresql://` URL is PostgreSQL
(`postgres.py`, for several registry servers over one database). The API,
the CLI and the bulk tools only ever call the methods below.

Every peer write appends to the change feed in the same transaction, and each
engine guarantees that cursors become visible in order (a follower that has
read cursor N never later finds a committed N-1): see each engine's
`_record_change`.
"""

from __future__ import annotations

import abc
import os
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from appliance.registry.cidr import Net

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Conflict(Exception):
    """A write the data forbids (duplicate key, overlapping networks, ...).

    `field` names the request field at fault. When the clash is with data of
    tenant `owner`, `masked` is the message for a caller confined to another
    tenant: it must not learn which network, peer or tenant holds the address.
    """

    def __init__(self, error: str, message: str, *, field: str | None = None,
                 owner: int | None = None, masked: str | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.field = field
        self.owner = owner
        self.masked = masked


class Overlap(NamedTuple):
    """A stored network that overlaps one being written, and the tenant holding it."""
    cidr: str
    tenant_id: int


def overlap_conflict(net: Net, clash: Overlap, tenant_id: int,
                     where: str = "allowed_ips") -> Conflict:
    """The 409 for `net` (being written to tenant `tenant_id`) overlapping `clash`."""
    scope = "in this tenant" if clash.tenant_id == tenant_id else "in another tenant"
    return Conflict("allowed_ip_overlap",
                    f"{where}: {net.cidr} overlaps {clash.cidr} of another peer {scope}",
                    field="allowed_ips", owner=clash.tenant_id,
                    masked=f"{where}: {net.cidr} overlaps a network already registered")


class DatabaseURLError(ValueError):
    """A --db value or password file that cannot be used; the message says why."""


class NewPeer(NamedTuple):
    public_key: str
    allowed_ips: list[Net]
    name: str | None = None
    preshared_key: str | None = None


# "Leave this field alone" in update_peer (None means "clear it").
UNSET: Any = object()

# Peers per statement batch in a bulk insert: bounds the rows held in memory.
BULK_CHUNK = 20_000


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Store(abc.ABC):
    """Everything the registry keeps. Methods are safe to call from several threads."""

    #: Exceptions meaning "the database is not answering" (healthz turns them into 503).
    errors: tuple[type[BaseException], ...] = ()

    def failure(self, exc: BaseException) -> str | None:
        """What a database exception means for the API: "busy" (a lock or connection
        was not had in time: try again soon), "full" (out of disk), else None."""
        return None

    # schema

    @abc.abstractmethod
    def migrate(self, target: int | None = None) -> int:
        """Bring the schema up to `target` (default: the latest); returns the version.
        Safe to run from several processes at once."""

    @abc.abstractmethod
    def schema_version(self) -> int: ...

    @abc.abstractmethod
    def feed_id(self) -> str:
        """A random id of this database's change feed (cursors restart with a new one)."""

    # tenants

    @abc.abstractmethod
    def tenant_id(self, name: str) -> int | None: ...

    @abc.abstractmethod
    def create_tenant(self, name: str) -> dict:
        """Raises Conflict("tenant_exists") when the name is taken."""

    @abc.abstractmethod
    def list_tenants(self, only_id: int | None = None) -> list[dict]:
        """Tenants by name with `id`, `name`, `created_at` and their `peers` count."""

    @abc.abstractmethod
    def get_tenant(self, name: str) -> dict | None: ...

    @abc.abstractmethod
    def delete_tenant(self, name: str) -> None:
        """Raises Conflict when it still has peers or tokens, LookupError when absent."""

    # peers

    @abc.abstractmethod
    def create_peer(self, tenant: str, public_key: str, nets: list[Net], name: str | None,
                    preshared_key: str | None) -> int:
        """Returns the new peer's id; LookupError for an unknown tenant, Conflict for a
        key that exists or a network overlapping another peer's in any tenant."""

    @abc.abstractmethod
    def update_peer(self, public_key: str, *, nets: list[Net] | None, name: Any = UNSET,
                    preshared_key: Any = UNSET, expect_tenant: int | None = None) -> None: ...

    @abc.abstractmethod
    def set_revoked(self, public_key: str, revoked: bool,
                    expect_tenant: int | None = None) -> bool:
        """Revoke or restore; False when it already was in that state."""

    @abc.abstractmethod
    def delete_peer(self, public_key: str, expect_tenant: int | None = None) -> None: ...

    @abc.abstractmethod
    def get_peer(self, public_key: str) -> dict | None:
        """The admin view of a peer (with `tenant_id`); the preshared key is never shown."""

    @abc.abstractmethod
    def list_peers(self, after: int, limit: int, tenant_ids: Iterable[int] = (),
                   revoked: bool | None = None) -> tuple[list[dict], int | None]:
        """Keyset page of peers with id > `after` in id order, restricted to every
        tenant in `tenant_ids`; returns the page and the cursor of the next one."""

    @abc.abstractmethod
    def find_overlap(self, net: Net) -> Overlap | None:
        """A stored network of any tenant that overlaps `net`, if there is one.

        Across all tenants: every gateway today carries every tenant's peers on
        one interface, where an allowed IP goes to whichever peer set it last.
        Once gateways serve pools of tenants, uniqueness per pool would do."""

    @abc.abstractmethod
    def bulk_create_peers(self, tenant: str, peers: Iterable[NewPeer],
                          batch: int | None = BULK_CHUNK,
                          progress: Callable[[int], None] | None = None) -> int:
        """Create many peers with the API's checks; returns how many.

        `batch` peers go in per transaction, or all in one (all or nothing) with
        batch=None; `progress` hears the running total after each commit.
        """

    # what gateways read

    # `tenants` below is the set of tenant names a limited token may see (None:
    # every tenant); whatever lies outside it looks as if it did not exist.

    @abc.abstractmethod
    def gateway_lookup(self, public_key: str, tenants: frozenset[str] | None) -> dict | None:
        """What a gateway installs for a canonical key; None when unknown, revoked or
        outside `tenants`. The hottest call: one round trip."""

    @abc.abstractmethod
    def gateway_lookup_many(self, public_keys: list[str],
                            tenants: frozenset[str] | None) -> dict[str, dict]:
        """gateway_lookup for several canonical keys in one query: {key: peer} for the
        keys found (active, within `tenants`); the others are simply absent."""

    @abc.abstractmethod
    def changes(self, since: int, limit: int, tenants: frozenset[str] | None = None,
                hide_activity: bool = False) -> dict:
        """Feed page after `since`: changes, cursor, latest, earliest, more, feed_id,
        and the digests cursor_digest, since_digest, latest_digest.

        With `tenants`, only their changes are shown. For a gateway's pool the
        cursor still moves past the others (a page that is not `more` ends at the
        latest cursor read before its rows), so a limited gateway does not rescan
        them on every poll, and earliest/latest are the whole feed's. With
        `hide_activity` (a tenant-limited admin token, which must not learn how
        busy other tenants are) earliest, latest and the cursor are counted within
        `tenants` instead.
        """

    @abc.abstractmethod
    def active_keys(self, tenants: frozenset[str] | None = None,
                    hide_activity: bool = False) -> tuple[int, list[str]]:
        """(the feed's latest cursor, every active peer's public key within `tenants`);
        with `hide_activity` the cursor is the latest of `tenants`' changes.

        The cursor is read first: a key created after it is in the feed from that
        cursor on, whether or not the key list caught it too.
        """

    # tokens (the hashing and format live in tokens.py)

    @abc.abstractmethod
    def add_token(self, token_id: str, digest: bytes, scope: str, tenant: str | None,
                  name: str | None, pool: Sequence[str] = ()) -> None:
        """ValueError for an unknown tenant; Conflict("token_exists") for a taken id.
        `pool`: tenant names a gateway token is limited to (need not exist yet)."""

    @abc.abstractmethod
    def get_token(self, token_id: str) -> dict | None:
        """id, hash, scope, tenant_id, tenant (name), name, pool (sorted names), revoked_at."""

    @abc.abstractmethod
    def set_token_limits(self, token_id: str, name: str | None, pool: list[str]) -> None:
        """Rename a token and replace its pool."""

    @abc.abstractmethod
    def revoke_token(self, token_id: str) -> bool: ...

    @abc.abstractmethod
    def list_tokens(self) -> list[dict]:
        """id, scope, tenant, name, pool, created_at, revoked_at; oldest first."""

    # service

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """active, revoked, tenants, latest (feed cursor), changes (rows kept)."""

    @abc.abstractmethod
    def end_request(self) -> None:
        """Called after each request: nothing may stay open in a kept connection."""

    @abc.abstractmethod
    def close(self) -> None: ...


def is_postgres(db: str | os.PathLike[str]) -> bool:
    return str(db).startswith(POSTGRES_SCHEMES)


def check_url(url: str) -> None:
    """A PostgreSQL URL must not carry a password: argv and logs are readable by others."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if parts.password is not None or "password" in query:
        raise DatabaseURLError(
            "--db: the PostgreSQL URL holds a password, which would show in the process"
            " list and logs; put it in a 0600 file and pass --db-password-file FILE"
            " (or use PGPASSFILE)")


def open_store(db: str | os.PathLike[str], password_file: str | None = None,
               pool_size: int | None = None, **options: Any) -> Store:
    """The store for a --db value; `options` go to the engine (e.g. SQLite's cache_kib).
    `pool_size` caps PostgreSQL connections per process (SQLite keeps one per thread)."""
    if is_postgres(db):
        check_url(str(db))
        from appliance.registry.store.postgres import PostgresStore

        if pool_size is not None:
            options["pool_size"] = pool_size
        return PostgresStore(str(db), password_file, **options)
    if password_file is not None:
        raise DatabaseURLError("--db-password-file is for PostgreSQL; --db is a SQLite path")
    from appliance.registry.store.sqlite import SqliteStore

    return SqliteStore(str(db), **options)


def database_errors() -> tuple[type[BaseException], ...]:
    """What either engine raises when its database fails (for one-line CLI errors)."""
    import sqlite3

    from appliance.registry.store.postgres import PostgresStore

    return (sqlite3.Error, *PostgresStore.errors)


def current() -> Store:
    """The store of the Flask app handling this request."""
    from flask import current_app

    return current_app.extensions["wgjit_store"]
