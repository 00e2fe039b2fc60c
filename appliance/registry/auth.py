"""Bearer-token authentication and scope checks for the API blueprints."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import g, request

from appliance.registry import store, tokens
from appliance.registry.errors import APIError

# Verified tokens are remembered per worker for a few seconds: a gateway's
# lookups all carry the same token, and checking it is a query and a hash on
# the hottest path. Only successes are kept (random guesses cannot grow it),
# and a revoked token stops working within VERIFIED_TTL.
VERIFIED_TTL = 5.0
VERIFIED_MAX = 1024
_verified: dict[str, tuple[tokens.Token, float]] = {}
_verified_lock = threading.Lock()


def verify_cached(db: store.Store, value: str) -> tokens.Token | None:
    now = time.monotonic()
    with _verified_lock:
        hit = _verified.get(value)
    if hit is not None and hit[1] > now:
        return hit[0]
    token = tokens.verify(db, value)
    if token is not None:
        with _verified_lock:
            if len(_verified) >= VERIFIED_MAX:
                _verified.clear()
            _verified[value] = (token, now + VERIFIED_TTL)
    return token


def _authenticate() -> tokens.Token:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise APIError(401, "unauthorized", "missing bearer token")
    token = verify_cached(store.current(), value.strip())
    if token is None:
        raise APIError(401, "unauthorized", "invalid or revoked token")
    return token


def require(*scopes: str) -> Callable:
    """Allow the view only to tokens of these scopes; g.token holds the caller."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            token = _authenticate()
            if token.scope not in scopes:
                raise APIError(403, "forbidden", f"a {token.scope} token cannot do this")
            g.token = token
            return view(*args, **kwargs)

        return wrapper

    return decorator


def tenant_limit() -> int | None:
    """The tenant id a tenant-limited admin token is confined to, else None."""
    return g.token.tenant_id


def visible_tenants() -> frozenset[str] | None:
    """The tenants (by name) the caller may read gateway data of: a limited admin
    token's one, a gateway token's pool; None for every tenant."""
    return g.token.visible_tenants()


def hides_activity() -> bool:
    """Whether the caller's feed bounds are counted within its tenant (Token.hides_activity)."""
    return g.token.hides_activity()


def check_tenant(tenant_id: int, missing: APIError) -> None:
    """Hide other tenants' objects from a limited token: `missing` is the caller's
    error for an object that does not exist, so both answers are the same bytes."""
    limit = tenant_limit()
    if limit is not None and limit != tenant_id:
        raise missing
