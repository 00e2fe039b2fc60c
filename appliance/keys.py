"""WireGuard keys: Curve25519, 32 bytes, shown as standard base64 (44 chars)."""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32

_P = 2**255 - 19
# Curve25519 u-coordinates of the points of order 1, 2, 4 and 8 (on the curve
# or its twist): 0, 1, p-1 and the two of order 8; also spelled p and p+1,
# which X25519 reduces to 0 and 1. X25519 ignores bit 255, so each has a second
# spelling with it set. A clamped private key (a multiple of 8) times any of
# these is zero: no shared secret, and WireGuard refuses the handshake.
# tests/unit/test_keys.py checks every entry against the cryptography library.
_LOW_ORDER_U = (
    0, 1, _P - 1, _P, _P + 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
LOW_ORDER_POINTS = frozenset(
    (u | top).to_bytes(KEY_LEN, "little") for u in _LOW_ORDER_U for top in (0, 1 << 255))


class KeyError_(ValueError):
    """A key that is not 32 bytes of base64 (or hex, for UAPI)."""


def decode_key(text: str) -> bytes:
    """Standard or URL-safe base64 of exactly 32 bytes -> bytes."""
    s = text.strip()
    if len(s) != 44 or not s.endswith("="):
        raise KeyError_("must be 44 characters of base64 (32 bytes)")
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyError_("is not valid base64") from e
    if len(raw) != KEY_LEN:
        raise KeyError_(f"must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def is_low_order(raw: bytes) -> bool:
    """A public key no private key can agree a secret with (all-zero included)."""
    return raw in LOW_ORDER_POINTS


def encode_key(raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise KeyError_(f"must be {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode()


def normalize_key(text: str) -> str:
    """Any accepted spelling -> canonical standard base64."""
    return encode_key(decode_key(text))


def key_from_hex(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError as e:
        raise KeyError_("is not valid hex") from e
    if len(raw) != KEY_LEN:
        raise KeyError_(f"must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def generate_private_key() -> bytes:
    """A clamped Curve25519 private key, as `wg genkey` makes."""
    # cryptography clamps only inside the scalar multiplication, not in the bytes
    # it returns; the kernel and wireguard-go store (and report back) clamped keys.
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def generate_keypair() -> tuple[str, str]:
    """(private, public) as base64."""
    priv = generate_private_key()
    return encode_key(priv), encode_key(public_key(priv))


def generate_preshared_key() -> str:
    return encode_key(secrets.token_bytes(KEY_LEN))
