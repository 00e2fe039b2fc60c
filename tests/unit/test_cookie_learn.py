"""Learning the data plane's cookies (cookie_learn.py), bytes in and bytes out.

The data plane's reply is built here as wireguard-go's responder builds one
(whitepaper 5.4.7): tau a MAC of the source under a secret the daemon never
sees, sealed with XChaCha20-Poly1305 under HASH(LABEL_COOKIE || S_pub) with the
answered initiation's mac1 as associated data. The lab test
(tests/lab/test_dataplane_cookies.py) checks the same against a real wireguard-go.
"""

from __future__ import annotations

import secrets
import struct

import pytest

from appliance.gateway import cookie_learn
from appliance.gateway.cookie import (
    COOKIE_REFRESH_TIME,
    XAEAD,
    CookieResponder,
    consume_cookie_reply,
    cookie_key,
    with_mac2,
)
from appliance.gateway.cookie_learn import ISSUING_FOR, PENDING_FOR, CookieLearner
from appliance.gateway.gate import COOKIE, VERIFY, WITHHELD, InitiationGate
from appliance.gateway.handshake import MAC, OFFSET_MAC1, OFFSET_MAC2, OFFSET_SENDER, Responder
from appliance.gateway.load import LoadSignal
from appliance.keys import generate_private_key
from tests.initiations import build_initiation

CLIENT = ("198.51.100.7", 40000)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class DataPlane:
    """A responder's cookie side as wireguard-go has it: its own secret, its own
    encoding of the source (address, then the port little-endian), one reply per
    initiation lacking its mac2."""

    def __init__(self, public: bytes) -> None:
        self.public = public
        self.secret = secrets.token_bytes(32)

    def tau(self, ip: str, port: int) -> bytes:
        return MAC(self.secret, bytes(int(x) for x in ip.split(".")) + struct.pack("<H", port))

    def reply(self, initiation: bytes, ip: str, port: int) -> bytes:
        nonce = secrets.token_bytes(24)
        sealed = XAEAD(cookie_key(self.public), nonce, self.tau(ip, port),
                       initiation[OFFSET_MAC1:OFFSET_MAC2])
        return b"\x03\x00\x00\x00" + initiation[OFFSET_SENDER:OFFSET_SENDER + 4] + nonce + sealed


@pytest.fixture
def setup():
    clock = Clock()
    responder = Responder(generate_private_key())
    ours = CookieResponder(responder.public_key, clock=clock)
    learner = CookieLearner(responder.public_key, ours.is_own, clock=clock)
    return clock, responder, ours, learner, DataPlane(responder.public_key)


def client_initiation(public: bytes) -> bytes:
    return build_initiation(generate_private_key(), public)


def test_a_client_answering_the_data_planes_cookie_is_proven_to_the_daemon(setup) -> None:
    clock, responder, _, learner, dataplane = setup
    first = client_initiation(responder.public_key)
    learner.saw_initiation(first, *CLIENT)
    assert not learner.issuing
    reply = dataplane.reply(first, *CLIENT)
    learner.saw_reply(reply, *CLIENT)
    assert learner.issuing and learner.learned == 1
    assert learner.cookie(*CLIENT) == dataplane.tau(*CLIENT)

    # The client opens the reply with the mac1 it sent and MACs its retry with tau.
    tau = consume_cookie_reply(reply, responder.public_key, first[OFFSET_MAC1:OFFSET_MAC2])
    clock.now += 5.0
    retry = with_mac2(client_initiation(responder.public_key), tau)
    assert learner.mac2_valid(retry, *CLIENT)
    assert learner.used == 1
    # The cookie proves that source only, and only a mac2 made with it counts.
    assert not learner.mac2_valid(retry, CLIENT[0], CLIENT[1] + 1)
    assert not learner.mac2_valid(retry, "198.51.100.8", CLIENT[1])
    assert not learner.mac2_valid(retry[:OFFSET_MAC2] + bytes(16), *CLIENT)
    assert not learner.mac2_valid(with_mac2(retry, secrets.token_bytes(16)), *CLIENT)
    # After the data plane's secret has changed (at most 2 minutes on), it is forgotten.
    clock.now += COOKIE_REFRESH_TIME
    assert not learner.mac2_valid(retry, *CLIENT)
    assert len(learner) == 0


def test_a_reply_read_before_its_initiation_is_matched_when_the_initiation_comes(
        setup) -> None:
    """The reply socket can be read ahead of a lagging initiation socket."""
    clock, responder, _, learner, dataplane = setup
    first = client_initiation(responder.public_key)
    learner.saw_reply(dataplane.reply(first, *CLIENT), *CLIENT)
    assert learner.issuing and learner.learned == 0
    clock.now += PENDING_FOR / 2
    learner.saw_initiation(first, *CLIENT)
    assert learner.learned == 1
    assert learner.cookie(*CLIENT) == dataplane.tau(*CLIENT)


