"""The known-key filter: which keys the registry holds, without asking it.

Anyone who knows the gateway's public key can send initiations from keys of
their own that pass every cryptographic check; each such key used to cost a
registry call (a 404) and a place in the lookup queue. The gateway now keeps a
compact set of the registered keys and refuses a key that is not in it
locally. Built from the registry's snapshot (`GET /v1/gateway/keys`: salted
4-byte BLAKE2s digests, sorted) and kept current by the change feed (a create
or restore adds its key). Revocations are not taken out: a revoked key falls
through to the lookup, which says no, as any false positive does.

Memory: 4 bytes a key in one sorted array (array('I'), binary search):
1M keys 4 MB, 10M keys 40 MB, against ~60 bytes a key for a Python set of
ints. False positives: a random key hits one of n digests with probability
n / 2^32, 0.02 % at 1M keys and 0.23 % at 10M; they cost what every key cost
before (a lookup). The salt is the gateway's secret, drawn at start, so
nobody can search for keys whose digests hit on purpose.

Until the first snapshot is loaded (or when the registry cannot give one),
`knows` answers None and the gateway works as before: every key is looked up.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import logging
import secrets
import threading
from array import array
from collections.abc import Callable

from appliance.keys import decode_key

log = logging.getLogger(__name__)

SALT_SIZE = 16
DIGEST_SIZE = 4


class KnownKeys:
    def __init__(self, salt: bytes | None = None) -> None:
        self.salt = salt if salt is not None else secrets.token_bytes(SALT_SIZE)
        self._sorted: array | None = None  # None: not loaded
        self._added: set[int] = set()  # from the feed since the snapshot
        self._lock = threading.Lock()
        self.cursor = 0  # the feed cursor the snapshot reflects

    def _digest(self, raw_key: bytes) -> int:
        d = hashlib.blake2s(raw_key, key=self.salt, digest_size=DIGEST_SIZE).digest()
        return int.from_bytes(d, "big")

    @property
    def loaded(self) -> bool:
        return self._sorted is not None

    def __len__(self) -> int:
        return (len(self._sorted) if self._sorted is not None else 0) + len(self._added)

    def memory_bytes(self) -> int:
        """What the sorted array holds (the feed's additions are few)."""
        return 0 if self._sorted is None else self._sorted.itemsize * len(self._sorted)

    def load(self, snapshot: dict) -> None:
        """Take a /v1/gateway/keys answer (made with our salt)."""
        if snapshot["digest_size"] != DIGEST_SIZE:
            raise ValueError(f"digest size {snapshot['digest_size']}, expected {DIGEST_SIZE}")
        raw = base64.b64decode(snapshot["digests"])
        digests = array("I")
        digests.frombytes(raw)
        if digests.itemsize != DIGEST_SIZE:
            raise ValueError("array('I') is not 4 bytes on this platform")
        if array("I", [1]).tobytes() != (1).to_bytes(4, "big"):
            digests.byteswap()  # sent big-endian, sorted as such
        with self._lock:
            self._sorted = digests
            self.cursor = snapshot["cursor"]

    def add(self, public_key: str) -> None:
        """The feed says the key was created or restored."""
        value = self._digest(decode_key(public_key))
        with self._lock:
            self._added.add(value)

    def knows(self, raw_key: bytes) -> bool | None:
        """True: probably registered; False: certainly not; None: not loaded yet."""
        digests = self._sorted
        if digests is None:
            return None
        value = self._digest(raw_key)
        i = bisect.bisect_left(digests, value)
        return (i < len(digests) and digests[i] == value) or value in self._added


def load_filter(known: KnownKeys, fetch: Callable[[bytes], dict],
                changes: Callable[[int], dict]) -> None:
    """Fill `known` from a snapshot, then add the keys created since its cursor.

    The feed follower adds keys as it applies changes; it may already be past
    the snapshot's cursor (a restart with a saved cursor), so the changes from
    that cursor on are read here too. Adding twice is harmless.
    """
    snapshot = fetch(known.salt)
    known.load(snapshot)
    cursor = snapshot["cursor"]
    while True:
        page = changes(cursor)
        for change in page["changes"]:
            if change["op"] in ("create", "restore"):
                known.add(change["public_key"])
        cursor = page["cursor"]
        if not page["more"]:
            break
    log.info("known-key filter: %d keys (%d bytes), feed cursor %d", len(known),
             known.memory_bytes(), snapshot["cursor"])
