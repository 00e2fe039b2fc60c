"""What becomes of an initiation that proved its sender's key: the admission decision.

Before the proof, `refuses_unknown` may refuse it by the key it claims
(unknown_key): the known-key filter says the registry does not hold the key,
and the filter is fresh. The daemon asks between the two halves of the
message (handshake.open_static, open_timestamp), so a random-key flood costs
one X25519 an initiation instead of two.

When: the filter says no, an initiation whose key the filter lacked went to
the queue within the last FEED_CATCH_UP_EVERY, and the change feed reached the
registry's head within twice that. A key missing from the filter may be a peer
created since the last feed read; the lookup worker reads the feed (at most
every FEED_CATCH_UP_EVERY, provision.py) before refusing such a key, and that
read must not be skipped for nothing. The queued stranger says the workers are
at it: they took an unknown key less than a second ago and read the feed for
it unless they had read it in the second before, and at that pace they refuse
nearly every unknown key unread, as we do here earlier; a peer created during
such a flood gets in on its client's next try, as before. The feed's age
allows for the read itself: the workers' next read starts a second after the
last one started and ends a queue wait and a registry round trip later; with
one second, a bench flood (5,000/s of random keys from forged sources, 4 s)
had 545 verified, mostly in bursts in those gaps; with two, 14. It
also keeps a feed that cannot reach the registry from making refusals blind.
Fresh from the scheduled poll alone (every 5 s) is not enough: a peer created
just after it, whose client connects at once (a provisioning script, the lab
tests), would wait for its 5 s retry where the worker's read lets it in. So
the first unknown key after a quiet spell takes the full path (both X25519,
the queue, the worker's read), and in a flood of random keys one a second
does. Not also "whenever under load": under load the initiations that still
reach verification carry a mac2 (proven sources, 20/s each, gate.py), few
enough that the worker's read is the better bargain.

Then, in order, each outcome a drop reason or a place in the lookup queue:
- replay: its timestamp is not newer than one already seen for the key. Judged
  for installed peers too: when a peer came in by role inversion the data plane
  never saw the initiation that brought it (it had no such peer then), so it has
  no timestamp to refuse a replay of it by, accepts one and aims the peer at the
  replayer. We ask repair.py to put the endpoint back;
- already_installed: a rekey or retry of a peer the data plane has; a fresh
  initiation is the client's own, so its source becomes the peer's endpoint to
  repair towards;
- queued, or pending (the key is queued or being looked up already: the queue
  keeps the newest initiation). Displacements inside the queue (a full lane, a
  source at its cap) are the queue's own drop reasons (admission.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.gateway import events
from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.capture import Datagram
from appliance.gateway.install import Installer
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.provision import FEED_CATCH_UP_EVERY
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import ReplayGuard
from appliance.gateway.served import ServedEndpoints
from appliance.gateway.sourcelimit import source_key
from appliance.keys import encode_key

REPLAY = "replay"
INSTALLED = "already_installed"
QUEUED = "queued"
PENDING = "pending"
UNKNOWN_KEY = "unknown_key"
FEED_FRESH = 2 * FEED_CATCH_UP_EVERY  # feed read age for early refusals (see above)
# Replay events logged at most this often (a token bucket); the rest are counted.
REPLAY_LOG_RATE, REPLAY_LOG_BURST = 1.0, 10


class Intake:
    def __init__(self, replay: ReplayGuard, installer: Installer, served: ServedEndpoints,
                 queue: FairQueue, known: KnownKeys, cache_knows: Callable[[str], bool],
                 repair: EndpointRepair, metrics: GatewayMetrics, *,
                 feed_read_at: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        """feed_read_at: when (time.time()) the change feed last reached the registry's
        head, None if never (FeedFollower.caught_up_at); without it nothing is
        refused early."""
        self.replay = replay
        self.installer = installer
        self.served = served
        self.queue = queue
        self.known = known
        self.cache_knows = cache_knows  # PeerCache.knows: the registry said yes once
        self.repair = repair
        self.metrics = metrics
        self.feed_read_at = feed_read_at
        self._clock = clock
        self._unknown_queued_at = float("-inf")  # clock(): a key the filter lacked went on
        self._replay_log = TokenBucket(REPLAY_LOG_RATE, REPLAY_LOG_BURST)
        self._replays_unlogged = 0

    def refuses_unknown(self, static: bytes) -> bool:
        """Refuse a claimed (not yet proven) static key the fresh filter does not know?
        Counts the drop when it does."""
        if self.known.knows(static) is not False:
            return False
        now, read_at = self._clock(), self.feed_read_at()
        if read_at is None or now - read_at >= FEED_FRESH or \
                now - self._unknown_queued_at >= FEED_CATCH_UP_EVERY:
            return False
        self.metrics.drops.labels(UNKNOWN_KEY).inc()
        return True

    def admit(self, static: bytes, timestamp: bytes, d: Datagram, seen_at: float,
              on_known: Callable[[], None] | None = None) -> str:
        """Decide for one verified initiation (its sender's key and TAI64N); returns
        REPLAY, INSTALLED, QUEUED or PENDING, having counted it. on_known is called
        when it is fresh and from a key the gateway expects (the gate's
        verified_known: a client's work, not load)."""
        key = encode_key(static)
        if not self.replay.accept(static, timestamp):
            self._replayed(key, d, timestamp)
            return REPLAY
        if self.installer.note_endpoint(key, d.endpoint):
            self.served.note(key, d.endpoint)
            self.metrics.drops.labels(INSTALLED).inc()
            return INSTALLED
        self.metrics.verified.inc()
        known = self.known.knows(static)
        if known is False:  # a worker will read the feed for it, or has just read it
            self._unknown_queued_at = self._clock()
        elif known is None:  # no filter yet: what the gateway itself has seen
            known = self.replay.kept(static) or self.cache_knows(key)
        if known and on_known is not None:
            on_known()
        # d goes along: only this verified, fresh initiation may be re-injected.
        work = Work(key, d.endpoint, source_key(d.src_ip), known, seen_at, timestamp, d)
        return self.queue.put(work) or QUEUED  # a refusal is counted by the queue

    def _replayed(self, key: str, d: Datagram, timestamp: bytes) -> None:
        self.metrics.drops.labels(REPLAY).inc()
        installed = self.installer.get(key)
        if installed is not None and not installed.first_seen_by_data_plane and \
                installed.endpoint not in (None, d.endpoint):
            outcome = self.repair.request(key, d.endpoint, installed.endpoint, timestamp)
            self.metrics.endpoint_repairs.labels(outcome).inc()
        # A replay flood must not become a log flood: REPLAY_LOG_RATE lines a
        # second, each saying how many went unlogged before it.
        if not self._replay_log.try_acquire():
            self._replays_unlogged += 1
            return
        events.emit("initiation_replayed", level=logging.WARNING, public_key=key,
                    endpoint=d.endpoint, installed=installed is not None,
                    unlogged=self._replays_unlogged)
        self._replays_unlogged = 0