def test_replies_that_do_not_match_teach_nothing(setup) -> None:
    clock, responder, ours, learner, dataplane = setup
    first = client_initiation(responder.public_key)
    learner.saw_initiation(first, *CLIENT)
    # Our own reply leaving: not the data plane's, and it is not issuing.
    learner.saw_reply(ours.reply(first, *CLIENT), *CLIENT)
    assert not learner.issuing and learner.learned == 0
    # The data plane's reply to that index, but towards another address.
    learner.saw_reply(dataplane.reply(first, *CLIENT), "198.51.100.8", CLIENT[1])
    assert learner.learned == 0 and learner.cookie("198.51.100.8", CLIENT[1]) is None
    # Made for another responder key: stored, but it does not open, and is dropped.
    other = DataPlane(Responder(generate_private_key()).public_key)
    learner.saw_reply(other.reply(first, *CLIENT), *CLIENT)
    assert learner.learned == 1 and learner.cookie(*CLIENT) is None and len(learner) == 0
    # Too late: the initiation was forgotten.
    second = client_initiation(responder.public_key)
    learner.saw_initiation(second, *CLIENT)
    clock.now += PENDING_FOR
    learner.saw_reply(dataplane.reply(second, *CLIENT), *CLIENT)
    assert learner.learned == 1
    # Not a cookie reply at all.
    learner.saw_reply(b"\x02" + bytes(63), *CLIENT)
    learner.saw_reply(dataplane.reply(second, *CLIENT)[:63], *CLIENT)
    assert learner.learned == 1


def test_issuing_lapses_a_second_after_the_data_planes_last_reply(setup) -> None:
    clock, responder, _, learner, dataplane = setup
    first = client_initiation(responder.public_key)
    learner.saw_reply(dataplane.reply(first, *CLIENT), *CLIENT)
    clock.now += ISSUING_FOR * 0.9
    assert learner.issuing
    clock.now += ISSUING_FOR * 0.2
    assert not learner.issuing


def test_memory_is_bounded(setup, monkeypatch) -> None:
    clock, responder, _, learner, dataplane = setup
    monkeypatch.setattr(cookie_learn, "PENDING_MAX", 8)
    monkeypatch.setattr(cookie_learn, "LEARNED_MAX", 4)
    packets = [client_initiation(responder.public_key) for _ in range(10)]
    for n, p in enumerate(packets):
        learner.saw_initiation(p, "192.0.2.1", 1000 + n)
    assert len(learner._initiations) == 8
    for n, p in enumerate(packets):
        learner.saw_reply(dataplane.reply(p, "192.0.2.1", 1000 + n), "192.0.2.1", 1000 + n)
    assert len(learner) == 4  # the newest four sources
    assert learner.cookie("192.0.2.1", 1009) == dataplane.tau("192.0.2.1", 1009)
    assert learner.cookie("192.0.2.1", 1005) is None
    # The two replies whose initiations were pushed out wait as orphans, bounded too.
    assert len(learner._orphans) == 2


def test_gate_withholds_its_cookie_while_the_data_plane_issues_and_takes_its_mac2() -> None:
    clock = Clock()
    responder = Responder(generate_private_key())
    ours = CookieResponder(responder.public_key, clock=clock)
    learner = CookieLearner(responder.public_key, ours.is_own, clock=clock)
    gate = InitiationGate(responder, ours, LoadSignal("always", clock=clock), None,
                          lambda ep: False, learner)
    dataplane = DataPlane(responder.public_key)
    endpoint = f"{CLIENT[0]}:{CLIENT[1]}"

    first = client_initiation(responder.public_key)
    # Nothing from the data plane yet: the daemon answers with its own cookie.
    assert gate.judge(first, *CLIENT, endpoint).action == COOKIE
    # Once the data plane answers, the daemon stays silent for every source...
    reply = dataplane.reply(first, *CLIENT)
    learner.saw_reply(reply, *CLIENT)
    stranger = client_initiation(responder.public_key)
    assert gate.judge(stranger, "203.0.113.5", 9, "203.0.113.5:9") == (WITHHELD, "mac2")
    # ...and the client holding the last cookie to arrive, the data plane's, gets in.
    tau = consume_cookie_reply(reply, responder.public_key, first[OFFSET_MAC1:OFFSET_MAC2])
    clock.now += 5.0
    retry = with_mac2(client_initiation(responder.public_key), tau)
    assert gate.judge(retry, *CLIENT, endpoint).action == VERIFY
    # As does one that kept ours (its reply came last): both cookies are accepted.
    ours_tau = consume_cookie_reply(ours.reply(first, *CLIENT), responder.public_key,
                                    first[OFFSET_MAC1:OFFSET_MAC2])
    other = with_mac2(client_initiation(responder.public_key), ours_tau)
    assert gate.judge(other, *CLIENT, endpoint).action == VERIFY
    # When the data plane has been quiet for a second, the daemon answers again.
    clock.now += ISSUING_FOR
    assert gate.judge(stranger, "203.0.113.5", 9, "203.0.113.5:9").action == COOKIE


def test_a_withheld_initiation_the_data_plane_leaves_unanswered_is_owed_our_cookie(
        setup) -> None:
    clock, responder, _, learner, dataplane = setup
    answered, dropped = (client_initiation(responder.public_key) for _ in range(2))
    for packet, token in ((answered, "a"), (dropped, "d")):
        learner.saw_initiation(packet, *CLIENT)
        learner.withhold(packet, *CLIENT, token)
    assert learner.owed() == []  # not yet due
    learner.saw_reply(dataplane.reply(answered, *CLIENT), *CLIENT)
    clock.now += cookie_learn.OWED_AFTER
    assert learner.owed() == ["d"]  # the data plane answered the other one
    assert learner.owed() == []
    # A reply read before its initiation (an orphan, matched by saw_initiation): the
    # initiation is answered already and nothing is owed for it.
    late = client_initiation(responder.public_key)
    learner.saw_reply(dataplane.reply(late, *CLIENT), *CLIENT)
    learner.saw_initiation(late, *CLIENT)
    learner.withhold(late, *CLIENT, "l")
    clock.now += cookie_learn.OWED_AFTER
    assert learner.owed() == []
