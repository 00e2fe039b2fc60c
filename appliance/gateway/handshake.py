"""The first message of WireGuard's handshake, read by the responder.

This follows section 5.4.2 of the WireGuard whitepaper ("First Message: Initiator
to Responder") from the responder's side, and stops where the gateway has what it
needs: the initiator's static public key, proven by a timestamp that only the
holder of the matching private key could have encrypted. The gateway never
answers the message itself -- the data plane (kernel or wireguard-go) does, once
the peer is installed -- so nothing here derives session keys, handles the
pre-shared key (it enters only with the second message), or checks mac2.

Message layout (148 bytes, little-endian sender index):

    type(1)=1 | reserved(3)=0 | sender(4) | ephemeral(32) | static(32+16) |
    timestamp(12+16) | mac1(16) | mac2(16)

Some copies of wireguard-go's source in circulation show a 174-byte initiation
with an extra encrypted field; running WireGuard sends 148 bytes, and anything
else is rejected here as "short" or "long".

Checks run cheapest first so that junk costs little: length, type, reserved,
mac1 (one keyed BLAKE2s over 116 bytes), then the two X25519 operations with an
AEAD open after each. Only a message whose timestamp opens is returned. The two
halves can be run apart (open_static, then open_timestamp): after the first the
claimed static key is known, and a gateway that would refuse that key anyway
(it is not registered) saves the second X25519, half of a random-key flood's cost.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

# --- Protocol constants, named as in the whitepaper --------------------------------

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

MESSAGE_INITIATION_TYPE = 1
MESSAGE_COOKIE_REPLY_TYPE = 3
MESSAGE_TRANSPORT_TYPE = 4

NOISE_PUBLIC_KEY_SIZE = 32
AEAD_TAG_SIZE = 16
TAI64N_SIZE = 12
MAC_SIZE = 16  # mac1 and mac2 are keyed BLAKE2s truncated to 128 bits

ENCRYPTED_STATIC_SIZE = NOISE_PUBLIC_KEY_SIZE + AEAD_TAG_SIZE  # 48
ENCRYPTED_TIMESTAMP_SIZE = TAI64N_SIZE + AEAD_TAG_SIZE  # 28

# Field offsets inside a handshake initiation.
OFFSET_TYPE = 0
OFFSET_RESERVED = 1
OFFSET_SENDER = 4
OFFSET_EPHEMERAL = 8
OFFSET_STATIC = OFFSET_EPHEMERAL + NOISE_PUBLIC_KEY_SIZE  # 40
OFFSET_TIMESTAMP = OFFSET_STATIC + ENCRYPTED_STATIC_SIZE  # 88
OFFSET_MAC1 = OFFSET_TIMESTAMP + ENCRYPTED_TIMESTAMP_SIZE  # 116
OFFSET_MAC2 = OFFSET_MAC1 + MAC_SIZE  # 132
MESSAGE_INITIATION_SIZE = OFFSET_MAC2 + MAC_SIZE  # 148

# TAI64N as WireGuard writes it: big-endian 2^62 + 10 + unix seconds, then
# big-endian nanoseconds (wireguard-go and Linux both add the 10 s TAI offset).
TAI64_BASE = 0x400000000000000A

# AEAD nonce for counter 0: 32 zero bits then the 64-bit little-endian counter.
_ZERO_NONCE = bytes(12)

# Every reason InitiationError can carry, in the order the checks run.
REASONS = (
    "short",  # fewer than 148 bytes
    "long",  # more than 148 bytes
    "type",  # first byte is not MESSAGE_INITIATION_TYPE
    "reserved",  # reserved bytes not zero
    "mac1",  # not addressed to our public key (or corrupted)
    "ephemeral",  # ephemeral key gives an all-zero shared secret (low-order point)
    "static_aead",  # encrypted static does not open
    "static",  # initiator static key gives an all-zero shared secret
    "timestamp_aead",  # encrypted timestamp does not open: sender lacks the private key
)


class InitiationError(ValueError):
    """A datagram that is not a valid initiation for us; `reason` is one of REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid handshake initiation: {reason}")
        self.reason = reason


# --- Primitives (whitepaper section 5.4) -------------------------------------------

