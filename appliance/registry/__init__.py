"""The peer registry: a Flask app over SQLite or PostgreSQL that holds every peer ever made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Flask is imported by create_app only: gateways import appliance.registry.client,
# and Flask, Werkzeug and Jinja would cost every gateway ~20 MB of RSS for nothing.
if TYPE_CHECKING:
    from flask import Flask

MAX_BODY_BYTES = 64 * 1024
# How long an API write waits for the database's write lock (SQLite's
# busy_timeout, PostgreSQL's lock_timeout) before answering 503 with
# Retry-After. An API write holds the lock ~0.07 ms and a bulk import's chunk
# 0.4-0.55 s (see errors.RETRY_AFTER_S), so 2 s outlasts any queue of API
# writers and a chunk; a longer wait only keeps a gunicorn thread from the
# gateways' lookups (2 workers x 4 threads: eight writes stuck behind a bulk
# import's chunk would stall every lookup) and outlasts clients that gave up.
# The CLI keeps the engines' longer default.
API_BUSY_TIMEOUT_MS = 2_000


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """App factory. `config["DATABASE"]` is the --db value (required): a SQLite path or
    a postgresql:// URL; `config["DB_PASSWORD_FILE"]` the PostgreSQL password file,
    `config["DB_POOL_SIZE"]` its connections per process;
    `config["DB_BUSY_TIMEOUT_MS"]` replaces API_BUSY_TIMEOUT_MS."""
    from flask import Flask
    from werkzeug.routing import BaseConverter

    from appliance.registry import errors, gateway, metrics, peers, service, tenants
    from appliance.registry.fastpath import GatewayLookupFastPath
    from appliance.registry.store import open_store

    class WireGuardKeyConverter(BaseConverter):
        """A key in a path: standard base64 may hold '/' anywhere, even first,
        which Werkzeug's `path` converter refuses."""

        regex = r".+?"
        part_isolating = False

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    app.config.update(config or {})
    if not app.config.get("DATABASE"):
        raise ValueError("create_app: DATABASE (a SQLite path or postgresql:// URL) is required")
    store = open_store(app.config["DATABASE"], app.config.get("DB_PASSWORD_FILE"),
                       app.config.get("DB_POOL_SIZE"),
                       busy_timeout_ms=app.config.get("DB_BUSY_TIMEOUT_MS", API_BUSY_TIMEOUT_MS))
    if not app.config.get("SKIP_MIGRATE"):
        store.migrate()
    app.extensions["wgjit_store"] = store
    app.teardown_appcontext(lambda _exc: store.end_request())
    errors.register(app)
    metrics.init_app(app)
    app.url_map.strict_slashes = False
    app.url_map.converters["wgkey"] = WireGuardKeyConverter
    # Standard base64 keys may begin with '/', giving '/v1/peers//abc...' once
    # decoded; merging the slashes would silently change the key.
    app.url_map.merge_slashes = False
    for bp in (service.bp, tenants.bp, peers.bp, gateway.bp):
        app.register_blueprint(bp)
    app.wsgi_app = GatewayLookupFastPath(app.wsgi_app, store)
    return app
