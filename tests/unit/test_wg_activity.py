"""The housekeeping read (PeerActivity) says what the full read says, for both dialects.

tests/lab/test_housekeeping.py compares both reads on a real wireguard-go too.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from appliance.keys import encode_key
from appliance.wg import PeerActivity
from appliance.wg import uapi_protocol as proto
from appliance.wg.errors import ProtocolError
from tests.unit.test_wg_uapi import (
    BORINGTUN_GET,
    PEER_HEX,
    WIREGUARD_GO_GET,
    daemon,  # noqa: F401 - the fixture
)

NOW = 1_790_000_000.5


def hexkey() -> str:
    return os.urandom(32).hex()


def peer_lines(*, sec: int | None, nsec: int = 0, rx: int = 0, keepalive: int = 0,
               version: bool = True) -> list[str]:
    lines = [f"public_key={hexkey()}", f"preshared_key={'00' * 32}",
             "endpoint=192.0.2.7:51820"]
    if version:
        lines.append("protocol_version=1")
    if sec is not None:
        lines += [f"last_handshake_time_sec={sec}", f"last_handshake_time_nsec={nsec}"]
    lines += [f"tx_bytes={rx * 2}", f"rx_bytes={rx}",
              f"persistent_keepalive_interval={keepalive}",
              "allowed_ip=198.18.1.1/32", "allowed_ip=fd00::1:1/128"]
    return lines


def answer(head: list[str], peers: list[list[str]]) -> str:
    return "\n".join([*head, *(line for p in peers for line in p), "errno=0"]) + "\n\n"


def from_full(text: str) -> list[PeerActivity]:
    dump = proto.parse_get(text, "wg0", now=datetime.fromtimestamp(NOW, UTC))
    return [PeerActivity(p.public_key,
                         p.last_handshake.timestamp() if p.last_handshake else None,
                         p.rx_bytes, p.persistent_keepalive) for p in dump.peers]


@pytest.mark.parametrize("dialect", ["wireguard-go", "boringtun"])
def test_activity_agrees_with_the_full_read(dialect: str) -> None:
    if dialect == "wireguard-go":
        head = [f"private_key={hexkey()}", "listen_port=51820"]
        peers = [peer_lines(sec=1_789_999_000, nsec=250_000_000, rx=1234, keepalive=25),
                 peer_lines(sec=0, nsec=0),  # never
                 peer_lines(sec=1_789_999_990, rx=5)]
    else:
        head = [f"own_public_key={hexkey()}", "listen_port=51820"]
        peers = [peer_lines(sec=12, nsec=500_000_000, rx=99, version=False),
                 peer_lines(sec=None, version=False),  # never: boringtun omits the lines
                 peer_lines(sec=0, rx=1, version=False)]  # just now
    text = answer(head, peers)
    got = proto.parse_activity(text, "wg0", now=NOW)
    want = from_full(text)
    assert [p.public_key for p in got] == [p.public_key for p in want]
    for g, w in zip(got, want, strict=True):
        assert (g.rx_bytes, g.persistent_keepalive) == (w.rx_bytes, w.persistent_keepalive)
        if w.last_handshake is None:
            assert g.last_handshake is None
        else:
            assert g.last_handshake == pytest.approx(w.last_handshake, abs=1e-5)
    if dialect == "boringtun":
        assert got[0].last_handshake == pytest.approx(NOW - 12.5)
    assert got[1].last_handshake is None


def test_activity_keys_are_standard_base64() -> None:
    raw = os.urandom(32)
    text = answer([f"private_key={hexkey()}"],
                  [[f"public_key={raw.hex()}", "protocol_version=1", "rx_bytes=0"]])
    [p] = proto.parse_activity(text, "wg0", now=NOW)
    assert p.public_key == encode_key(raw)


def test_activity_reports_a_device_error() -> None:
    with pytest.raises(ProtocolError):
        proto.parse_activity("errno=-22\n\n", "wg0", now=NOW)


def test_activity_of_a_big_answer_spans_split_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proto, "SPLIT_CHUNK", 64)  # many chunk boundaries
    peers = [peer_lines(sec=1_789_999_000 + i, rx=i) for i in range(200)]
    text = answer([f"private_key={hexkey()}"], peers)
    got = proto.parse_activity(text, "wg0", now=NOW)
    assert [p.rx_bytes for p in got] == list(range(200))
    assert got == from_full(text)


# -- over a socket: the fake daemon of test_wg_uapi -----------------------------------


@pytest.mark.parametrize("text", [WIREGUARD_GO_GET, BORINGTUN_GET,
                                  f"public_key={PEER_HEX}\nrx_bytes=1\nerrno=0\n\n",
                                  "listen_port=7\nerrno=0\n\n"],
                         ids=["wireguard-go", "boringtun", "no-device-lines", "no-peers"])
def test_info_reads_only_the_device_section(daemon, text: str) -> None:  # noqa: F811
    _, dev = daemon(lambda req: text)
    full = proto.parse_get(text, "wgfake").info
    assert dev.info() == full


def test_activity_over_the_socket(daemon) -> None:  # noqa: F811
    big = answer([f"private_key={hexkey()}"],
                 [peer_lines(sec=1_789_999_000 + i, rx=i) for i in range(3000)])  # > 64 KiB
    _, dev = daemon(lambda req: big)
    got = dev.activity()
    assert [p.rx_bytes for p in got] == list(range(3000))
    assert [p.public_key for p in got] == [p.public_key for p in from_full(big)]


@pytest.mark.parametrize("reply", ["errno=-22\n\n", f"public_key={PEER_HEX}\nrx_bytes=1\n"],
                         ids=["device-error", "cut-short"])
def test_activity_over_the_socket_fails_loudly(daemon, reply: str) -> None:  # noqa: F811
    _, dev = daemon(lambda req: reply)
    with pytest.raises(ProtocolError):
        dev.activity()
