"""Cookie replies (whitepaper 5.4.7): known vectors, and the round trip an initiator makes.

The lab test (tests/lab/test_gateway_flood.py) is the real check: a stock
wireguard-go client accepts our cookie reply and answers with a valid mac2.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from nacl.exceptions import CryptoError

from appliance.gateway.cookie import (
    COOKIE_REFRESH_TIME,
    MESSAGE_COOKIE_REPLY_SIZE,
    PREVIOUS_SECRET_GRACE,
    XAEAD,
    CookieResponder,
    consume_cookie_reply,
    cookie_key,
    source_bytes,
    with_mac2,
)
from appliance.gateway.handshake import (
    HASH,
    LABEL_COOKIE,
    MAC,
    OFFSET_MAC1,
    OFFSET_MAC2,
    Responder,
)
from appliance.keys import decode_key

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REAL = json.loads((FIXTURES / "wireguard_go_initiations.json").read_text())
RESPONDER_PUBLIC = decode_key(REAL["responder_public_key"])
PACKET = bytes.fromhex(REAL["packets"][0])
REKEY_TIMEOUT = 5.0  # a WireGuard client's wait before it tries again


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_random():
    """Deterministic 'random' bytes: 0x01 repeated, then 0x02 repeated, ..."""
    calls = [0]

    def random(n: int) -> bytes:
        calls[0] += 1
        return bytes([calls[0]]) * n
    return random


def test_xaead_is_xchacha20poly1305_as_the_cfrg_draft_vector_says() -> None:
    # draft-irtf-cfrg-xchacha-03, A.3.1
    key, nonce = bytes(range(0x80, 0xA0)), bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only "
                 b"one tip for the future, sunscreen would be it.")
    out = XAEAD(key, nonce, plaintext, aad)
    assert out[:16].hex() == "bd6d179d3e83d43b9576579493c0e939"
    assert out[-16:].hex() == "c0875924c1c7987947deafd8780acf49"


def test_reply_layout_and_contents_follow_the_whitepaper() -> None:
    clock = Clock()
    cookies = CookieResponder(RESPONDER_PUBLIC, clock=clock, random=counting_random())
    # R_m is drawn first, then the key of the nonce's tag, then the nonce's random part.
    secret, mark = b"\x01" * 32, b"\x02" * 32
    nonce = b"\x03" * 16 + MAC(mark, b"\x03" * 16)[:8]
    reply = cookies.reply(PACKET, "192.0.2.7", 40000)

    assert len(reply) == MESSAGE_COOKIE_REPLY_SIZE == 64
    assert reply[0] == 3 and reply[1:4] == b"\0\0\0"
    assert reply[4:8] == PACKET[4:8]  # receiver = the initiation's sender index
    assert reply[8:32] == nonce
    tau = MAC(secret, bytes([192, 0, 2, 7]) + struct.pack("!H", 40000))
    assert cookie_key(RESPONDER_PUBLIC) == HASH(LABEL_COOKIE + RESPONDER_PUBLIC)
    assert reply[32:] == XAEAD(HASH(b"cookie--" + RESPONDER_PUBLIC), nonce, tau,
                               PACKET[OFFSET_MAC1:OFFSET_MAC2])
    # Pinned, so that a change to any of the above shows.
    assert reply.hex() == REPLY_VECTOR
    # The tag tells this responder's replies from anyone else's (cookie_learn.py).
    assert cookies.is_own(reply)
    other = CookieResponder(RESPONDER_PUBLIC, clock=clock)
    assert not cookies.is_own(other.reply(PACKET, "192.0.2.7", 40000))
    assert not cookies.is_own(reply[:8] + bytes(24) + reply[32:])


REPLY_VECTOR = ("030000000822186e" + "03" * 16 + "af06c209121b59c0"
                "9b36d27cbdfbb244301984cd322ad1d41807b3954851046a4040e51d3cc2ca66")


def test_a_real_clients_initiation_round_trip_through_the_initiator_side() -> None:
    """What the client does with our reply: open it with the mac1 it sent, MAC its
    next message with tau; the gateway then finds mac2 valid for that source only."""
    clock = Clock()
    cookies = CookieResponder(RESPONDER_PUBLIC, clock=clock)
    responder = Responder(decode_key(REAL["responder_private_key"]))
    assert responder.mac1_valid(PACKET) and not any(PACKET[OFFSET_MAC2:])
    assert not cookies.mac2_valid(PACKET, "192.0.2.7", 40000)  # no mac2 at all

    reply = cookies.reply(PACKET, "192.0.2.7", 40000)
    tau = consume_cookie_reply(reply, RESPONDER_PUBLIC, PACKET[OFFSET_MAC1:OFFSET_MAC2])
    assert tau == cookies.cookie("192.0.2.7", 40000)
    retry = bytes.fromhex(REAL["packets"][1])  # the client's next initiation
    signed = with_mac2(retry, tau)
    assert responder.consume_initiation(signed).has_mac2  # mac1 is untouched by mac2
    assert cookies.mac2_valid(signed, "192.0.2.7", 40000)
    assert not cookies.mac2_valid(signed, "192.0.2.7", 40001)  # another port
    assert not cookies.mac2_valid(signed, "192.0.2.8", 40000)  # another address
    v6 = with_mac2(retry, cookies.cookie("2001:db8::7", 40000))
    assert cookies.mac2_valid(v6, "2001:db8::7", 40000)
    assert not cookies.mac2_valid(v6, "2001:db8::8", 40000)

    # The reply opens only with the mac1 it answered (AD), and only for our key.
    with pytest.raises(CryptoError):
        consume_cookie_reply(reply, RESPONDER_PUBLIC, bytes(16))
    with pytest.raises(CryptoError):
        consume_cookie_reply(reply, bytes(32), PACKET[OFFSET_MAC1:OFFSET_MAC2])

    # R_m changes every two minutes; a cookie made just before still counts on the
    # client's next try (PREVIOUS_SECRET_GRACE), then no longer.
    clock.now += COOKIE_REFRESH_TIME - 1
    assert cookies.mac2_valid(signed, "192.0.2.7", 40000)
    clock.now += 1 + REKEY_TIMEOUT
    assert cookies.mac2_valid(signed, "192.0.2.7", 40000), "made 6 s ago, before the change"
    assert cookies.cookie("192.0.2.7", 40000) != tau, "new cookies from the new R_m"
    clock.now += PREVIOUS_SECRET_GRACE - REKEY_TIMEOUT
    assert not cookies.mac2_valid(signed, "192.0.2.7", 40000)
    # A secret left unused past its time is not honoured after its change.
    stale = with_mac2(retry, cookies.cookie("192.0.2.7", 40000))
    clock.now += 3 * COOKIE_REFRESH_TIME
    assert not cookies.mac2_valid(stale, "192.0.2.7", 40000)


def test_source_bytes_are_address_then_port_in_network_order() -> None:
    assert source_bytes("192.0.2.1", 51820) == bytes([192, 0, 2, 1, 0xCA, 0x6C])
    assert len(source_bytes("2001:db8::1", 1)) == 18
