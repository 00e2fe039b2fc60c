"""The peer registry: a Flask app over SQLite that holds every peer ever made."""

from __future__ import annotations

from typing import Any

from flask import Flask

MAX_BODY_BYTES = 64 * 1024


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """App factory. `config["DATABASE"]` is the SQLite path (required)."""
    from appliance.registry import db, errors, gateway, metrics, peers, service, tenants

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
    for bp in (service.bp, tenants.bp, peers.bp, gateway.bp):
        app.register_blueprint(bp)
    app.url_map.strict_slashes = False
    return app
