"""Every error the registry returns is JSON: {"error": CODE, "message": TEXT, ...}.

Registered once on the app, so blueprints raise `APIError` (or let Flask raise
its HTTPExceptions) and never build error responses themselves.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Machine-readable codes for Flask's own errors, keyed by status.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


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
        log.exception("unhandled error")
        return jsonify(error="internal_error", message="internal server error"), 500
