"""The uapi backend's text protocol and transport, against canned answers.

Canned wireguard-go answers are copied from Debian's wireguard-go; boringtun's
follow its api.rs (own_public_key, no protocol_version, handshake as "seconds
since"). The same code runs end to end against real wireguard-go in
tests/lab/test_wg_backend.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.keys import encode_key, generate_keypair
from appliance.wg import (
    DeviceTimeout,
    Endpoint,
    InterfaceMissing,
    InvalidConfig,
    PeerConfig,
    ProtocolError,
)
from appliance.wg import uapi_protocol as proto
from appliance.wg.uapi import UapiDevice

PRIV_HEX = "10628796bfd6bc17be30748086ce9b83f2ce0b0b93e7c01c70380cb76cef9368"
PEER_HEX = "d3efdeca7a9e154f7f1a0d00cf866b654f9a35ca737ba2068613c7eec1d6265a"
PSK_HEX = "de13b197729209bf748cb47183ff8e1d8b40a5f9d3f9cd1908486cb482b9a1d2"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

WIREGUARD_GO_GET = (
    f"private_key={PRIV_HEX}\nlisten_port=51999\n"
    f"public_key={PEER_HEX}\npreshared_key={PSK_HEX}\nprotocol_version=1\n"
    "endpoint=[2001:db8::1]:5\nlast_handshake_time_sec=1767323000\n"
    "last_handshake_time_nsec=250000000\ntx_bytes=92\nrx_bytes=148\n"
    "persistent_keepalive_interval=25\nallowed_ip=198.18.0.1/32\nallowed_ip=fd00::1/128\n"
    f"public_key={'ab' * 32}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
    "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n\n")

BORINGTUN_GET = (
    f"own_public_key={'cd' * 32}\nlisten_port=51820\n"
    f"public_key={PEER_HEX}\npersistent_keepalive_interval=25\nendpoint=192.0.2.7:51820\n"
    "allowed_ip=198.18.0.2/32\nlast_handshake_time_sec=5\nlast_handshake_time_nsec=500000000\n"
    "rx_bytes=148\ntx_bytes=92\n"
    f"public_key={'ab' * 32}\nallowed_ip=198.18.0.3/32\nrx_bytes=0\ntx_bytes=0\n"
    "errno=0\n\n")


def b64(hex_: str) -> str:
    return encode_key(bytes.fromhex(hex_))


# -- parsing ----------------------------------------------------------------------

def test_wireguard_go_answer():
    dump = proto.parse_get(WIREGUARD_GO_GET, "wg0", now=NOW)
    assert dump.info.private_key == b64(PRIV_HEX)
    assert dump.info.public_key is not None and dump.info.listen_port == 51999
    a, b = dump.peers
    assert a.public_key == b64(PEER_HEX) and a.preshared_key == b64(PSK_HEX)
    assert a.endpoint == Endpoint.parse("[2001:db8::1]:5")
    assert [str(n) for n in a.allowed_ips] == ["198.18.0.1/32", "fd00::1/128"]
    assert (a.rx_bytes, a.tx_bytes, a.persistent_keepalive) == (148, 92, 25)
    # Wall-clock seconds since the epoch, kept as an aware UTC datetime.
    assert a.last_handshake == datetime(2026, 1, 2, 3, 3, 20, 250000, tzinfo=UTC)
    assert b.last_handshake is None and b.preshared_key is None and b.endpoint is None
    assert b.allowed_ips == ()


def test_boringtun_seconds_since_is_normalised():
    dump = proto.parse_get(BORINGTUN_GET, "wg0", now=NOW)
    assert dump.info.private_key is None
    assert dump.info.public_key == b64("cd" * 32)
    a, b = dump.peers
    assert a.last_handshake == NOW - timedelta(seconds=5, milliseconds=500)
    assert a.last_handshake.tzinfo is UTC
    assert str(a.endpoint) == "192.0.2.7:51820" and a.persistent_keepalive == 25
    # boringtun leaves the lines out for a peer that never handshook.
    assert b.last_handshake is None and b.persistent_keepalive == 0


@pytest.mark.parametrize(("sec", "expected"), [
    (7, NOW - timedelta(seconds=7)),                     # small: seconds since
    (1767323000, datetime.fromtimestamp(1767323000, UTC)),  # epoch time
])
def test_unknown_dialect_falls_back_on_magnitude(sec, expected):
    text = (f"listen_port=1\npublic_key={PEER_HEX}\nlast_handshake_time_sec={sec}\n"
            "last_handshake_time_nsec=0\nerrno=0\n\n")
    (p,) = proto.parse_get(text, "wg0", now=NOW).peers
    assert p.last_handshake == expected


@pytest.mark.parametrize(("answer", "code"), [("errno=0\n\n", 0), ("errno=-22\n\n", 22),
                                              ("errno=2\n\n", 2)])
def test_errno_either_sign(answer, code):
    assert proto.answer_errno(answer) == code


def test_errors_are_protocol_errors():
    with pytest.raises(ProtocolError) as info:
        proto.check_errno("errno=-22\n\n", "the peer update", "wg0")
    assert info.value.errno == 22 and "EINVAL" in str(info.value) and "wg0" in str(info.value)
    for bad in ["listen_port=1\n\n", "errno=x\n\n", f"public_key={PEER_HEX}\nrx_bytes=z\n"
                "errno=0\n\n", "garbage\nerrno=0\n\n", "public_key=zz\nerrno=0\n\n"]:
        with pytest.raises(ProtocolError):
            proto.parse_get(bad, "wg0")


# -- encoding ---------------------------------------------------------------------

def test_peer_encoding_is_incremental_and_hex():
    psk = b64(PSK_HEX)
    peer = PeerConfig(b64(PEER_HEX), allowed_ips=["198.18.0.9/32", "fd00::9/128"],
                      preshared_key=psk, endpoint="[2001:db8::2]:51820", persistent_keepalive=0)
    lines = proto.encode_peer(peer)
    assert lines == [f"public_key={PEER_HEX}", f"preshared_key={PSK_HEX}",
                     "endpoint=[2001:db8::2]:51820", "persistent_keepalive_interval=0",
                     "replace_allowed_ips=true", "allowed_ip=198.18.0.9/32",
                     "allowed_ip=fd00::9/128"]
    assert proto.encode_peer(PeerConfig(b64(PEER_HEX), persistent_keepalive=0),
                             update_only=True) == [
        f"public_key={PEER_HEX}", "update_only=true", "persistent_keepalive_interval=0"]
    request = proto.set_request([*proto.encode_remove(b64(PEER_HEX)), *lines]).decode()
    assert request.startswith("set=1\n") and request.endswith("\n\n")
    assert request.count("\n\n") == 1 and "replace_peers" not in request


def test_invalid_configs_are_refused():
    for make in (lambda: PeerConfig("AAAA"),
                 lambda: PeerConfig(b64(PEER_HEX), allowed_ips=["198.18.0.1"]),
                 lambda: PeerConfig(b64(PEER_HEX), endpoint="[2001:db8::1]"),
                 lambda: PeerConfig(b64(PEER_HEX), endpoint="host.example:1"),
                 lambda: PeerConfig(b64(PEER_HEX), persistent_keepalive=-1),
                 lambda: proto.encode_device_set(listen_port=65536)):
        with pytest.raises(InvalidConfig):
            make()


# -- transport, against a fake daemon on a socket of our own ------------------------

class FakeDaemon:
    """Serves one request per connection like boringtun; `answer` decides the reply."""

    def __init__(self, path: Path, answer: Callable[[str], str | None]) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[str] = []
        self.stopped = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # The file object holds the socket open too: close both for a real EOF.
            with conn, conn.makefile("rb") as f:
                first = f.readline().decode()
                body = first
                if first == "set=1\n":
                    while (line := f.readline().decode()) not in ("\n", ""):
                        body += line
                else:
                    f.readline()
                self.requests.append(body)
                reply = self.answer(body)
                if reply is None:
                    self.stopped.wait(2)  # a hung daemon: keep the connection, say nothing
                else:
                    with contextlib.suppress(OSError):
                        conn.sendall(reply.encode())

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def daemon(tmp_path):
    made: list[FakeDaemon] = []

    def start(answer: Callable[[str], str | None]) -> tuple[FakeDaemon, UapiDevice]:
        d = FakeDaemon(tmp_path / f"wg{len(made)}.sock", answer)
        made.append(d)
        return d, UapiDevice("wgfake", path=d.path, timeout=0.5, peers_per_transaction=3)

    yield start
    for d in made:
        d.close()


def test_remove_peers_batches_several_per_transaction(daemon):
    fake, dev = daemon(lambda req: "errno=0\n\n")
    keys = [generate_keypair()[1] for _ in range(7)]
    dev.remove_peers(keys)
    assert len(fake.requests) == 3  # 3 + 3 + 1 with peers_per_transaction=3
    assert [r.count("remove=true") for r in fake.requests] == [3, 3, 1]
    assert all(r.startswith("set=1\n") and "replace_peers" not in r for r in fake.requests)


def test_set_peers_writes_a_batch_in_one_transaction_per_peers_per_transaction(daemon):
    # Installer.install_many hands a worker's batch to set_peers: one set=1 each.
    fake, dev = daemon(lambda req: "errno=0\n\n" if req.startswith("set") else WIREGUARD_GO_GET)
    keys = [generate_keypair()[1] for _ in range(7)]
    dev.set_peers([PeerConfig(k, allowed_ips=[f"198.18.0.{i}/32"],
                              persistent_keepalive=25) for i, k in enumerate(keys)])
    sets = [r for r in fake.requests if r.startswith("set=1")]
    assert [r.count("public_key=") for r in sets] == [3, 3, 1]
    assert [r.count("replace_allowed_ips=true") for r in sets] == [3, 3, 1]


def test_clear_keepalives_is_one_update_only_transaction(daemon):
    fake, dev = daemon(lambda req: "errno=0\n\n" if req.startswith("set") else WIREGUARD_GO_GET)
    keys = [generate_keypair()[1] for _ in range(2)]
    dev.clear_keepalives(keys)
    sets = [r for r in fake.requests if r.startswith("set=1")]
    assert len(sets) == 1
    assert sets[0].count("update_only=true\npersistent_keepalive_interval=0") == 2


def test_set_error_is_raised_with_errno(daemon):
    _, dev = daemon(lambda req: "errno=-22\n\n" if req.startswith("set") else WIREGUARD_GO_GET)
    with pytest.raises(ProtocolError) as info:
        dev.set_peer(PeerConfig(b64(PEER_HEX), allowed_ips=["198.18.0.1/32"]))
    assert info.value.errno == 22


def test_update_only_is_left_out_for_boringtun(daemon):
    fake, dev = daemon(lambda req: BORINGTUN_GET if req.startswith("get") else "errno=0\n\n")
    dev.clear_keepalive(b64(PEER_HEX))
    assert "update_only" not in fake.requests[-1]
    assert dev.peers()[0].last_handshake is not None
    fake2, dev2 = daemon(lambda req: WIREGUARD_GO_GET if req.startswith("get")
                         else "errno=0\n\n")
    dev2.clear_keepalive(b64(PEER_HEX))
    assert "update_only=true\npersistent_keepalive_interval=0" in fake2.requests[-1]


def test_a_daemon_that_does_not_answer_times_out(daemon):
    _, dev = daemon(lambda req: None)
    with pytest.raises(DeviceTimeout):
        dev.peers()


def test_a_truncated_answer_is_a_protocol_error(daemon):
    _, dev = daemon(lambda req: WIREGUARD_GO_GET[:40])
    with pytest.raises(ProtocolError, match="closed the connection"):
        dev.peers()


def test_missing_and_stale_sockets(tmp_path):
    with pytest.raises(InterfaceMissing, match="no UAPI socket"):
        UapiDevice("wgnone", path=tmp_path / "none.sock").peers()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # bound, never listening: what a killed daemon leaves
    try:
        with pytest.raises(InterfaceMissing, match="stale"):
            UapiDevice("wgstale", path=stale).peers()
    finally:
        s.close()
