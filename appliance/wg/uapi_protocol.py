"""The cross-platform WireGuard configuration protocol, as text (no I/O here).

Requests are `get=1` or `set=1`, then `key=value` lines, then an empty line; the
answer ends with `errno=N` and an empty line. Keys travel as hex. A `set=1` is
incremental: it changes only what it names, and we never send `replace_peers`
(that would drop every peer the request does not list).

Two dialects are spoken:
- wireguard-go reports `private_key`, and per peer `protocol_version` and
  `last_handshake_time_sec/nsec` as a wall-clock time since the Unix epoch;
  Debian's build answers errors as a negative `errno=-22`.
- boringtun reports `own_public_key` instead of the private key, no
  `protocol_version`, and `last_handshake_time_sec/nsec` as the time *since* the
  handshake; it rejects `update_only`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from appliance.keys import KeyError_, encode_key, key_from_hex, public_key

from .errors import InvalidConfig, ProtocolError, errno_text
from .model import (
    MAX_PORT,
    DeviceDump,
    DeviceInfo,
    Endpoint,
    Peer,
    PeerActivity,
    PeerConfig,
    parse_network,
)

ZERO_KEY_HEX = "00" * 32

# A wall-clock handshake time below this (2001-09-09) cannot be a real handshake
# on a machine with a set clock, so a value that small is "seconds since". Used
# only when the dialect cannot be told from the answer itself.
_EPOCH_PLAUSIBLE = 1_000_000_000

WIREGUARD_GO = "wireguard-go"
BORINGTUN = "boringtun"


def b64_to_hex(key_b64: str) -> str:
    return base64.b64decode(key_b64).hex()


def hex_to_b64(text: str, what: str) -> str:
    try:
        return encode_key(key_from_hex(text))
    except KeyError_ as e:
        raise ProtocolError(f"UAPI {what}={text[:8]}...: {e}") from e


# -- requests ---------------------------------------------------------------------

def encode_device_set(*, private_key: str | None = None, listen_port: int | None = None,
                      fwmark: int | None = None) -> list[str]:
    lines = []
    if private_key is not None:
        lines.append(f"private_key={b64_to_hex(private_key)}")
    if listen_port is not None:
        if not 0 <= int(listen_port) <= MAX_PORT:
            raise InvalidConfig(f"listen port {listen_port}: must be 0..{MAX_PORT}")
        lines.append(f"listen_port={int(listen_port)}")
    if fwmark is not None:
        lines.append(f"fwmark={int(fwmark)}")
    return lines


def encode_peer(peer: PeerConfig, *, update_only: bool = False) -> list[str]:
    """One peer section. Order matters to the protocol: public_key opens the section."""
    lines = [f"public_key={b64_to_hex(peer.public_key)}"]
    if update_only:
        lines.append("update_only=true")
    if peer.preshared_key is not None:
        lines.append(f"preshared_key={b64_to_hex(peer.preshared_key)}")
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    if peer.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    if peer.allowed_ips is not None:
        # Replace, so that "set this peer" means its allowed IPs end up exactly these.
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return lines


def encode_remove(public_key_b64: str) -> list[str]:
    return [f"public_key={b64_to_hex(public_key_b64)}", "remove=true"]


def set_request(lines: Iterable[str]) -> bytes:
    return ("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n").encode()


GET_REQUEST = b"get=1\n\n"


# -- answers ----------------------------------------------------------------------

# Lines are split a chunk at a time: one list of every line of a 50,000-peer
# answer (450,000 strings) would add ~40 MB to the reader's peak memory.
SPLIT_CHUNK = 1 << 20


def split_lines(text: str) -> Iterator[tuple[str, str]]:
    start, end_of_text = 0, len(text)
    while start < end_of_text:
        end = text.find("\n", start + SPLIT_CHUNK)
        if end < 0:
            end = end_of_text
        for line in text[start:end].split("\n"):
            if line:
                yield key_value(line)
        start = end + 1


def key_value(line: str) -> tuple[str, str]:
    key, sep, value = line.partition("=")
    if not sep:
        raise ProtocolError(f"UAPI answer line without '=': {line[:40]!r}")
    return key, value


def answer_errno(text: str) -> int:
    """The errno an answer ends with; ProtocolError when there is none.

    Debian's wireguard-go writes it negative (`errno=-22`), others positive."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    key, _, value = last.partition("=")
    if key != "errno":
        raise ProtocolError(f"UAPI answer does not end with errno=: {last[:40]!r}")
    try:
        return abs(int(value))
    except ValueError as e:
        raise ProtocolError(f"UAPI errno is not a number: {value[:20]!r}") from e


def check_errno(text: str, what: str, ifname: str) -> None:
    code = answer_errno(text)
    if code:
        raise ProtocolError(f"{ifname}: the device rejected {what}: {errno_text(code)}",
                            ifname=ifname, errno=code)


@dataclass
class _PeerFields:
    public_key: str
    allowed_ips: list = field(default_factory=list)
    endpoint: Endpoint | None = None
    preshared_key: str | None = None
    keepalive: int = 0
    hs_sec: int | None = None
    hs_nsec: int = 0
    rx: int = 0
    tx: int = 0
    protocol_version: int | None = None


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise ProtocolError(f"UAPI {key}={value[:20]!r}: not a number") from e


