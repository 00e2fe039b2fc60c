"""Service routes: /healthz and /openapi.json (/metrics lives in metrics.py)."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify

from appliance.registry import openapi, store

log = logging.getLogger(__name__)

bp = Blueprint("service", __name__)


@bp.get("/healthz")
def healthz():
    db = store.current()
    try:
        version = db.schema_version()
    except db.errors as e:
        # The driver's text can name hosts, users, paths and the schema: it is for
        # the operator's log, not for whoever can reach /healthz.
        log.warning("healthz: database not answering: %s", e)
        return jsonify(status="error", error="database_unavailable",
                       message="the database is not answering"), 503
    return jsonify(status="ok", schema_version=version)


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi.spec())
