"""A lookup worker's job: queued keys, from the filter to the device.

filter (keyfilter.py, catching up with the feed for a key it does not know yet)
-> cache lookup of the items taken together (cache.py; the misses go to the
registry in batches, batch.py) -> install (install.py) ->
undo if revoked meanwhile (revocation.py) -> re-inject the client's initiation
(reinject.py) when that is the install mode. Each step counts its outcome and
tells its story as an event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from appliance.gateway import events
from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.cache import Lookup, Outcome, PeerCache
from appliance.gateway.evict import Evictor
from appliance.gateway.feed import FeedFollower
from appliance.gateway.install import Installer
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.overlap import OverlapRefused
from appliance.gateway.reinject import Reinjector
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import ReplayGuard
from appliance.gateway.revocation import undo_if_revoked
from appliance.gateway.served import ServedEndpoints
from appliance.keys import decode_key
from appliance.wg import WgError

log = logging.getLogger(__name__)

# A key the filter does not know makes a worker read the change feed at most
# this often before refusing it: a peer created a moment ago gets in at once,
# a flood of random keys costs one feed read a second and no peer lookups.
FEED_CATCH_UP_EVERY = 1.0
# Items a worker takes from the queue at once; their cache misses go to the
# registry together (batch.py) and their installs are one device write
# (Installer.install_many). Measured with bench/herd.py, 10,000 clients within a
# second (load 0.7-3 on 2 cores): 32 a take needed 7-12 s until all installed,
# 128 6-9 s, 256 6.3 s with the daemon's CPU per client 0.74 -> 0.48 ms: fewer
# turns at the installer's lock and wireguard-go's IPC lock, fewer batches.
# A quiet gateway's worker still takes one item at a time (what is ready).
WORKER_TAKE = 256
SOURCES = {Outcome.HIT: "cache", Outcome.FETCHED: "registry", Outcome.STALE: "stale"}


class FeedReads:
    """The change feed read one poll at a time, by the scheduled job or a worker."""

    def __init__(self, feed: FeedFollower, clock: Callable[[], float] = time.monotonic) -> None:
        self.feed = feed
        self._clock = clock
        self._lock = threading.Lock()
        self._caught_up_at = float("-inf")

    def poll(self) -> None:
        """The scheduled poll: waits for a worker's read to end."""
        with self._lock:
            self.feed.poll()

    def catch_up(self) -> None:
        """A worker's read for a key the filter did not know: at most every
        FEED_CATCH_UP_EVERY, and never waiting for another read. Under a flood of
        unknown keys the workers would all queue behind it while the unknown lane
        filled up (and that lane filling is a load signal)."""
        if self._clock() - self._caught_up_at < FEED_CATCH_UP_EVERY or \
                not self._lock.acquire(blocking=False):
            return
        try:
            self._caught_up_at = self._clock()
            self.feed.poll()
        finally:
            self._lock.release()


