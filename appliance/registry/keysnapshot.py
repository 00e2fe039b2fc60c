"""The work behind GET /v1/gateway/keys: the active keys, salted and sorted.

Each gateway sends its own secret salt (gateway/keyfilter.py), so the digests
cannot be shared between gateways; what can be shared is everything before the
salt. Each worker keeps, per store and token scope, the active keys as one
bytes object of raw 32-byte keys, with the feed position they reflect: the
feed's id, its latest cursor and that change's digest (store.shared
change_digest). A request reads that position (one small feed query, no keys)
and, when it is unchanged, salts the cached keys without reading or decoding
a key; any change to the active keys appends to the feed and moves the
position. The change's digest is in the position so that a restored backup
whose latest cursor happens to equal the cached one (cursor numbers can be
reused, routes /changes answers 409 for the same reason) is not taken for the
same state.

Measured at 1M active keys (SQLite, one tenant, loaded 2-core machine,
bench/keysnapshot.py): see the module's table in the README; the salting loop
uses one keyed BLAKE2s state copied per key instead of keying a new one, which
spares a compression of the key block per key.
"""

from __future__ import annotations

import binascii
import hashlib
import threading
import weakref
from typing import Any

KEY_SIZE = 32
PAST_THE_END = 2**62  # `since` beyond any cursor: a page with no changes, only its bounds


class KeySnapshots:
    """Raw active keys per (store, scope), valid while the feed's position holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def raw_keys(self, st: Any, tenants: frozenset[str] | None,
                 hide_activity: bool = False) -> tuple[int, bytes]:
        """(cursor, the active keys within `tenants` as concatenated raw 32-byte keys);
        `tenants` and `hide_activity` as the store's active_keys takes them."""
        scope = (tenants, hide_activity)
        page = st.changes(PAST_THE_END, 1, tenants, hide_activity)
        position = (page["feed_id"], page["latest"], page["latest_digest"])
        with self._lock:
            entry = self._by_store.get(st, {}).get(scope)
        if entry is not None and entry[0] == position:
            return entry[1], entry[2]
        # The position was read before the keys: if a change lands in between, the
        # next request sees a newer position and reads again, never a stale hit.
        cursor, keys = st.active_keys(tenants, hide_activity)
        raw = b"".join(map(binascii.a2b_base64, keys))
        with self._lock:
            self._by_store.setdefault(st, {})[scope] = (position, cursor, raw)
        return cursor, raw


def salted_digests(salt: bytes, raw: bytes, size: int) -> bytes:
    """Sorted distinct keyed BLAKE2s digests (`size` bytes) of each 32-byte key in
    `raw`, concatenated: the same as gateway.key_digest per key."""
    keyed = hashlib.blake2s(key=salt, digest_size=size)
    view = memoryview(raw)
    out = set()
    for i in range(0, len(raw), KEY_SIZE):
        h = keyed.copy()
        h.update(view[i:i + KEY_SIZE])
        out.add(h.digest())
    return b"".join(sorted(out))
