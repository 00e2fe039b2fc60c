"""Reading handshake initiations: checked against noiseprotocol and real wireguard-go."""

from __future__ import annotations

import hmac
import json
import secrets
import struct
from pathlib import Path

import pytest
from noise.connection import Keypair, NoiseConnection

from appliance.gateway.handshake import (
    CONSTRUCTION,
    HMAC,
    IDENTIFIER,
    KDF1,
    KDF2,
    MESSAGE_INITIATION_SIZE,
    OFFSET_EPHEMERAL,
    OFFSET_MAC1,
    OFFSET_MAC2,
    OFFSET_SENDER,
    OFFSET_STATIC,
    OFFSET_TIMESTAMP,
    REASONS,
    InitiationError,
    Responder,
    tai64n,
    tai64n_to_unix,
)
from appliance.gateway.replay import ReplayGuard
from appliance.keys import decode_key, generate_private_key, public_key
from tests.initiations import build_initiation, with_mac1

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DUMMY_PSK = bytes(32)  # noiseprotocol insists on one; the first message never uses it


def flip(packet: bytes, offset: int) -> bytes:
    return packet[:offset] + bytes([packet[offset] ^ 0x01]) + packet[offset + 1:]


def reason(responder: Responder, packet: bytes) -> str:
    with pytest.raises(InitiationError) as info:
        responder.consume_initiation(packet)
    assert info.value.reason in REASONS
    return info.value.reason


@pytest.fixture(scope="module")
def keys():
    r, i = generate_private_key(), generate_private_key()
    return {"r": r, "R": public_key(r), "i": i, "I": public_key(i), "resp": Responder(r)}


# --- noiseprotocol as the reference -----------------------------------------------

def noise_responder_reads(responder_private: bytes, packet: bytes) -> tuple[bytes, bytes]:
    """(remote static, payload) as noiseprotocol's responder sees message 1."""
    conn = NoiseConnection.from_name(CONSTRUCTION)
    conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, responder_private)
    conn.set_psks(psk=DUMMY_PSK)
    conn.set_prologue(IDENTIFIER)
    conn.start_handshake()
    payload = conn.read_message(packet[OFFSET_EPHEMERAL:OFFSET_MAC1])
    return conn.noise_protocol.handshake_state.rs.public_bytes, payload


def noise_initiator_writes(initiator_private: bytes, responder_public: bytes,
                           timestamp: bytes) -> bytes:
    """ephemeral | encrypted static | encrypted timestamp, written by noiseprotocol."""
    conn = NoiseConnection.from_name(CONSTRUCTION)
    conn.set_as_initiator()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, initiator_private)
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, responder_public)
    conn.set_psks(psk=DUMMY_PSK)
    conn.set_prologue(IDENTIFIER)
    conn.start_handshake()
    return conn.write_message(timestamp)


def test_noiseprotocol_reads_what_we_build_and_we_read_what_it_builds():
    for n in range(100):
        r, i = generate_private_key(), generate_private_key()
        ours = Responder(r)
        ts = tai64n(1_700_000_000 + n)

        packet = build_initiation(i, ours.public_key, timestamp=ts, sender_index=n)
        static, payload = noise_responder_reads(r, packet)
        assert static == public_key(i)
        assert payload == ts
        got = ours.consume_initiation(packet)
        assert (got.initiator_static, got.timestamp, got.sender_index) == (static, ts, n)

        # The other way round: noiseprotocol writes the Noise part, we frame it.
        body = struct.pack("<B3xI", 1, n) + noise_initiator_writes(i, ours.public_key, ts)
        framed = with_mac1(body + bytes(32), ours.public_key)
        got = ours.consume_initiation(framed)
        assert (got.initiator_static, got.timestamp) == (public_key(i), ts)


# --- a real wireguard-go client ---------------------------------------------------

FIXTURE_FILES = sorted(FIXTURES.glob("wireguard_go_*.json"))


