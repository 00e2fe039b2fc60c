"""Input validation for the API: every problem names the field it is about."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from appliance.keys import KeyError_, decode_key, is_low_order, normalize_key
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


def json_object(data: str | bytes, what: str = "body") -> dict[str, Any]:
    """One JSON object; a key given twice, nesting past the parser's recursion
    limit and anything but an object are 400s, never a 500."""
    try:
        body = json.loads(data, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise invalid(e.key, "appears more than once in the JSON object") from None
    except RecursionError:
        raise APIError(400, "invalid_json", f"{what} is nested too deeply") from None
    except ValueError:
        raise APIError(400, "invalid_json", f"{what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_json", f"{what} must be a JSON object")
    return body


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
    return json_object(data)


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


def public_key(value: Any, field: str = "public_key") -> str:
    """A key for a new peer: also no low-order point (all zeros among them),
    with which no handshake can succeed. Lookups take any key (`key`)."""
    canonical = key(value, field)
    if is_low_order(decode_key(canonical)):
        raise invalid(field, "is a low-order Curve25519 point, not a usable public key")
    return canonical


def preshared_key(value: Any, field: str = "preshared_key") -> str | None:
    """None or a key; all zeros is what WireGuard reports for "no preshared key",
    so storing it would look set here and be off on the wire."""
    if value is None:
        return None
    canonical = key(value, field)
    if not any(decode_key(canonical)):
        raise invalid(field, "all zeros means no preshared key; omit the field instead")
    return canonical


# Bidirectional controls reorder how text is shown (CVE-2021-42574): a name
# could display as another. Categories Cc (C0, DEL, C1), Zl and Zp are control
# characters and line breaks that would split a log line or a table row.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")
CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


def name(value: Any, field: str = "name", *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a non-empty string")
    if len(value) > MAX_NAME_LEN:
        raise invalid(field, f"must be at most {MAX_NAME_LEN} characters")
    for c in value:
        if c in BIDI_CONTROLS or unicodedata.category(c) in CONTROL_CATEGORIES:
            raise invalid(field, f"must not contain control or bidirectional characters"
                                 f" (U+{ord(c):04X})")
    return value.strip()


def tenant_name(value: Any, field: str = "name") -> str:
    """A new tenant's name: a name that is also one path segment
    (/v1/tenants/{name}) and has nothing invisible (format characters, Cf, such
    as zero-width spaces), so two tenants cannot look alike."""
    text = name(value, field, required=True)
    assert text is not None
    if "/" in text:
        raise invalid(field, "must not contain '/'")
    for c in text:
        if unicodedata.category(c) == "Cf":
            raise invalid(field, f"must not contain invisible characters (U+{ord(c):04X})")
    return text


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
