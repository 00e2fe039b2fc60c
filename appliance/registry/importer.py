"""Import peers from JSON Lines: migrating a fleet into the registry in one go.

Each line is the body of `POST /v1/peers` without the tenant (that comes once,
for the whole file): {"public_key": ..., "allowed_ips": [...], "name": ...,
"preshared_key": ...}. Lines get the API's checks, named by line number, and
go in through the bulk path, which runs them against the database too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from appliance.registry import validate
from appliance.registry.errors import APIError
from appliance.registry.store import NewPeer

FIELDS = {"public_key", "allowed_ips", "name", "preshared_key"}


class ImportError_(ValueError):
    """A line the registry would refuse; the message names the line and the field."""


def parse_lines(lines: Iterable[str]) -> Iterator[NewPeer]:
    """NewPeers from JSON Lines; blank lines and lines starting with # are skipped."""
    number = 0
    it = iter(lines)
    while True:
        number += 1
        try:
            line = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            # Text files decode a block at a time: the bad byte is at or after this line.
            raise ImportError_(f"line {number} or later: not UTF-8 ({e.reason})") from None
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield _peer(text)
        except APIError as e:
            raise ImportError_(f"line {number}: {e.message}") from None
        except ValueError as e:
            raise ImportError_(f"line {number}: {e}") from None


def _peer(text: str) -> NewPeer:
    body = validate.json_object(text, "the line")
    validate.reject_unknown(body, FIELDS)
    return NewPeer(
        validate.public_key(body.get("public_key")),
        validate.allowed_ips(body.get("allowed_ips")),
        validate.name(body.get("name")),
        validate.preshared_key(body.get("preshared_key")),
    )