def test_fixtures_present():
    assert len(FIXTURE_FILES) >= 2


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_decodes_initiations_from_wireguard_go(path):
    data = json.loads(path.read_text())
    responder = Responder(decode_key(data["responder_private_key"]))
    assert responder.public_key == decode_key(data["responder_public_key"])
    guard = ReplayGuard()
    for n, hexed in enumerate(data["packets"]):
        packet = bytes.fromhex(hexed)
        assert len(packet) == MESSAGE_INITIATION_SIZE
        got = responder.consume_initiation(packet)
        assert got.initiator_static == decode_key(data["initiator_public_key"])
        assert not got.has_mac2
        # wireguard-go retries every 5 s; its clock and ours agree on TAI64N.
        assert abs(got.unix_time - data["captured_at_unix"] - 5 * n) < 2
        assert guard.accept(got.initiator_static, got.timestamp)
        assert noise_responder_reads(decode_key(data["responder_private_key"]), packet) == (
            got.initiator_static, got.timestamp)
    # Replaying the first one (after the retry, or on its own) must fail.
    first = responder.consume_initiation(bytes.fromhex(data["packets"][0]))
    assert not guard.accept(first.initiator_static, first.timestamp)


def test_fixture_not_for_another_responder():
    data = json.loads((FIXTURES / "wireguard_go_initiations.json").read_text())
    assert reason(Responder(generate_private_key()), bytes.fromhex(data["packets"][0])) == "mac1"


# --- malformed input --------------------------------------------------------------

def test_malformed_table(keys):
    resp, R = keys["resp"], keys["R"]
    good = build_initiation(keys["i"], R)
    someone = generate_private_key()
    forged = build_initiation(keys["i"], R, claimed_static=public_key(someone))
    cases = {
        "short": good[:-1],
        "long": good + b"\x00",
        "type": with_mac1(b"\x04" + good[1:], R),
        "reserved": with_mac1(good[:2] + b"\x01" + good[3:], R),
        "mac1": flip(good, OFFSET_MAC1),
        "static_aead": with_mac1(flip(good, OFFSET_STATIC + 3), R),
        "timestamp_aead": with_mac1(flip(good, OFFSET_TIMESTAMP + 3), R),
        "ephemeral": with_mac1(good[:OFFSET_EPHEMERAL] + bytes(32) + good[OFFSET_STATIC:], R),
        # A static field that opens to a low-order point (here 0): ss would be all zeros.
        "static": build_initiation(keys["i"], R, claimed_static=bytes(32)),
    }
    assert set(cases) == set(REASONS), "every drop reason has a packet that earns it"
    for want, packet in cases.items():
        assert reason(resp, packet) == want, want
    # Someone else's key in the static field: it opens, but the timestamp was keyed
    # with the forger's private key, so it does not.
    assert reason(resp, forged) == "timestamp_aead"
    assert reason(resp, b"") == "short"
    assert reason(resp, bytes(174)) == "long"  # the spurious 174-byte layout


def test_every_bit_before_mac1_is_covered(keys):
    """Flip each byte: mac1 catches what the header checks do not; with mac1
    recomputed, the AEADs catch everything but the sender index."""
    resp, R = keys["resp"], keys["R"]
    good = build_initiation(keys["i"], R, sender_index=0x01020304)
    for off in range(OFFSET_MAC1):
        bad = flip(good, off)
        assert reason(resp, bad) == ("mac1" if off >= OFFSET_SENDER else
                                     "type" if off == 0 else "reserved")
        remac = with_mac1(bad, R)
        if off == 0:
            want = "type"
        elif off < OFFSET_SENDER:
            want = "reserved"
        elif off < OFFSET_EPHEMERAL:
            want = None  # the sender index is protected by mac1 only
        elif off < OFFSET_TIMESTAMP:
            want = "static_aead"
        else:
            want = "timestamp_aead"
        if want is None:
            got = resp.consume_initiation(remac)
            assert got.sender_index == 0x01020304 ^ (1 << (8 * (off - OFFSET_SENDER)))
        else:
            assert reason(resp, remac) == want, off


def test_mac2_is_not_checked_but_reported(keys):
    packet = build_initiation(keys["i"], keys["R"], mac2=b"\x07" * 16)
    got = keys["resp"].consume_initiation(packet)
    assert got.has_mac2 and got.mac2 == b"\x07" * 16
    assert keys["resp"].consume_initiation(flip(packet, OFFSET_MAC2)).initiator_static == keys["I"]


def test_fields(keys):
    ts = tai64n(1_800_000_000.25)
    eph = generate_private_key()
    got = keys["resp"].consume_initiation(
        build_initiation(keys["i"], keys["R"], timestamp=ts, sender_index=0xDEADBEEF,
                         ephemeral_private=eph))
    assert got.sender_index == 0xDEADBEEF
    assert got.ephemeral == public_key(eph)
    assert got.timestamp == ts
    assert got.unix_time == pytest.approx(1_800_000_000.25)
    assert len(got.initiator_static) == 32


