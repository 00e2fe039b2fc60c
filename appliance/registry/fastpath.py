"""The gateway lookup, answered beneath Flask.

Every cache miss of every gateway lands on `GET /v1/gateway/peers/{key}`.
Measured in-process, Flask's request machinery (context, routing, response
objects, hooks) costs ~430 µs of such a request while the SQL costs ~45 µs, so
on two cores the registry could not reach its lookup target. This WSGI layer
answers only the successful lookup itself, with the same functions that decide
it in the blueprint (`auth.verify_cached`, `Store.gateway_lookup`), and hands every
other request, and every request it would answer with an error, to Flask
unchanged: errors keep their one JSON shape from `errors.py`. An exception on
the way (the database failing) is answered here with `errors.unexpected`, as
Flask's handler would: handing the request on would repeat the failing query.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus

from appliance.keys import KeyError_, normalize_key
from appliance.registry import auth, errors, metrics
from appliance.registry.store import Store

PREFIX = "/v1/gateway/peers/"
RULE = "/v1/gateway/peers/<wgkey:key>"  # the blueprint's rule, as metrics label it
SCOPES = ("gateway", "admin")


class GatewayLookupFastPath:
    def __init__(self, wsgi_app: Callable, store: Store) -> None:
        self.next = wsgi_app
        self.store = store

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith(PREFIX):
            return self.next(environ, start_response)
        try:
            body = self._answer(environ, path[len(PREFIX):])
        except Exception as e:  # noqa: BLE001 - every failure becomes the JSON 500/503
            status, fields, headers = errors.unexpected(e, self.store)
            metrics.REQUESTS.labels("GET", RULE, str(status)).inc()
            return self._respond(start_response, f"{status} {HTTPStatus(status).phrase}",
                                 json.dumps(fields).encode(), list(headers.items()))
        if body is None:
            return self.next(environ, start_response)
        return self._respond(start_response, "200 OK", body)

    @staticmethod
    def _respond(start_response: Callable, status: str, body: bytes,
                 headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))), *(headers or [])])
        return [body]

    def _answer(self, environ: dict, raw_key: str) -> bytes | None:
        started = time.perf_counter()
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        token = auth.verify_cached(self.store, value.strip())
        if token is None or token.scope not in SCOPES:
            return None
        try:
            key = normalize_key(raw_key)
        except KeyError_:
            return None
        found = self.store.gateway_lookup(key, token.visible_tenants())
        if found is None:
            return None
        body = json.dumps(found).encode()
        metrics.REQUESTS.labels("GET", RULE, "200").inc()
        metrics.LATENCY.labels(RULE).observe(time.perf_counter() - started)
        return body
