"""Every error the registry returns is JSON: {"error": CODE, "message": TEXT, ...}.

Registered once on the app, so blueprints raise `APIError` (or let Flask raise
its HTTPExceptions) and never build error responses themselves. What answers
beneath Flask uses the same shapes: the gateway lookup's fast path calls
`unexpected()`, and gunicorn's own parser errors go through `gunicorn_error()`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException

if TYPE_CHECKING:
    from appliance.registry.store import Store

log = logging.getLogger(__name__)

# Machine-readable codes for Flask's and gunicorn's own errors, keyed by status.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "database_busy",
    507: "storage_full",
}

# A write that waited the API's busy timeout for a lock: an API write holds
# SQLite's lock ~0.07 ms, a bulk import's 20,000-peer chunk 0.4-0.55 s (both
# measured on the 2-core test machine at load 10), so one second is a fair
# first retry.
RETRY_AFTER_S = 1

INTERNAL = {"error": "internal_error", "message": "internal server error"}


class APIError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.extra = extra


def invalid(field: str, problem: str) -> APIError:
    """A 400 that names the field, so a client can point at it."""
    return APIError(400, "invalid_field", f"{field}: {problem}", field=field)


def unexpected(exc: BaseException, store: Store | None
               ) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, body, headers) for an exception no handler expected. The
    database's own words go to the log only: they can name tables, paths and
    values, and a client can do nothing with them."""
    kind = store.failure(exc) if store is not None else None
    if kind == "busy":
        log.warning("database busy, answered 503: %s", exc)
        return 503, {"error": HTTP_CODES[503],
                     "message": "the database is busy; retry later"}, \
            {"Retry-After": str(RETRY_AFTER_S)}
    if kind == "full":
        log.error("database out of space, answered 507: %s", exc)
        return 507, {"error": HTTP_CODES[507],
                     "message": "the registry's storage is full; nothing was written"}, {}
    log.error("unhandled error", exc_info=exc)
    return 500, dict(INTERNAL), {}


def gunicorn_error(sock: object, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error`, writing JSON instead of HTML.

    gunicorn answers what its HTTP parser refuses (request line past
    limit_request_line: 414, header limits: 431, malformed requests: 400) in
    `Worker.handle_error`, before any WSGI code runs, and it has no setting or
    hook for the body. handle_error decides the status, logs and counts, then
    writes through `gunicorn.util.write_error`; `serve.py` swaps that one
    function in each worker, so gunicorn keeps every decision and only the
    body's format changes. tests/registry/test_server.py checks the 414 on a
    real gunicorn, so an upgrade that stops calling it is noticed.
    """
    from gunicorn import util

    body = json.dumps({"error": HTTP_CODES.get(status_int, "http_error"),
                       "message": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def register(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(e: APIError):
        return jsonify(error=e.error, message=e.message, **e.extra), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        status = e.code or 500
        body = {"error": HTTP_CODES.get(status, "http_error"), "message": e.description}
        resp = jsonify(body)
        resp.status_code = status
        if status == 405 and e.get_response().headers.get("Allow"):
            resp.headers["Allow"] = e.get_response().headers["Allow"]
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        status, body, headers = unexpected(e, current_app.extensions.get("wgjit_store"))
        return jsonify(body), status, headers
