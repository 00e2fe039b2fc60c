"""The peer registry: a Flask app over SQLite that holds every peer ever made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Flask is imported by create_app only: gateways import appliance.registry.client,
# and Flask, Werkzeug and Jinja would cost every gateway ~20 MB of RSS for nothing.
if TYPE_CHECKING:
    from flask import Flask

MAX_BODY_BYTES = 64 * 1024


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """App factory. `config["DATABASE"]` is the SQLite path (required)."""
    from flask import Flask
    from werkzeug.routing import BaseConverter

    from appliance.registry import db, errors, gateway, metrics, peers, service, tenants
    from appliance.registry.fastpath import GatewayLookupFastPath

    class WireGuardKeyConverter(BaseConverter):
        """A key in a path: standard base64 may hold '/' anywhere, even first,
        which Werkzeug's `path` converter refuses."""

        regex = r".+?"
        part_isolating = False

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    app.config.update(config or {})
    if not app.config.get("DATABASE"):
        raise ValueError("create_app: DATABASE (the SQLite path) is required")
    if not app.config.get("SKIP_MIGRATE"):
        db.init_db(app.config["DATABASE"])
    app.teardown_appcontext(db.close_db)
    errors.register(app)
    metrics.init_app(app)
    app.url_map.strict_slashes = False
    app.url_map.converters["wgkey"] = WireGuardKeyConverter
    # Standard base64 keys may begin with '/', giving '/v1/peers//abc...' once
    # decoded; merging the slashes would silently change the key.
    app.url_map.merge_slashes = False
    for bp in (service.bp, tenants.bp, peers.bp, gateway.bp):
        app.register_blueprint(bp)
    app.wsgi_app = GatewayLookupFastPath(app.wsgi_app, app.config["DATABASE"])
    return app