def HASH(data: bytes) -> bytes:  # noqa: N802 - the whitepaper's name
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:  # noqa: N802
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


# HMAC is written out over hashlib.blake2s instead of calling hmac.digest(..., "blake2s"):
# the stdlib path sets up an OpenSSL HMAC context per call (~2.7 us), and a KDF2 needs
# three of them with the same outer key twice. Same RFC 2104 construction, BLAKE2s's
# 64-byte block; tests check it against the stdlib.
_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_blake2s = hashlib.blake2s


def _pads(key: bytes) -> tuple[bytes, bytes]:
    # Keys here are 32-byte hashes, never longer than a block, so no pre-hashing.
    k = key.ljust(_BLOCK, b"\x00")
    return k.translate(_IPAD), k.translate(_OPAD)


def HMAC(key: bytes, data: bytes) -> bytes:  # noqa: N802
    """HMAC-BLAKE2s-256 (RFC 2104), for keys of at most 64 bytes."""
    ipad, opad = _pads(key)
    return _blake2s(opad + _blake2s(ipad + data).digest()).digest()


def KDF1(key: bytes, data: bytes) -> bytes:  # noqa: N802
    ipad, opad = _pads(HMAC(key, data))
    return _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:  # noqa: N802
    ipad, opad = _pads(HMAC(key, data))  # tau0
    t1 = _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()
    t2 = _blake2s(opad + _blake2s(ipad + t1 + b"\x02").digest()).digest()
    return t1, t2


def AEAD_ENCRYPT(key: bytes, plaintext: bytes, auth: bytes) -> bytes:  # noqa: N802
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, auth)


def AEAD_DECRYPT(key: bytes, ciphertext: bytes, auth: bytes) -> bytes:  # noqa: N802
    """Open with counter 0 (each handshake key is used once); raises InvalidTag."""
    return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, auth)


def DH(private: X25519PrivateKey, public: bytes) -> bytes:  # noqa: N802
    """X25519; raises ValueError when the result is all zeros (low-order point)."""
    return private.exchange(X25519PublicKey.from_public_bytes(public))


# The chaining key and hash before any key is mixed in are the same for everyone.
INITIAL_CHAINING_KEY = HASH(CONSTRUCTION)
INITIAL_HASH = HASH(INITIAL_CHAINING_KEY + IDENTIFIER)


# --- TAI64N ------------------------------------------------------------------------

def tai64n(unix_time: float | None = None) -> bytes:
    """A 12-byte TAI64N label for a unix time (now by default)."""
    ns = time.time_ns() if unix_time is None else int(unix_time * 1_000_000_000)
    seconds, nanos = divmod(ns, 1_000_000_000)
    return struct.pack(">QI", TAI64_BASE + seconds, nanos)


def tai64n_to_unix(stamp: bytes) -> float:
    seconds, nanos = struct.unpack(">QI", stamp)
    return seconds - TAI64_BASE + nanos / 1e9


# --- The responder -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Initiation:
    """What a valid first message tells the gateway about its sender."""

    sender_index: int
    initiator_static: bytes  # the client's public key, 32 bytes
    timestamp: bytes  # TAI64N, 12 bytes; bytewise order is time order
    ephemeral: bytes  # 32 bytes, as sent
    mac2: bytes  # 16 bytes; non-zero only if the client holds a cookie from us

    @property
    def has_mac2(self) -> bool:
        return any(self.mac2)

    @property
    def unix_time(self) -> float:
        return tai64n_to_unix(self.timestamp)


@dataclass(frozen=True, slots=True)
class StaticOpened:
    """A first message read as far as msg.static (Responder.open_static): the
    responder's chaining key C_r and hash H_r at that point, and the static key
    the message claims, not yet proven by the timestamp."""

    packet: bytes
    chaining_key: bytes
    hash: bytes
    initiator_static: bytes