def test_hmac_and_kdf_match_the_stdlib():
    for n in range(50):
        key, data = secrets.token_bytes(n % 33 + 32 * (n % 2)), secrets.token_bytes(n)
        assert HMAC(key, data) == hmac.digest(key, data, "blake2s")
        t0 = hmac.digest(key, data, "blake2s")
        t1 = hmac.digest(t0, b"\x01", "blake2s")
        t2 = hmac.digest(t0, t1 + b"\x02", "blake2s")
        assert KDF1(key, data) == t1
        assert KDF2(key, data) == (t1, t2)


def test_tai64n():
    assert tai64n(0) == bytes.fromhex("400000000000000a00000000")
    assert tai64n_to_unix(tai64n(1234.5)) == 1234.5
    assert tai64n(1.0) < tai64n(1.000000001) < tai64n(2)


def test_responder_key_checks():
    with pytest.raises(ValueError):
        Responder(b"\x01" * 31)
    r = generate_private_key()
    assert Responder(r).public_key == public_key(r)
    assert "public_key" in repr(Responder(r)) and r.hex() not in repr(Responder(r))


# --- replay -----------------------------------------------------------------------

def test_replay_guard_accepts_only_strictly_newer(keys):
    resp = keys["resp"]
    guard = ReplayGuard()
    older = resp.consume_initiation(build_initiation(keys["i"], keys["R"], timestamp=tai64n(100)))
    newer = resp.consume_initiation(build_initiation(keys["i"], keys["R"], timestamp=tai64n(101)))
    assert guard.accept(newer.initiator_static, newer.timestamp)
    assert not guard.accept(newer.initiator_static, newer.timestamp)  # same packet again
    assert not guard.accept(older.initiator_static, older.timestamp)  # older, arrived late
    # Another key has its own clock.
    other = generate_private_key()
    o = resp.consume_initiation(build_initiation(other, keys["R"], timestamp=tai64n(50)))
    assert guard.accept(o.initiator_static, o.timestamp)
    assert guard.accept(newer.initiator_static, tai64n(101.000001))
    assert len(guard) == 2


def test_replay_guard_is_bounded_lru():
    guard = ReplayGuard(capacity=3)
    keys = [bytes([k]) * 32 for k in range(5)]
    for k in keys[:3]:
        assert guard.accept(k, tai64n(10))
    assert guard.accept(keys[0], tai64n(11))  # keys[0] is now the most recent
    assert guard.accept(keys[3], tai64n(10))  # evicts keys[1]
    assert len(guard) == 3 and guard.evictions == 1
    assert guard.accept(keys[1], tai64n(10))  # forgotten, so accepted again
    assert not guard.accept(keys[0], tai64n(11))  # still remembered
    guard.forget(keys[0])
    assert guard.accept(keys[0], tai64n(11))
    with pytest.raises(ValueError):
        ReplayGuard(capacity=0)


def test_the_two_halves_read_what_the_whole_reads(keys):
    packet = build_initiation(keys["i"], keys["R"], timestamp=tai64n(77))
    opened = keys["resp"].open_static(packet)
    assert opened.initiator_static == keys["I"], "the claimed key after one X25519"
    assert keys["resp"].open_timestamp(opened) == keys["resp"].consume_initiation(packet)
    # A forgery claims someone else's key: the first half reads the claim, the
    # second refuses it (the timestamp was keyed with another private key).
    forged = build_initiation(generate_private_key(), keys["R"], claimed_static=keys["I"])
    claimed = keys["resp"].open_static(forged)
    assert claimed.initiator_static == keys["I"]
    with pytest.raises(InitiationError) as e:
        keys["resp"].open_timestamp(claimed)
    assert e.value.reason == "timestamp_aead"
    # The first half makes the cheap checks first.
    for bad, why in ((packet[:-1], "short"), (flip(packet, OFFSET_MAC1), "mac1"),
                     (flip(packet, OFFSET_STATIC), "mac1"),
                     (with_mac1(flip(packet, OFFSET_STATIC), keys["R"]), "static_aead")):
        with pytest.raises(InitiationError) as e:
            keys["resp"].open_static(bad)
        assert e.value.reason == why
