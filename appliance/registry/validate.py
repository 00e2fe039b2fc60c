"""Input validation for the API: every problem names the field it is about."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from appliance.keys import KeyError_, normalize_key
from appliance.registry import cidr
from appliance.registry.errors import APIError, invalid

MAX_ALLOWED_IPS = 256
MAX_NAME_LEN = 128


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; other parsers keep the first, so a
    # body could mean one thing to a proxy or audit log and another to us.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise APIError(415, "unsupported_media_type", "body must be application/json")
    data = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body has no Content-Length to refuse up front: Werkzeug stops
    # reading at the limit and hands over the cut-off text, which would then be
    # "invalid JSON". One more byte from the server's stream tells them apart.
    if (request.content_length is None and len(data) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    try:
        body = json.loads(data, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise invalid(e.key, "appears more than once in the JSON object") from None
    except RecursionError:
        raise APIError(400, "invalid_json", "body is nested too deeply") from None
    except ValueError:
        raise APIError(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_json", "body must be a JSON object")
    return body


def reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    for field in body:
        if field not in allowed:
            raise invalid(field, "unknown field")


def key(value: Any, field: str = "public_key") -> str:
    if not isinstance(value, str):
        raise invalid(field, "must be a string of base64")
    try:
        return normalize_key(value)
    except KeyError_ as e:
        raise invalid(field, str(e)) from e


def name(value: Any, field: str = "name", *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a non-empty string")
    if len(value) > MAX_NAME_LEN:
        raise invalid(field, f"must be at most {MAX_NAME_LEN} characters")
    if any(ord(c) < 32 for c in value):
        raise invalid(field, "must not contain control characters")
    return value.strip()


def allowed_ips(value: Any, field: str = "allowed_ips") -> list[cidr.Net]:
    """CIDRs, IPv4 or IPv6, host bits zero, no overlap among themselves."""
    if not isinstance(value, list) or not value:
        raise invalid(field, "must be a non-empty list of CIDRs")
    if len(value) > MAX_ALLOWED_IPS:
        raise invalid(field, f"at most {MAX_ALLOWED_IPS} entries")
    nets: list[cidr.Net] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or "/" not in item:
            raise invalid(f"{field}[{i}]", f"{item!r} is not a CIDR (address/prefix)")
        try:
            net = cidr.parse(item.strip())
        except ValueError as e:
            raise invalid(f"{field}[{i}]", f"{item!r} is not a valid CIDR: {e}") from e
        for other in nets:
            if cidr.overlaps(net, other):
                raise invalid(f"{field}[{i}]",
                              f"{net.cidr} overlaps {other.cidr} in the same request")
        nets.append(net)
    return nets


def int_arg(name_: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name_)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise invalid(name_, "must be an integer") from e
    if not lo <= value <= hi:
        raise invalid(name_, f"must be between {lo} and {hi}")
    return value
