"""appliance.keys: the low-order points new peers may not use, checked against
the cryptography library (OpenSSL refuses an all-zero X25519 result)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from appliance.keys import LOW_ORDER_POINTS, decode_key, generate_keypair, is_low_order


@pytest.mark.parametrize("raw", sorted(LOW_ORDER_POINTS))
def test_every_listed_point_gives_no_shared_secret(raw):
    # Three private keys: a low-order point gives zero with every clamped scalar.
    for _ in range(3):
        with pytest.raises(ValueError):
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    assert is_low_order(raw)


def test_real_keys_are_not_low_order():
    assert len(LOW_ORDER_POINTS) == 14
    for _ in range(50):
        raw = decode_key(generate_keypair()[1])
        assert not is_low_order(raw)
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
