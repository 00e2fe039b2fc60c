"""Bearer-token authentication and scope checks for the API blueprints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import g, request

from appliance.registry import db, tokens
from appliance.registry.errors import APIError


def _authenticate() -> tokens.Token:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise APIError(401, "unauthorized", "missing bearer token")
    token = tokens.verify(db.get_db(), value.strip())
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


def check_tenant(tenant_id: int) -> None:
    """Hide other tenants' objects from a limited token: they look like 404s."""
    limit = tenant_limit()
    if limit is not None and limit != tenant_id:
        raise APIError(404, "not_found", "no such object")