class Responder:
    """Reads initiations addressed to one WireGuard interface's key pair.

    Built once per interface: everything that depends only on our own key (the
    hash after our public key is mixed in, the mac1 key) is computed here, so each
    packet pays only for its own ephemeral and static keys.
    Stateless per packet, so one instance may be shared by threads.
    """

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != NOISE_PUBLIC_KEY_SIZE:
            raise ValueError(f"private key must be {NOISE_PUBLIC_KEY_SIZE} bytes")
        self._private = X25519PrivateKey.from_private_bytes(private_key)
        self.public_key: bytes = self._private.public_key().public_bytes_raw()
        # Responder's static is the IK pre-message: mixed into the hash before msg 1.
        self._hash0 = HASH(INITIAL_HASH + self.public_key)
        self._mac1_key = HASH(LABEL_MAC1 + self.public_key)

    def __repr__(self) -> str:
        return f"Responder(public_key={self.public_key.hex()[:16]}...)"

    def check_header(self, packet: bytes) -> None:
        """The free checks: size, type and reserved bytes. Raises InitiationError."""
        n = len(packet)
        if n < MESSAGE_INITIATION_SIZE:
            raise InitiationError("short")
        if n > MESSAGE_INITIATION_SIZE:
            raise InitiationError("long")
        if packet[OFFSET_TYPE] != MESSAGE_INITIATION_TYPE:
            raise InitiationError("type")
        if packet[OFFSET_RESERVED:OFFSET_SENDER] != b"\x00\x00\x00":
            raise InitiationError("reserved")

    def mac1_valid(self, packet: bytes) -> bool:
        """Is mac1 right for our public key? Assumes a 148-byte packet."""
        expected = MAC(self._mac1_key, packet[:OFFSET_MAC1])
        return hmac.compare_digest(expected, packet[OFFSET_MAC1:OFFSET_MAC2])

    def consume_initiation(self, packet: bytes) -> Initiation:
        """Validate a 148-byte initiation and recover who sent it.

        Raises InitiationError (with `.reason`) for anything that is not a
        message from the holder of the static key it carries. Replay is not
        judged here: see appliance.gateway.replay. The same as open_static
        then open_timestamp, for a caller with no reason to stop in between.
        """
        return self.open_timestamp(self.open_static(packet))

    def open_static(self, packet: bytes) -> StaticOpened:
        """The message up to msg.static: header, mac1, e, es, and the initiator's
        static key decrypted. One X25519. The key is not proven yet (anyone can
        encrypt any public key to us), but a key the gateway would refuse anyway
        can be refused here, before the second X25519 (daemon.py)."""
        packet = bytes(packet)
        self.check_header(packet)
        if not self.mac1_valid(packet):
            raise InitiationError("mac1")

        ephemeral = packet[OFFSET_EPHEMERAL:OFFSET_STATIC]
        encrypted_static = packet[OFFSET_STATIC:OFFSET_TIMESTAMP]

        # e: the initiator's ephemeral goes into both the chaining key and the hash.
        c = KDF1(INITIAL_CHAINING_KEY, ephemeral)
        h = HASH(self._hash0 + ephemeral)
        # es
        try:
            es = DH(self._private, ephemeral)
        except ValueError:
            raise InitiationError("ephemeral") from None
        c, key = KDF2(c, es)
        try:
            initiator_static = AEAD_DECRYPT(key, encrypted_static, h)
        except InvalidTag:
            raise InitiationError("static_aead") from None
        h = HASH(h + encrypted_static)
        return StaticOpened(packet, c, h, initiator_static)

    def open_timestamp(self, opened: StaticOpened) -> Initiation:
        """The rest of the message: ss, then msg.timestamp, which only the holder of
        the static key's private half could have encrypted. One X25519."""
        packet, c, h = opened.packet, opened.chaining_key, opened.hash
        # ss
        try:
            ss = DH(self._private, opened.initiator_static)
        except ValueError:
            raise InitiationError("static") from None
        c, key = KDF2(c, ss)
        try:
            timestamp = AEAD_DECRYPT(key, packet[OFFSET_TIMESTAMP:OFFSET_MAC1], h)
        except InvalidTag:
            raise InitiationError("timestamp_aead") from None

        (sender_index,) = struct.unpack_from("<I", packet, OFFSET_SENDER)
        return Initiation(
            sender_index=sender_index,
            initiator_static=opened.initiator_static,
            timestamp=timestamp,
            ephemeral=packet[OFFSET_EPHEMERAL:OFFSET_STATIC],
            mac2=packet[OFFSET_MAC2:],
        )