def parse_get(text: str, ifname: str, *, now: datetime | None = None) -> DeviceDump:
    """Parse a `get=1` answer. `now` is when it was read (for boringtun's relative times)."""
    check_errno(text, "get", ifname)
    now = now or datetime.now(UTC)
    private_key = own_public = None
    listen_port = fwmark = 0
    peers: list[_PeerFields] = []
    cur: _PeerFields | None = None
    for key, value in split_lines(text):
        if key == "errno":
            break
        if key == "public_key":
            cur = _PeerFields(hex_to_b64(value, key))
            peers.append(cur)
        elif cur is None:
            if key == "private_key":
                private_key = None if value == ZERO_KEY_HEX else hex_to_b64(value, key)
            elif key == "own_public_key":
                own_public = hex_to_b64(value, key)
            elif key == "listen_port":
                listen_port = _int(key, value)
            elif key == "fwmark":
                fwmark = _int(key, value)
            # Unknown device keys are skipped: implementations add fields over time.
        elif key == "allowed_ip":
            try:
                cur.allowed_ips.append(parse_network(value))
            except InvalidConfig as e:
                raise ProtocolError(f"UAPI allowed_ip: {e}") from e
        elif key == "endpoint":
            try:
                cur.endpoint = Endpoint.parse(value)
            except InvalidConfig as e:
                raise ProtocolError(f"UAPI endpoint: {e}") from e
        elif key == "preshared_key":
            cur.preshared_key = None if value == ZERO_KEY_HEX else hex_to_b64(value, key)
        elif key == "persistent_keepalive_interval":
            cur.keepalive = _int(key, value)
        elif key == "last_handshake_time_sec":
            cur.hs_sec = _int(key, value)
        elif key == "last_handshake_time_nsec":
            cur.hs_nsec = _int(key, value)
        elif key == "rx_bytes":
            cur.rx = _int(key, value)
        elif key == "tx_bytes":
            cur.tx = _int(key, value)
        elif key == "protocol_version":
            cur.protocol_version = _int(key, value)

    dialect = detect_dialect(own_public is not None, peers)
    if private_key is not None:
        derived = encode_key(public_key(base64.b64decode(private_key)))
    else:
        derived = own_public
    info = DeviceInfo(ifname=ifname, backend="uapi", public_key=derived,
                      private_key=private_key, listen_port=listen_port, fwmark=fwmark)
    return DeviceDump(info, tuple(
        Peer(public_key=p.public_key, allowed_ips=tuple(p.allowed_ips), endpoint=p.endpoint,
             preshared_key=p.preshared_key, persistent_keepalive=p.keepalive,
             last_handshake=handshake_time(p.hs_sec, p.hs_nsec, dialect, now),
             rx_bytes=p.rx, tx_bytes=p.tx)
        for p in peers))


def parse_activity(text: str, ifname: str, *, now: float) -> list[PeerActivity]:
    """Only what housekeeping needs from a `get=1` answer (see PeerActivity):
    addresses, endpoints and keys other than the peer's own are skipped.
    `now` (Unix time) is when it was read, for boringtun's relative times."""
    return activity_from_lines(split_lines(text), ifname, now=now)


def activity_from_lines(lines: Iterable[tuple[str, str]], ifname: str, *,
                        now: float) -> list[PeerActivity]:
    """parse_activity over (key, value) lines as they arrive; stops at errno."""
    rows: list[list] = []  # [public key, sec, nsec, rx, keepalive]
    cur: list | None = None
    boringtun = versioned = ended = False
    for key, value in lines:
        if key == "public_key":
            cur = [hex_to_b64(value, key), None, 0, 0, 0]
            rows.append(cur)
        elif key == "errno":
            code = abs(_int(key, value))
            if code:
                raise ProtocolError(f"{ifname}: the device rejected get: {errno_text(code)}",
                                    ifname=ifname, errno=code)
            ended = True
            break
        elif cur is None:
            boringtun = boringtun or key == "own_public_key"
        elif key == "last_handshake_time_sec":
            cur[1] = _int(key, value)
        elif key == "last_handshake_time_nsec":
            cur[2] = _int(key, value)
        elif key == "rx_bytes":
            cur[3] = _int(key, value)
        elif key == "persistent_keepalive_interval":
            cur[4] = _int(key, value)
        elif key == "protocol_version":
            versioned = True
    if not ended:
        raise ProtocolError(f"{ifname}: UAPI answer to get does not end with errno=",
                            ifname=ifname)
    dialect = BORINGTUN if boringtun else WIREGUARD_GO if versioned else None
    out = []
    for public, sec, nsec, rx, keepalive in rows:
        # The same rules as handshake_time, in seconds.
        if sec is None or (sec == 0 and nsec == 0 and dialect != BORINGTUN):
            handshake = None
        elif dialect == BORINGTUN or (dialect is None and sec < _EPOCH_PLAUSIBLE):
            handshake = now - sec - nsec / 1e9
        else:
            handshake = sec + nsec / 1e9
        out.append(PeerActivity(public, handshake, rx, keepalive))
    return out


def detect_dialect(has_own_public_key: bool, peers: list[_PeerFields]) -> str | None:
    """wireguard-go, boringtun, or None when the answer does not say."""
    if has_own_public_key:
        return BORINGTUN
    if any(p.protocol_version is not None for p in peers):
        return WIREGUARD_GO
    return None


def handshake_time(sec: int | None, nsec: int, dialect: str | None,
                   now: datetime) -> datetime | None:
    """A timezone-aware UTC time, or None when the peer never completed a handshake."""
    if sec is None or (sec == 0 and nsec == 0 and dialect != BORINGTUN):
        # wireguard-go reports 0/0 for "never"; boringtun omits the lines instead.
        return None
    relative = dialect == BORINGTUN or (dialect is None and sec < _EPOCH_PLAUSIBLE)
    if relative:
        return now - timedelta(seconds=sec, microseconds=nsec // 1000)
    return datetime.fromtimestamp(sec, UTC) + timedelta(microseconds=nsec // 1000)
