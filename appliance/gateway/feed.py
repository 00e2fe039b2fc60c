"""Follow the registry's change feed: revocations bite within seconds.

A pull-based gateway only asks the registry when a client is new; without
this, a revoked client that stays connected would keep its tunnel. Every few
seconds the gateway reads `/v1/gateway/changes?since=CURSOR` and
- on revoke or delete: removes the peer from the device and the cache;
- on update: refreshes the cache and updates an installed peer in place;
- on create or restore: drops a negative cache entry so the key works now.
The cursor is saved after each applied page, with the digest of the change at
it: a restored backup (or commits lost to a power cut) hands the same cursor
numbers out again for other changes, and only the digest tells (the registry
answers 409 cursor_mismatch). When the feed cannot be trusted to be complete
(first start, a different database behind the registry, a reused cursor, or
changes older than our cursor already trimmed), every installed peer is
checked against the registry instead: a full reconcile. As a last line of
defence, `audit` has every installed peer checked again on a long period
(`--reconcile-interval`), spread over the polls like adopted peers.

While the feed is continuous the peer cache may keep entries past their TTL
(cache.py): each reconcile starts a new feed epoch, and every poll that proves
continuity says so to the cache.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from appliance.gateway import events
from appliance.gateway.cache import PeerCache
from appliance.gateway.install import Installer
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import CursorMismatch, PeerNotFound, RegistryUnavailable
from appliance.gateway.state import GatewayState

if TYPE_CHECKING:  # the HTTP client; the feed needs only its methods
    from appliance.gateway.pull import GatewayRegistry

log = logging.getLogger(__name__)

ADOPTED_CHECKS_PER_POLL = 500
REMEMBER_REMOVED = 600.0  # seconds; far longer than any pull can be in flight


class FeedFollower:
    def __init__(self, registry: GatewayRegistry, state: GatewayState, cache: PeerCache,
                 installer: Installer, metrics: GatewayMetrics, on_removed,
                 known: KnownKeys | None = None) -> None:
        self.registry = registry
        self.state = state
        self.cache = cache
        self.installer = installer
        self.metrics = metrics
        self.on_removed = on_removed  # (key, reason): eviction bookkeeping
        self.known = known  # the known-key filter, kept current here
        self.healthy = False
        self.caught_up_at: float | None = None  # time.time(): last reached the registry's head
        # Peers found on the device at start: checked against the registry once
        # even when the cursor is fine, since the feed cannot speak for peers
        # it never saw installed (added by hand, or under another state dir).
        self._unchecked: set[str] = set()
        self._removed: OrderedDict[str, float] = OrderedDict()  # key -> when, oldest first
        self._defer_reconcile = False  # set by resume()

    def removed_since(self, key: str, since: float) -> bool:
        """Did the feed revoke or delete `key` at or after `since` (time.time())?

        A pull that began before a revocation may install the peer, or cache the
        old answer, after the feed removed both: the daemon asks this once its
        install is done and undoes it. Recording before removing leaves no gap.
        """
        at = self._removed.get(key)
        return at is not None and at >= since

    def _note_removed(self, key: str) -> None:
        now = time.time()
        self._removed[key] = now
        self._removed.move_to_end(key)
        while self._removed and next(iter(self._removed.values())) < now - REMEMBER_REMOVED:
            self._removed.popitem(last=False)

    def check_adopted(self, keys: list[str]) -> None:
        """Have these adopted peers checked against the registry on the next polls."""
        self._unchecked.update(keys)

    def audit(self) -> None:
        """Check every installed peer against the registry over the next polls.

        The feed should make this redundant; it is what catches a change the
        feed lost in a way no check above can see.
        """
        self._unchecked.update(self.installer.snapshot())

    @property
    def cursor(self) -> int | None:
        value = self.state.get("feed_cursor")
        return int(value) if value is not None else None

    def _save(self, cursor: int, feed_id: str, digest: str | None) -> None:
        self.state.set(feed_cursor=str(cursor), feed_id=feed_id, feed_digest=digest or "")
        self.metrics.feed_cursor.set(cursor)
        self.healthy = True
        self.cache.feed_confirmed()

    def poll(self) -> int:
        """Apply everything new; returns how many changes were applied."""
        self.metrics.feed_polls.inc()
        try:
            return self._poll()
        except RegistryUnavailable as e:
            self.healthy = False
            self.metrics.feed_errors.inc()
            log.warning("change feed: registry unavailable (%s); will catch up", e)
            return 0

    def resume(self) -> None:
        """At start, before capture: follow the feed from the saved cursor if it is
        still continuous, so cached peers count again at once (cache.py).

        Nothing else: a reconcile, or the checks of adopted peers, may take
        thousands of registry calls, and are left to the scheduled polls.
        """
        self._defer_reconcile = True
        try:
            self._follow()
        except RegistryUnavailable as e:
            log.warning("change feed: registry unavailable at start (%s)", e)
        finally:
            self._defer_reconcile = False

    def _poll(self) -> int:
        applied = self._follow()
        # A bounded share per poll, so revocations keep flowing while a gateway
        # that restarted with many peers works through them.
        for _ in range(min(len(self._unchecked), ADOPTED_CHECKS_PER_POLL)):
            key = next(iter(self._unchecked))
            if key in self.installer:
                self._refresh(key)  # RegistryUnavailable: the rest wait for the next poll
            self._unchecked.discard(key)
        return applied

    def _follow(self) -> int:
        cursor = self.cursor
        feed_id = self.state.get("feed_id")
        digest = self.state.get("feed_digest") or None
        if cursor is None:
            return self.reconcile("first start")
        applied = 0
        while True:
            try:
                page = self.registry.changes(cursor, digest=digest)
            except CursorMismatch:
                return applied + self.reconcile("cursor reused: registry database restored"
                                                " or rolled back")
            if feed_id and page["feed_id"] != feed_id:
                return applied + self.reconcile("registry database replaced")
            if digest is None and cursor > 0 and "since_digest" in page:
                # A cursor saved before gateways kept digests (or with no change
                # at it) cannot be checked: once, check everything instead.
                return applied + self.reconcile("cursor without a digest")
            if page["changes"] and page["changes"][0]["cursor"] != cursor + 1 \
                    and page["earliest"] > cursor + 1:
                return applied + self.reconcile("feed gap")
            if page["latest"] < cursor:
                return applied + self.reconcile("feed reset")
            for change in page["changes"]:
                self.apply(change)
                applied += 1
            cursor, digest = page["cursor"], page.get("cursor_digest")
            self._save(cursor, page["feed_id"], digest)
            if not page["more"]:
                self._caught_up()
                return applied

    def apply(self, change: dict) -> None:
        key, op = change["public_key"], change["op"]
        if op in ("revoke", "delete"):
            self._note_removed(key)  # before removing: see removed_since
            self.cache.invalidate(key)
            if self.installer.remove([key]):
                self.on_removed(key, "revoked" if op == "revoke" else "deleted")
            return
        if op in ("create", "restore"):
            if self.known is not None:
                self.known.add(key)
            self._removed.pop(key, None)
            self.cache.invalidate(key)
            return
        if op == "update":
            self.cache.invalidate(key)
            if key in self.installer:
                self._refresh(key)

    def _refresh(self, key: str) -> None:
        try:
            peer = self.registry.peer(key)
        except PeerNotFound:
            self._note_removed(key)
            if self.installer.remove([key]):
                self.on_removed(key, "revoked")
            return
        self.cache.put(peer)
        # Unchanged peers are left alone: a reconcile of thousands must not
        # rewrite (and log) every one of them. An adopted peer's configuration is
        # not known (see Installer.adopt): it is written once, without an event.
        entry = self.installer.get(key)
        known = entry is not None and entry.allowed_ips is not None
        if self.installer.differs(peer) and self.installer.update(peer) and known:
            events.emit("peer_updated", public_key=key, allowed_ips=list(peer.allowed_ips))

    def reconcile(self, why: str) -> int:
        """Check every installed peer against the registry, then start the feed afresh."""
        if self._defer_reconcile:
            log.info("change feed: full reconcile (%s) left to the first scheduled poll", why)
            return 0
        log.info("change feed: full reconcile (%s)", why)
        self.metrics.reconciles.inc()
        head = self.registry.changes(0, limit=1)
        # After the head is read: an entry fetched from here on reflects every
        # change up to the head, and the feed resumes at the head.
        self.cache.new_feed_epoch()
        if why != "first start":
            # Cache entries may predate changes we never saw; installed peers
            # are put back by the refresh below.
            self.cache.clear()
        for key in list(self.installer.snapshot()):
            self._refresh(key)
        self._unchecked.clear()
        self._save(head["latest"], head["feed_id"], head.get("latest_digest"))
        self._caught_up()
        return 0

    def _caught_up(self) -> None:
        self.caught_up_at = time.time()
        self.metrics.feed_caught_up.set(self.caught_up_at)
