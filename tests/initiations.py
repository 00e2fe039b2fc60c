"""Build handshake initiations as a WireGuard initiator would: for tests and benches.

Not used by the gateway (the data plane writes real initiations), so it is not
part of the `appliance` package and not in its wheel (tests/unit/test_wheel.py
checks): gateways get no code that forges initiations. Unit tests, lab tests and
bench/ import it from the checkout. It uses the whitepaper primitives of
appliance/gateway/handshake.py rather than copies of them; the builder and the
reader are cross-checked against `noiseprotocol` and against initiations
captured from a real wireguard-go client (tests/unit/test_handshake.py).
It holds no keys of its own; callers pass throwaway test keys.
"""

from __future__ import annotations

import secrets
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.gateway.handshake import (
    AEAD_ENCRYPT,
    DH,
    HASH,
    INITIAL_CHAINING_KEY,
    INITIAL_HASH,
    KDF1,
    KDF2,
    LABEL_MAC1,
    MAC,
    MAC_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    OFFSET_MAC1,
    OFFSET_MAC2,
    tai64n,
)


def build_initiation(
    initiator_private: bytes,
    responder_public: bytes,
    *,
    timestamp: bytes | None = None,
    sender_index: int | None = None,
    ephemeral_private: bytes | None = None,
    mac2: bytes = bytes(MAC_SIZE),
    claimed_static: bytes | None = None,
) -> bytes:
    """A 148-byte MESSAGE_INITIATION from `initiator_private` to `responder_public`.

    The pre-shared key is not an input: it enters the handshake only after the
    first message (psk2), so the first message is the same with or without one.
    `claimed_static` puts someone else's public key in the static field while the
    timestamp is still keyed with `initiator_private`: a forgery, for tests.
    """
    s_i = X25519PrivateKey.from_private_bytes(initiator_private)
    e_i = (X25519PrivateKey.generate() if ephemeral_private is None
           else X25519PrivateKey.from_private_bytes(ephemeral_private))
    if timestamp is None:
        timestamp = tai64n()
    if sender_index is None:
        sender_index = secrets.randbits(32)

    c = INITIAL_CHAINING_KEY
    h = HASH(INITIAL_HASH + responder_public)
    ephemeral = e_i.public_key().public_bytes_raw()
    c = KDF1(c, ephemeral)
    h = HASH(h + ephemeral)
    c, key = KDF2(c, DH(e_i, responder_public))
    static = s_i.public_key().public_bytes_raw() if claimed_static is None else claimed_static
    encrypted_static = AEAD_ENCRYPT(key, static, h)
    h = HASH(h + encrypted_static)
    c, key = KDF2(c, DH(s_i, responder_public))
    encrypted_timestamp = AEAD_ENCRYPT(key, timestamp, h)

    body = (struct.pack("<B3xI", MESSAGE_INITIATION_TYPE, sender_index)
            + ephemeral + encrypted_static + encrypted_timestamp)
    packet = body + MAC(HASH(LABEL_MAC1 + responder_public), body) + mac2
    assert len(packet) == MESSAGE_INITIATION_SIZE
    return packet


def with_mac1(packet: bytes, responder_public: bytes) -> bytes:
    """`packet` with mac1 recomputed, so a tampered message gets past the mac1 check."""
    mac1 = MAC(HASH(LABEL_MAC1 + responder_public), packet[:OFFSET_MAC1])
    return packet[:OFFSET_MAC1] + mac1 + packet[OFFSET_MAC2:]