class Provisioner:
    def __init__(self, *, queue: FairQueue, known: KnownKeys, feed: FeedFollower,
                 feed_reads: FeedReads, cache: PeerCache, installer: Installer,
                 evictor: Evictor, served: ServedEndpoints, replay: ReplayGuard,
                 repair: EndpointRepair, reinjector: Reinjector | None,
                 metrics: GatewayMetrics) -> None:
        self.queue = queue
        self.known = known  # never loaded with --key-filter off: every key is looked up
        self.feed = feed
        self.feed_reads = feed_reads
        self.cache = cache
        self.installer = installer
        self.evictor = evictor
        self.served = served
        self.replay = replay
        self.repair = repair
        self.reinjector = reinjector  # None: install mode invert
        # The data plane's cookie for a client address, when it sent one
        # (cookie_learn.py); the gateway wires in its gate's learner.
        self.dataplane_cookie: Callable[[str, int], bytes | None] = lambda ip, port: None
        self.metrics = metrics

    def work(self) -> None:
        """A worker thread: take keys until the queue closes."""
        while works := self.queue.get_many(WORKER_TAKE):
            try:
                self.provision_many(works)
            except Exception:
                log.exception("provisioning of %d keys failed", len(works))
            finally:
                for work in works:
                    self.queue.done(work.key)

    def provision(self, work: Work) -> None:
        self.provision_many([work])

    def provision_many(self, works: list[Work]) -> None:
        """Filter the items, look the admitted keys up together, install each."""
        admitted = [w for w in works if w.known or self._admits_unknown(w.key)]
        if not admitted:
            return
        try:
            lookups = self.cache.lookup_many([w.key for w in admitted])
        except Exception:
            log.exception("lookup of %d keys failed", len(admitted))
            return
        try:
            self._install_many(admitted, lookups)
        except Exception:
            log.exception("install of %d keys failed", len(admitted))

    def filter_admits(self, key: str) -> bool:
        """May a key the filter did not know be looked up? Yes if there is no filter
        (not loaded), or if the change feed, read now, adds it."""
        raw = decode_key(key)
        if self.known.knows(raw) is not False:
            return True
        self.feed_reads.catch_up()
        return self.known.knows(raw) is not False

    def _admits_unknown(self, key: str) -> bool:
        if self.filter_admits(key):
            return True
        self.metrics.lookups.labels("filtered").inc()
        events.emit("peer_unknown", public_key=key, reason="filtered")
        return False

    def _install_many(self, admitted: list[Work], lookups: dict[str, Lookup]) -> None:
        """Install the found peers with one device write (Installer.install_many),
        then finish each on its own: revocation check, bookkeeping, re-injection."""
        found: list[tuple[Work, Lookup]] = []
        for work in admitted:
            key, lookup = work.key, lookups[work.key]
            self.metrics.lookups.labels(lookup.outcome.value).inc()
            if lookup.peer is None:
                events.emit("peer_unknown", public_key=key, reason=lookup.outcome.value)
                continue
            pulled_ms = round(1000 * (time.time() - work.seen_at), 2)
            events.emit("peer_pulled", level=logging.DEBUG, public_key=key,
                        source=SOURCES[lookup.outcome], ms=pulled_ms)
            # The client's latest initiation, should it have retried during a slow pull.
            found.append((self.queue.latest(key) or work, lookup, pulled_ms))
        if not found:
            return
        reinject = self.reinjector is not None
        results = self.installer.install_many(
            [(lookup.peer, work.endpoint) for work, lookup, _ in found
             if lookup.peer is not None], reinject=reinject)
        for work, lookup, pulled_ms in found:
            try:
                self._installed(work, lookup, results[work.key], reinject, pulled_ms)
            except Exception:
                log.exception("install of %s failed", work.key)

    def _installed(self, work: Work, lookup: Lookup, result: bool | Exception,
                   reinject: bool, pulled_ms: float) -> None:
        key, seen_at = work.key, work.seen_at
        if isinstance(result, OverlapRefused):
            return  # counted and logged (rate-limited) by the installer's guard
        if isinstance(result, WgError):
            self.metrics.install_errors.inc()
            log.error("install of %s failed: %s", key, result)
            installed = None
        elif isinstance(result, Exception):
            raise result
        else:
            installed = result
        if undo_if_revoked(key, seen_at, bool(installed), feed=self.feed, cache=self.cache,
                           installer=self.installer, on_removed=self.evictor.removed_elsewhere):
            return
        if not installed:
            return
        assert lookup.peer is not None
        self.served.note(key, work.endpoint)
        self.replay.keep(decode_key(key), work.timestamp)
        self.repair.forget(key)  # a new peer on the device: a new history
        elapsed = time.time() - seen_at
        self.metrics.installs.inc()
        self.metrics.install_latency.observe(elapsed)
        self.metrics.installed.set(len(self.installer))
        self.evictor.note_install(key)
        # The one line per install at INFO: what the DEBUG steps say, in sum (seen:
        # when the capture read the initiation; pulled_ms, ms: since then).
        events.emit("peer_installed", public_key=key, endpoint=work.endpoint,
                    allowed_ips=list(lookup.peer.allowed_ips), ms=round(1000 * elapsed, 2),
                    mode=("reinject" if reinject else "invert"
                          if self.installer.role_inversion else "responder"),
                    source=SOURCES[lookup.outcome], seen=round(seen_at, 6),
                    pulled_ms=pulled_ms)
        if reinject:
            self._reinject(work)

    def _reinject(self, work: Work) -> None:
        assert self.reinjector is not None
        d = work.datagram
        cookie = self.dataplane_cookie(d.src_ip, d.src_port)
        try:
            self.reinjector.send(d, cookie)
        except OSError as e:
            self.metrics.reinjections.labels("failed").inc()
            log.error("re-injecting the initiation of %s failed: %s", work.key, e)
            if self.installer.fall_back(work.key):
                events.emit("reinjection_fallback", level=logging.WARNING,
                            public_key=work.key, endpoint=d.endpoint, reason="send_failed")
            return
        self.metrics.reinjections.labels("sent").inc()
        events.emit("initiation_reinjected", level=logging.DEBUG, public_key=work.key,
                    endpoint=d.endpoint,
                    ms=round(1000 * (time.time() - work.seen_at), 2),
                    mac2="dataplane" if cookie is not None else "client")
