"""WireGuard keys: Curve25519, 32 bytes, shown as standard base64 (44 chars)."""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32


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
