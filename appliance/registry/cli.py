"""`wgjit registry|token|tenant|peer ...`: serve the registry and talk to it.

`registry serve` and `token ...` work on the database directly (a SQLite file on
the registry host, or PostgreSQL); `tenant` and `peer` talk to the HTTP API like
any client.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from appliance import config, transport
from appliance.config import Option
from appliance.registry.breadth import SHORTEST_PREFIX
from appliance.secrets import read_secret, write_secret

DB_OPTIONS = [Option("db", required=True), Option("db-password-file")]
SERVE_OPTIONS = [
    *DB_OPTIONS,
    Option("listen", default="127.0.0.1:8080", check=config.host_port, metavar="HOST:PORT",
           help="address to serve on"),
    Option("workers", int, 2, check=config.positive, metavar="N",
           help="gunicorn worker processes"),
    Option("threads", int, 4, check=config.positive, metavar="N", help="threads per worker"),
    # No default of its own: --threads' (store/postgres.py says why).
    Option("db-pool-size", int, check=config.positive, metavar="N",
           help="PostgreSQL connections per worker (default: --threads); each registry "
                "server opens up to workers x N"),
    Option("access-log", metavar="FILE", help="access log ('-' for stderr)"),
    Option("tls-cert", metavar="FILE",
           help="serve HTTPS with this PEM certificate (chain); needs --tls-key"),
    Option("tls-key", metavar="FILE", help="its private key (a 0600 PEM file)"),
]
IMPORT_CACHE_KIB = 512 * 1024
CLIENT_OPTIONS = [
    Option("registry", required=True),
    Option("token-file", required=True),
    Option("timeout", float, 10.0, check=config.positive),
    *transport.OPTIONS,
]

BROAD_HELP = (f"accept networks broader than IPv4 /{SHORTEST_PREFIX[4]} or IPv6"
              f" /{SHORTEST_PREFIX[6]} (a default route, say), which draw other peers'"
              " traffic on the shared gateways")


def _settings(args: argparse.Namespace, options: list[Option], section: str) -> dict:
    return config.resolve(options, vars(args), config.read_config_file(args.config), section)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")


def _add_client(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--registry", metavar="URL", help="registry base URL (WGJIT_REGISTRY)")
    p.add_argument("--token-file", metavar="FILE", help="0600 file holding an admin token")
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    transport.add_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _client(args: argparse.Namespace):
    from appliance.registry.client import RegistryClient

    s = _settings(args, CLIENT_OPTIONS, "client")
    transport.check_urls([s["registry"]], s["allow_insecure_http"])
    token = read_secret(s["token_file"], what="token")
    return RegistryClient(s["registry"], token, timeout=s["timeout"], ca_file=s["registry_ca"])


def _open_store(s: dict, **options):
    """The store for the resolved --db/--db-password-file."""
    from appliance.registry.store import open_store

    return open_store(s["db"], s["db_password_file"], **options)


def _with_db_errors(func):
    """A bad --db or password file exits 2, a database that fails exits 1; both
    with one line naming the problem, never a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from appliance.registry.store import DatabaseURLError, database_errors
        from appliance.secrets import SecretFileError

        try:
            return func(args) or 0
        except (DatabaseURLError, SecretFileError) as e:
            print(f"wgjit: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            if not isinstance(e, database_errors()):
                raise
            detail = " ".join(str(e).split())
            print(f"wgjit: database: {detail}", file=sys.stderr)
            return 1

    return wrapper


def _add_db(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--db", metavar="PATH|URL",
                   help="SQLite file (created if missing) or postgresql://[USER@]HOST[:PORT]/DB")
    p.add_argument("--db-password-file", metavar="FILE",
                   help="0600 file holding the PostgreSQL password (else PGPASSFILE)")


def _print(args: argparse.Namespace, obj: object, text: str) -> None:
    print(json.dumps(obj, indent=2) if args.json else text)


def _peer_line(p: dict) -> str:
    state = "revoked" if p["revoked"] else "active"
    return (f"{p['public_key']}  {p['tenant']}  {state}  {','.join(p['allowed_ips'])}"
            f"  {p.get('name') or ''}").rstrip()


def _with_api_errors(func):
    def wrapper(args: argparse.Namespace) -> int:
        from appliance.registry.client import RegistryError
        from appliance.secrets import SecretFileError

        try:
            return func(args) or 0
        except RegistryError as e:
            print(f"wgjit: {e}", file=sys.stderr)
            return 1
        except SecretFileError as e:
            print(f"wgjit: {e}", file=sys.stderr)
            return 2

    return wrapper


# registry

@_with_db_errors
def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.registry.serve import check_tls, serve

    s = _settings(args, SERVE_OPTIONS, "registry")
    tls = check_tls(s["tls_cert"], s["tls_key"])
    _open_store(s).close()  # a bad --db or password file is refused before gunicorn starts
    serve(s["db"], s["listen"], s["workers"], s["threads"], s["access_log"],
          s["db_password_file"], tls=tls, db_pool_size=s["db_pool_size"])
    return 0


@_with_db_errors
def cmd_migrate(args: argparse.Namespace) -> int:
    store = _open_store(_settings(args, DB_OPTIONS, "registry"))
    try:
        version = store.migrate()
    except RuntimeError as e:  # a schema newer than this wgjit: leave it alone
        print(f"wgjit: registry migrate: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"schema version {version}")
    return 0


@_with_db_errors
def cmd_import(args: argparse.Namespace) -> int:
    import time

    from appliance.registry import importer
    from appliance.registry.store import Conflict, is_postgres

    s = _settings(args, DB_OPTIONS, "registry")
    if args.batch is not None and args.batch < 1:
        print("wgjit: import: --batch must be at least 1", file=sys.stderr)
        return 2
    # A million peers' key index outgrows SQLite's serving cache; this
    # connection is short-lived, so it may hold more of it.
    store = _open_store(s, **({} if is_postgres(s["db"]) else {"cache_kib": IMPORT_CACHE_KIB}))
    store.migrate()
    committed = 0

    def note(count: int) -> None:
        nonlocal committed
        committed = count

    started = time.monotonic()
    try:
        with sys.stdin if args.file == "-" else open(args.file, encoding="utf-8") as f:
            count = store.bulk_create_peers(args.tenant, importer.parse_lines(
                                                f, allow_broad=args.allow_broad),
                                            batch=args.batch, progress=note)
    except OSError as e:
        print(f"wgjit: import: {e}", file=sys.stderr)
        return 2
    except (importer.ImportError_, Conflict, LookupError) as e:
        problem = f"no tenant {args.tenant!r}" if isinstance(e, LookupError) else \
            getattr(e, "message", str(e))
        kept = f"{committed} peers were committed before it" if args.batch else \
            "nothing was imported"
        print(f"wgjit: import: {problem}; {kept}", file=sys.stderr)
        return 1
    finally:
        store.close()
    elapsed = time.monotonic() - started
    print(f"imported {count} peers into tenant {args.tenant} in {elapsed:.1f} s")
    return 0


# tokens

def _token_limits(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """--tenant: an admin token's one tenant, or a gateway token's pool (repeatable)."""
    given = args.tenant or []
    if args.scope == "admin":
        if len(given) > 1:
            raise ValueError("--tenant: an admin token is limited to one tenant")
        return (given[0] if given else None), []
    return None, given


@_with_db_errors
def cmd_token_create(args: argparse.Namespace) -> int:
    from appliance.registry import tokens

    store = _open_store(_settings(args, DB_OPTIONS, "registry"))
    try:
        tenant, pool = _token_limits(args)
        store.migrate()
        token = tokens.create(store, args.scope, tenant, args.name, pool)
    except ValueError as e:
        print(f"wgjit: token create: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.output:
        write_secret(args.output, token)
        print(f"token written to {args.output} (mode 0600)")
    else:
        print(token)
    return 0


def cmd_token_generate(args: argparse.Namespace) -> int:
    from appliance.registry import tokens

    token = tokens.generate()
    if args.output:
        write_secret(args.output, token)
        print(f"token written to {args.output} (mode 0600)")
    else:
        print(token)
    return 0


@_with_db_errors
def cmd_token_import(args: argparse.Namespace) -> int:
    from appliance.registry import tokens
    from appliance.secrets import SecretFileError

    s = _settings(args, DB_OPTIONS, "registry")
    try:
        token = read_secret(args.token_file, what="token")
    except SecretFileError as e:
        print(f"wgjit: token import: {e}", file=sys.stderr)
        return 2
    if args.tenant and args.scope != "gateway":
        print("wgjit: token import: --tenant: only a gateway token's pool can be imported",
              file=sys.stderr)
        return 2
    store = _open_store(s)
    try:
        store.migrate()
        outcome = tokens.import_token(store, token, args.scope, args.name, args.tenant or [])
    except ValueError as e:
        print(f"wgjit: token import: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    token_id = token.split("_", 2)[1]
    print({"added": f"imported {args.scope} token {token_id}",
           "updated": f"{args.scope} token {token_id} present; name and pool updated",
           "present": f"{args.scope} token {token_id} already present"}[outcome])
    return 0


@_with_db_errors
def cmd_token_list(args: argparse.Namespace) -> int:
    from appliance.registry import tokens

    store = _open_store(_settings(args, DB_OPTIONS, "registry"))
    try:
        rows = tokens.list_tokens(store)
    finally:
        store.close()
    # The limit column: an admin token's tenant, a gateway token's pool (a,b), or -.
    text = "\n".join(
        f"{r['id']}  {r['scope']}  {r['tenant'] or ','.join(r['pool']) or '-'}  "
        f"{'revoked' if r['revoked_at'] else 'active'}  {r['name'] or ''}".rstrip()
        for r in rows
    )
    _print(args, rows, text or "no tokens")
    return 0


@_with_db_errors
def cmd_token_revoke(args: argparse.Namespace) -> int:
    from appliance.registry import tokens

    store = _open_store(_settings(args, DB_OPTIONS, "registry"))
    try:
        revoked = tokens.revoke(store, args.id)
    finally:
        store.close()
    if not revoked:
        print(f"wgjit: no active token {args.id}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


# tenants

@_with_api_errors
def cmd_tenant_add(args: argparse.Namespace) -> int:
    t = _client(args).create_tenant(args.name)
    _print(args, t, f"created tenant {t['name']}")
    return 0


@_with_api_errors
def cmd_tenant_list(args: argparse.Namespace) -> int:
    ts = _client(args).list_tenants()
    _print(args, ts, "\n".join(f"{t['name']}  {t['peers']} peers" for t in ts) or "no tenants")
    return 0


# peers

@_with_api_errors
def cmd_peer_add(args: argparse.Namespace) -> int:
    psk = read_secret(args.preshared_key_file, what="preshared key") \
        if args.preshared_key_file else None
    p = _client(args).create_peer(args.tenant, args.public_key, args.allowed_ip, args.name, psk,
                                  allow_broad=args.allow_broad)
    _print(args, p, f"added {_peer_line(p)}")
    return 0


@_with_api_errors
def cmd_peer_list(args: argparse.Namespace) -> int:
    client = _client(args)
    peers = list(client.iter_peers(args.tenant))
    _print(args, peers, "\n".join(_peer_line(p) for p in peers) or "no peers")
    return 0


@_with_api_errors
def cmd_peer_show(args: argparse.Namespace) -> int:
    p = _client(args).get_peer(args.public_key)
    text = "\n".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in p.items())
    _print(args, p, text)
    return 0


@_with_api_errors
def cmd_peer_update(args: argparse.Namespace) -> int:
    fields: dict = {}
    if args.allowed_ip:
        fields["allowed_ips"] = args.allowed_ip
        if args.allow_broad:
            fields["allow_broad"] = True
    if args.name is not None:
        fields["name"] = args.name
    if args.preshared_key_file:
        fields["preshared_key"] = read_secret(args.preshared_key_file, what="preshared key")
    if args.clear_preshared_key:
        fields["preshared_key"] = None
    if not fields:
        print("wgjit: peer update: nothing to change", file=sys.stderr)
        return 2
    p = _client(args).update_peer(args.public_key, **fields)
    _print(args, p, f"updated {_peer_line(p)}")
    return 0


@_with_api_errors
def cmd_peer_revoke(args: argparse.Namespace) -> int:
    p = _client(args).revoke_peer(args.public_key)
    _print(args, p, f"revoked {p['public_key']}")
    return 0


@_with_api_errors
def cmd_peer_restore(args: argparse.Namespace) -> int:
    p = _client(args).restore_peer(args.public_key)
    _print(args, p, f"restored {p['public_key']}")
    return 0


@_with_api_errors
def cmd_peer_delete(args: argparse.Namespace) -> int:
    _client(args).delete_peer(args.public_key)
    _print(args, {"deleted": args.public_key}, f"deleted {args.public_key}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="the peer registry service")
    rsub = reg.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")
    p = rsub.add_parser("serve", help="serve the registry API under gunicorn")
    _add_db(p)
    config.add_flags(p, SERVE_OPTIONS[len(DB_OPTIONS):])
    p.set_defaults(func=cmd_serve)
    p = rsub.add_parser("migrate", help="create or upgrade the database schema")
    _add_db(p)
    p.set_defaults(func=cmd_migrate)
    p = rsub.add_parser(
        "import", help="add peers from JSON Lines (one POST /v1/peers body per line)",
        description="Add peers from a JSON Lines file straight into the database, with the"
        " API's checks. All or nothing unless --batch is given.")
    _add_db(p)
    p.add_argument("--tenant", required=True, help="the tenant every peer goes into")
    p.add_argument("--batch", type=int, metavar="N",
                   help="commit every N peers (other writers get turns; a failure keeps"
                   " the batches before it)")
    p.add_argument("--allow-broad", action="store_true",
                   help=BROAD_HELP + " (the import runs with the database's own rights)")
    p.add_argument("file", metavar="FILE", help="JSON Lines file, or - for stdin")
    p.set_defaults(func=cmd_import)

    tok = sub.add_parser("token", help="API tokens (on the registry host)")
    tsub = tok.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("create", help="create a token and print it (only its hash is kept)")
    _add_db(p)
    p.add_argument("--scope", required=True, choices=["admin", "gateway"])
    p.add_argument("--tenant", action="append", metavar="T",
                   help="limit an admin token to tenant T; repeat to limit a gateway token"
                   " to a pool of tenants (it sees no other tenant's peers or changes)")
    p.add_argument("--name", help="a label to recognise the token by (a gateway's host name:"
                   " one token per gateway, so one can be revoked alone)")
    p.add_argument("--output", metavar="FILE", help="write the token to a 0600 file instead")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("generate", help="make a token without storing it (for `import`)")
    p.add_argument("--output", metavar="FILE", help="write the token to a 0600 file instead")
    p.set_defaults(func=cmd_token_generate)
    p = tsub.add_parser("import", help="store a token made elsewhere (its hash only)")
    _add_db(p)
    p.add_argument("--scope", required=True, choices=["admin", "gateway"])
    p.add_argument("--token-file", required=True, metavar="FILE",
                   help="0600 file holding the token")
    p.add_argument("--name", help="a label to recognise the token by")
    p.add_argument("--tenant", action="append", metavar="T",
                   help="limit a gateway token to a pool of tenants (repeat); an import"
                   " of a present token sets its name and pool to these")
    p.set_defaults(func=cmd_token_import)
    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    _add_db(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by its id")
    _add_db(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_token_revoke)

    ten = sub.add_parser("tenant", help="tenants, through the API")
    tsub = ten.add_subparsers(dest="tenant_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("add", help="create a tenant")
    _add_client(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_tenant_add)
    p = tsub.add_parser("list", help="list tenants")
    _add_client(p)
    p.set_defaults(func=cmd_tenant_list)

    peer = sub.add_parser("peer", help="peers, through the API")
    psub = peer.add_subparsers(dest="peer_command", required=True, metavar="COMMAND")
    p = psub.add_parser("add", help="register a peer")
    _add_client(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--public-key", required=True, metavar="B64")
    p.add_argument("--allowed-ip", action="append", required=True, metavar="CIDR")
    p.add_argument("--name")
    p.add_argument("--allow-broad", action="store_true",
                   help=BROAD_HELP + " (needs an admin token without a tenant limit)")
    p.add_argument("--preshared-key-file", metavar="FILE")
    p.set_defaults(func=cmd_peer_add)
    p = psub.add_parser("list", help="list peers")
    _add_client(p)
    p.add_argument("--tenant")
    p.set_defaults(func=cmd_peer_list)
    for name, func, text in (
        ("show", cmd_peer_show, "show one peer"),
        ("revoke", cmd_peer_revoke, "revoke a peer (gateways drop it)"),
        ("restore", cmd_peer_restore, "undo a revocation"),
        ("delete", cmd_peer_delete, "delete a peer for good"),
    ):
        p = psub.add_parser(name, help=text)
        _add_client(p)
        p.add_argument("public_key", metavar="PUBLIC_KEY")
        p.set_defaults(func=func)
    p = psub.add_parser("update", help="change a peer's allowed IPs, name or preshared key")
    _add_client(p)
    p.add_argument("public_key", metavar="PUBLIC_KEY")
    p.add_argument("--allowed-ip", action="append", metavar="CIDR")
    p.add_argument("--name")
    p.add_argument("--preshared-key-file", metavar="FILE")
    p.add_argument("--allow-broad", action="store_true",
                   help=BROAD_HELP + " (needs an admin token without a tenant limit)")
    p.add_argument("--clear-preshared-key", action="store_true")
    p.set_defaults(func=cmd_peer_update)


