"""A revocation that lands while a pull is in flight.

A worker looks a key up (maybe seconds, on a slow registry) and installs the
peer; meanwhile the change feed may revoke or delete the key. The feed removes
the peer from the device and its answer from the cache, but a pull that began
before that can put both back afterwards: the install comes after the feed's
removal, and the lookup stores the registry's old answer after the feed's
invalidation. So once its install is done (or failed) the worker asks the feed
whether the key was removed since the initiation was seen, and undoes what it
did. The feed records a removal before carrying it out (feed.removed_since), so
there is no moment when neither side would undo it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class RemovalLog(Protocol):
    def removed_since(self, key: str, since: float) -> bool: ...


class Invalidates(Protocol):
    def invalidate(self, key: str) -> None: ...


class Removes(Protocol):
    def remove(self, public_keys: list[str]) -> list[str]: ...


def undo_if_revoked(key: str, seen_at: float, installed: bool, *, feed: RemovalLog,
                    cache: Invalidates, installer: Removes,
                    on_removed: Callable[[str, str], None]) -> bool:
    """True if `key` was revoked or deleted at or after `seen_at` (time.time()).

    Then the cache forgets the key (the lookup may have stored the old answer),
    and the peer this pull installed (`installed`) comes off the device again,
    accounted as a revocation (`on_removed(key, "revoked")`). A peer the pull did
    not install is the feed's to remove, and it did.
    """
    if not feed.removed_since(key, seen_at):
        return False
    cache.invalidate(key)
    if installed and installer.remove([key]):
        on_removed(key, "revoked")
    return True
