"""Input validation for the API: every problem names the field it is about."""

from __future__ import annotations

from typing import Any

from flask import request

from appliance.keys import KeyError_, normalize_key
from appliance.registry import breadth, cidr
from appliance.registry.errors import APIError, invalid

MAX_ALLOWED_IPS = 256
MAX_NAME_LEN = 128


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise APIError(415, "unsupported_media_type", "body must be application/json")
    body = request.get_json(silent=True)
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


def allow_broad(value: Any, field: str = "allow_broad") -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(field, "must be true or false")
    return value


def breadth_ok(nets: list[cidr.Net], allowed: bool, field: str = "allowed_ips") -> None:
    """Refuse networks broader than breadth.SHORTEST_PREFIX unless `allowed`."""
    if allowed:
        return
    i = breadth.first_too_broad(nets)
    if i is not None:
        raise invalid(f"{field}[{i}]", breadth.problem(nets[i]))


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
