"""Service routes: /healthz and /openapi.json (/metrics lives in metrics.py)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance.registry import openapi, store

bp = Blueprint("service", __name__)


@bp.get("/healthz")
def healthz():
    db = store.current()
    try:
        version = db.schema_version()
    except db.errors as e:
        return jsonify(status="error", error="database_unavailable", message=str(e)), 503
    return jsonify(status="ok", schema_version=version)


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi.spec())
