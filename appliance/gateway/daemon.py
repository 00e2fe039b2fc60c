"""The gateway daemon: capture -> identity -> pull -> install, plus housekeeping.

Threads, and why:
- capture: reads initiations off the packet sockets and verifies them. It never
  waits on the network or the device; work goes to the pool.
- lookup workers: registry lookups and installs (slow, may block on HTTP),
  taking work from the fair lookup queue (admission.py).
- repair: puts back endpoints that replayed initiations stole (repair.py).
- scheduler (APScheduler, one instance): eviction, change feed, ending trigger
  keepalives after handshakes, cache expiry.
- http: /metrics and /healthz.
The interface outlives the daemon: a restart adopts the peers it holds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from appliance.gateway import events
from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.batch import LINGER, MAX_BATCH, LookupBatcher
from appliance.gateway.cache import CachePolicy, Lookup, Outcome, PeerCache
from appliance.gateway.capture import Capture, Datagram
from appliance.gateway.cookie import CookieResponder
from appliance.gateway.evict import REJECT_AFTER_TIME, EvictionPolicy, Evictor
from appliance.gateway.failover import PROBE_EVERY
from appliance.gateway.feed import FeedFollower
from appliance.gateway.gate import COOKIE, VERIFY, InitiationGate
from appliance.gateway.handshake import InitiationError, Responder
from appliance.gateway.install import TRIGGER_KEEPALIVE, Installer
from appliance.gateway.keyfilter import KnownKeys, load_filter
from appliance.gateway.load import LoadSignal
from appliance.gateway.metrics import GatewayMetrics, serve_http
from appliance.gateway.modes import DEFAULT_INSTALL_MODE
from appliance.gateway.pull import PeerNotFound, RegistryUnavailable, build_gateway_registry
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.rawsend import RawUdpSender
from appliance.gateway.reinject import Reinjector
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import ReplayGuard, ReplayStore
from appliance.gateway.schedule import Jobs
from appliance.gateway.served import ServedEndpoints
from appliance.gateway.sourcelimit import (
    PACKETS_BURSTABLE,
    PACKETS_PER_SECOND,
    SourceLimiter,
    source_key,
)
from appliance.gateway.state import GatewayState
from appliance.keys import decode_key, encode_key
from appliance.secrets import read_secret
from appliance.wg import WgDevice, WgError, ensure_device

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
# The known-key filter: retried this often until loaded, rebuilt this often after
# (the feed adds new keys in between; a rebuild drops revoked ones).
KNOWN_KEYS_RETRY = 30.0
KNOWN_KEYS_RELOAD = 3600.0
# A key the filter does not know makes a worker read the change feed at most
# this often before refusing it: a peer created a moment ago gets in at once,
# a flood of random keys costs one feed read a second and no peer lookups.
FEED_CATCH_UP_EVERY = 1.0
# Replay events logged at most this often (a token bucket); the rest are counted.
REPLAY_LOG_RATE, REPLAY_LOG_BURST = 1.0, 10
# The handshake check's period: at least this, at most that, and else this many
# times what its device read costs (so it spends at most 1/factor of the time).
HANDSHAKE_CHECK_MIN = 0.1
HANDSHAKE_CHECK_MAX = 5.0  # well before the 25 s trigger keepalive fires twice
HANDSHAKE_CHECK_COST_FACTOR = 5.0
# Items a lookup worker takes from the queue at once; their cache misses go to the
# registry together (batch.py). 8 workers x 32 keeps up to 256 keys in the
# batcher, enough to fill two batches of MAX_BATCH while earlier ones are installed.
WORKER_TAKE = 32
SOURCES = {Outcome.HIT: "cache", Outcome.FETCHED: "registry", Outcome.STALE: "stale"}


@dataclass
class GatewaySettings:
    interface: str
    registries: list[str]  # registry server URLs, in order of preference
    token_file: str
    registry_ca: str | None = None  # verify https:// registries against it
    listen_port: int = 51820
    private_key_file: str | None = None
    state_dir: str = "/var/lib/wgjit"
    metrics_listen: str = "127.0.0.1:9587"
    idle_timeout: float = 300.0
    evict_interval: float = 30.0
    handshake_grace: float = 15.0
    max_peers: int = 0
    feed_interval: float = 5.0
    backend: str = "auto"
    capture_interfaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    rate: float = 50.0
    burst: int = 100
    positive_ttl: float = 300.0
    negative_ttl: float = 30.0
    stale_ttl: float = 86_400.0
    registry_timeout: float = 3.0
    workers: int = 8
    lookup_batch: int = MAX_BATCH  # keys per registry call (batch.py); 1: one GET per key
    lookup_linger: float = LINGER
    trigger_keepalive: int = TRIGGER_KEEPALIVE
    install_mode: str = DEFAULT_INSTALL_MODE
    cookies: str = "auto"  # load.MODES
    source_rate: float = PACKETS_PER_SECOND  # initiations per source a second; 0: no limit
    source_burst: int = PACKETS_BURSTABLE
    key_filter: str = "on"  # "off": look every key up, as before the filter


def gate_settings(s: GatewaySettings) -> tuple:
    return s.cookies, s.source_rate, s.source_burst


def build_gate(s: GatewaySettings, responder: Responder,
               served: Callable[[str], bool]) -> InitiationGate:
    """The checks before any DH work, from the settings (gate.py)."""
    limiters = None
    if s.source_rate > 0:
        limiters = (SourceLimiter(s.source_rate, s.source_burst),
                    SourceLimiter(s.source_rate, s.source_burst))
    return InitiationGate(responder, CookieResponder(responder.public_key),
                          LoadSignal(s.cookies), limiters, served)


def underlay_interfaces(exclude: str) -> list[str]:
    """Ethernet interfaces of this network namespace, but the WireGuard one.

    The BPF program assumes an Ethernet header; tun devices and WireGuard
    interfaces have none, so they are never bound.
    """
    found = []
    for _, name in socket.if_nameindex():
        if name == exclude:
            continue
        try:
            kind = int(Path(f"/sys/class/net/{name}/type").read_text())
        except (OSError, ValueError):
            continue
        if kind == ARPHRD_ETHER:
            found.append(name)
    return found


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self._stop = threading.Event()
        self.queue = FairQueue()
        self.known = KnownKeys()
        self._known_loaded_at = float("-inf")
        self._feed_lock = threading.Lock()  # one feed read at a time (job or catch-up)
        self._caught_up_at = float("-inf")
        self.served = ServedEndpoints()
        self._replay_log = TokenBucket(REPLAY_LOG_RATE, REPLAY_LOG_BURST)
        self._replays_unlogged = 0
        # Whole-device reads, one at a time: each holds every peer in memory
        # (~40 MB at 50,000), and two at once would double the daemon's peak.
        self._device_read = threading.Lock()
        self.device: WgDevice | None = None
        self.capture: Capture | None = None
        self.reinjector: Reinjector | None = None
        self._threads: list[threading.Thread] = []
        self._http = None
        self.scheduler: BackgroundScheduler | None = None
        self.registry_ok: bool | None = None

    # -- start and stop ---------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        if s.idle_timeout < REJECT_AFTER_TIME:
            log.warning("idle timeout %.0f s is below REJECT_AFTER_TIME (%.0f s): clients "
                        "evicted with live session keys cannot come back until their keys "
                        "expire", s.idle_timeout, REJECT_AFTER_TIME)
        state_dir = Path(s.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        token = read_secret(s.token_file, what="gateway token")
        private_key = (read_secret(s.private_key_file, what="private key")
                       if s.private_key_file else None)
        self.device = ensure_device(s.interface, private_key=private_key,
                                    listen_port=s.listen_port, addresses=s.addresses,
                                    backend=s.backend)
        info = self.device.info()
        if info.private_key is None:
            raise WgError(f"{s.interface}: the device has no private key and none was given "
                          "(--private-key-file)")
        self.responder = Responder(decode_key(info.private_key))
        self.sender = RawUdpSender()
        self.gate = build_gate(s, self.responder, self._served_here)
        port = info.listen_port or s.listen_port
        underlay = s.capture_interfaces or underlay_interfaces(s.interface)
        if not underlay:
            raise WgError("no Ethernet interface to capture on; give --capture-interface")
        self.capture = Capture(underlay, port=port)
        if s.install_mode == "reinject":
            self.reinjector = Reinjector()

        self.installer = Installer(self.device, s.trigger_keepalive)
        adopted = self.installer.adopt()
        for key in adopted:
            events.emit("peer_adopted", public_key=key)
        self.registry = build_gateway_registry(s.registries, token, self.metrics,
                                               timeout=s.registry_timeout,
                                               ca_file=s.registry_ca)
        db_path = state_dir / "gateway.db"
        self.replay_store = ReplayStore(db_path)
        self.replay = ReplayGuard(store=self.replay_store)
        self.repair = EndpointRepair(self.device.set_endpoint)
        self.lookups = LookupBatcher(self._fetch_many, TokenBucket(s.rate, s.burst),
                                     max_batch=s.lookup_batch, linger=s.lookup_linger,
                                     in_flight=s.workers)
        self.cache = PeerCache(db_path, self.lookups,
                               CachePolicy(s.positive_ttl, s.negative_ttl, s.stale_ttl))
        self.state = GatewayState(db_path)
        self.evictor = Evictor(self.installer,
                               EvictionPolicy(s.idle_timeout, s.handshake_grace, s.max_peers),
                               self.metrics, on_evict=self._on_evict)
        self.feed = FeedFollower(self.registry, self.state, self.cache, self.installer,
                                 self.metrics, self.evictor.removed_elsewhere,
                                 known=self.known)
        self.feed.check_adopted(adopted)
        self._workers = [threading.Thread(target=self._lookup_worker, name=f"pull_{n}",
                                          daemon=True) for n in range(s.workers)]
        for w in self._workers:
            w.start()
        self._start_scheduler()
        self._http = serve_http(s.metrics_listen, self.metrics, self.health)
        t = threading.Thread(target=self._capture_loop, name="capture", daemon=True)
        t.start()
        self._threads.append(t)
        self.metrics.installed.set(len(self.installer))
        events.emit("gateway_ready", interface=s.interface, public_key=encode_key(
            self.responder.public_key), listen_port=port, capture=underlay,
            peers=len(self.installer), backend=self.device.backend, install_mode=s.install_mode)

    def _start_scheduler(self) -> None:
        s = self.settings
        self.jobs = Jobs(self.metrics.missed_jobs)
        self.scheduler = self.jobs.scheduler  # the daemon's one scheduler
        self.jobs.every("evict", s.evict_interval, self.evict_pass)
        self.jobs.every("feed", s.feed_interval, self._poll_feed, now=True)
        if s.key_filter == "on":
            self.jobs.every("known_keys", KNOWN_KEYS_RETRY, self._load_known_keys, now=True)
        # Short period: a crossed handshake is broken only when this job sees it.
        # check_handshakes lengthens it when reading the device gets expensive.
        self.jobs.every("handshakes", HANDSHAKE_CHECK_MIN, self.check_handshakes)
        self.jobs.every("cache_expire", 300, self.cache.expire)
        self.jobs.every("registry_probe", PROBE_EVERY, self.registry.servers.probe)
        self.jobs.start()

    def stop(self) -> None:
        """Drain: no new captures, finish running installs, stop jobs, close."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self.scheduler is not None:
            self.jobs.shutdown()
        self.queue.close()
        for w in getattr(self, "_workers", ()):
            w.join(timeout=10)
        if hasattr(self, "repair"):
            self.repair.close()
        if hasattr(self, "sender"):
            self.sender.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.capture is not None:
            self.capture.close()
        if self.reinjector is not None:
            self.reinjector.close()
        for closable in ("lookups", "cache", "state", "replay_store"):
            if hasattr(self, closable):
                getattr(self, closable).close()
        if self.device is not None:
            self.device.close()
        events.emit("gateway_stopped", interface=self.settings.interface)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads settings via `reload`."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        try:
            self.start()
            while not self._stop.wait(1.0):
                if not all(t.is_alive() for t in self._threads):
                    log.error("capture thread died; exiting so the supervisor restarts us")
                    return 1
        finally:
            self.stop()
        return 0

    def apply(self, settings: GatewaySettings) -> None:
        """Take new tunables without a restart (SIGHUP). Interface, registry servers and
        install mode stay (the raw sockets of re-injection are opened at start)."""
        if settings.registries != self.settings.registries:
            log.warning("reload: registry servers changed to %s; still using %s until a "
                        "restart", settings.registries, self.settings.registries)
            settings = dataclasses.replace(settings, registries=self.settings.registries)
        if settings.registry_ca != self.settings.registry_ca:
            log.warning("reload: registry_ca changed to %s; still verifying against %s until "
                        "a restart", settings.registry_ca, self.settings.registry_ca)
            settings = dataclasses.replace(settings, registry_ca=self.settings.registry_ca)
        old, self.settings = self.settings, settings
        self.evictor.policy = EvictionPolicy(settings.idle_timeout, settings.handshake_grace,
                                             settings.max_peers)
        self.cache.policy = CachePolicy(settings.positive_ttl, settings.negative_ttl,
                                        settings.stale_ttl)
        self.lookups.retune(TokenBucket(settings.rate, settings.burst), settings.lookup_batch,
                            settings.lookup_linger)
        if gate_settings(settings) != gate_settings(old):
            # A new gate: fresh per-source buckets and cookie secret (outstanding
            # cookies stop counting; their clients get new ones on their next try).
            self.gate = build_gate(settings, self.responder, self._served_here)
        self.jobs.reschedule("evict", settings.evict_interval)
        self.jobs.reschedule("feed", settings.feed_interval)
        events.emit("config_reloaded", idle_timeout=settings.idle_timeout,
                    evict_interval=settings.evict_interval, rate=settings.rate)

    # -- the packet path --------------------------------------------------------

    def _capture_loop(self) -> None:
        assert self.capture is not None
        while not self._stop.is_set():
            try:
                datagrams = self.capture.recv(timeout=0.25)
            except OSError as e:
                log.error("capture: %s", e)
                time.sleep(0.5)
                continue
            for d in datagrams:
                self.on_datagram(d)
            self.gate.end_of_read(self.queue.unknown_fill())
            self.metrics.under_load.set(self.gate.load.under_load)
            self._sync_capture_drops()

    def _sync_capture_drops(self) -> None:
        assert self.capture is not None
        for reason, n in self.capture.malformed.items():
            if n:
                self.metrics.drops.labels(reason).inc(n)
        self.capture.malformed.clear()
        for reason, n in self.queue.take_dropped().items():
            self.metrics.drops.labels(reason).inc(n)
        self.metrics.lookup_queue.set(len(self.queue))

    def on_datagram(self, d: Datagram) -> None:
        """One captured initiation: the cheap checks, then at most one DH pair and
        a place in the lookup queue. Every early return counts a drop reason."""
        seen_at = time.time()
        self.metrics.initiations.inc()
        packet = d.payload
        verdict = self.gate.judge(packet, d.src_ip, d.src_port, d.endpoint)
        if verdict.action != VERIFY:
            if verdict.action == COOKIE:
                self._send_cookie(d)
            self.metrics.drops.labels(verdict.reason).inc()
            return
        try:
            init = self.responder.consume_initiation(packet)
        except InitiationError as e:
            self.metrics.drops.labels(e.reason).inc()
            return
        key = encode_key(init.initiator_static)
        # Judged for installed peers too: the data plane never saw the initiation
        # that brought a peer in (it had no such peer then), so it has no timestamp
        # to refuse a replay of it by, and accepts one, aiming the peer at the
        # replayer. We put the endpoint back (repair.py).
        if not self.replay.accept(init.initiator_static, init.timestamp):
            self._on_replay(key, d, init.timestamp)
            return
        if (entry := self.installer.get(key)) is not None:
            # Rekeys and retries of peers we already serve, from a new address: the
            # data plane has them. A fresh initiation is the client's own: remember
            # where from.
            entry.endpoint = d.endpoint
            self.served.note(key, d.endpoint)
            self.metrics.drops.labels("already_installed").inc()
            return
        self.metrics.verified.inc()
        known = self.known.knows(init.initiator_static)
        if known is None:  # no filter yet: what the gateway itself has seen
            known = self.replay.kept(init.initiator_static) or self.cache.knows(key)
        if known:
            self.gate.verified_known()
        # d goes along: only this verified, fresh initiation may be re-injected.
        work = Work(key, d.endpoint, source_key(d.src_ip), known, seen_at, init.timestamp, d)
        if self.queue.put(work) is not None:
            return  # counted by the queue
        events.emit("initiation_seen", ts=seen_at, endpoint=d.endpoint, interface=d.ifname)
        events.emit("identity_recovered", public_key=key, endpoint=d.endpoint)

    def _served_here(self, endpoint: str) -> bool:
        key = self.served.serving(endpoint)
        return key is not None and key in self.installer

    def _send_cookie(self, d: Datagram) -> None:
        """Answer an initiation without a valid mac2 with a cookie reply (gate.py says when)."""
        reply = self.gate.cookies.reply(d.payload, d.src_ip, d.src_port)
        try:
            self.sender.send(d.dst_ip, d.dst_port, d.src_ip, d.src_port, reply)
        except OSError as e:  # a full send buffer under a flood: that reply is lost
            self.metrics.drops.labels("cookie_send_failed").inc()
            log.debug("cookie reply to %s: %s", d.endpoint, e)
            return
        self.metrics.cookie_replies.inc()

    def _on_replay(self, key: str, d: Datagram, timestamp: bytes) -> None:
        self.metrics.drops.labels("replay").inc()
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

    def _lookup_worker(self) -> None:
        while works := self.queue.get_many(WORKER_TAKE):
            try:
                admitted = [w for w in works if w.known or self._admits_unknown(w.key)]
                try:
                    lookups = self.cache.lookup_many([w.key for w in admitted])
                except Exception:
                    log.exception("lookup of %d keys failed", len(admitted))
                    lookups = {}
                for work in admitted:
                    if work.key in lookups:
                        self._pull_and_install(work, lookups[work.key])
            finally:
                for work in works:
                    self.queue.done(work.key)

    def _fetch_many(self, keys: list[str]) -> dict:
        try:
            found = self.registry.lookup(keys)
            self.registry_ok = True
            return found
        except Exception:
            self.registry_ok = False
            self.metrics.registry_errors.inc()
            raise
        finally:
            self.metrics.registry_calls.inc()
            self.metrics.registry_lookup_keys.inc(len(keys))

    def _admits_unknown(self, key: str) -> bool:
        if self._filter_admits(key):
            return True
        self.metrics.lookups.labels("filtered").inc()
        events.emit("peer_unknown", public_key=key, reason="filtered")
        return False

    def _pull_and_install(self, work: Work, lookup: Lookup) -> None:
        key, endpoint, seen_at = work.key, work.endpoint, work.seen_at
        reinject = self.reinjector is not None
        try:
            self.metrics.lookups.labels(lookup.outcome.value).inc()
            if lookup.peer is None:
                events.emit("peer_unknown", public_key=key, reason=lookup.outcome.value)
                return
            events.emit("peer_pulled", public_key=key, source=SOURCES[lookup.outcome],
                        ms=round(1000 * (time.time() - seen_at), 2))
            # The client's latest initiation, should it have retried during a slow pull.
            work = self.queue.latest(key) or work
            d, endpoint = work.datagram, work.endpoint
            try:
                installed = self.installer.install(lookup.peer, endpoint, reinject=reinject)
            except WgError as e:
                self.metrics.install_errors.inc()
                log.error("install of %s failed: %s", key, e)
                return
            if self.feed.removed_since(key, seen_at):
                # Revoked while this pull was in flight: the feed may have removed
                # the peer before our install, and our lookup cached the old answer.
                self.cache.invalidate(key)
                if installed and self.installer.remove([key]):
                    self.evictor.removed_elsewhere(key, "revoked")
                return
            if installed:
                self.served.note(key, endpoint)
                self.replay.keep(decode_key(key), work.timestamp)
                self.repair.forget(key)  # a new peer on the device: a new history
                elapsed = time.time() - seen_at
                self.metrics.installs.inc()
                self.metrics.install_latency.observe(elapsed)
                self.metrics.installed.set(len(self.installer))
                self.evictor.note_install(key)
                events.emit("peer_installed", public_key=key, endpoint=endpoint,
                            allowed_ips=list(lookup.peer.allowed_ips),
                            ms=round(1000 * elapsed, 2),
                            mode=("reinject" if reinject else "invert"
                                  if self.installer.role_inversion else "responder"))
                if reinject:
                    self._reinject(key, d, seen_at)
        except Exception:
            log.exception("pull/install of %s failed", key)

    def _filter_admits(self, key: str) -> bool:
        """May a key the filter did not know be looked up? Yes if there is no filter,
        or if the change feed, read now (at most every FEED_CATCH_UP_EVERY), adds it.

        Workers never wait for another's feed read: under a flood of unknown keys
        they would all queue behind it while the unknown lane filled up (and that
        lane filling is a load signal). One that finds a read going on refuses.
        """
        raw = decode_key(key)
        if self.known.knows(raw) is not False:
            return True
        if time.monotonic() - self._caught_up_at >= FEED_CATCH_UP_EVERY and \
                self._feed_lock.acquire(blocking=False):
            try:
                self._caught_up_at = time.monotonic()
                self.feed.poll()
            finally:
                self._feed_lock.release()
        return self.known.knows(raw) is not False

    def _reinject(self, key: str, d: Datagram, seen_at: float) -> None:
        assert self.reinjector is not None
        try:
            self.reinjector.send(d)
        except OSError as e:
            self.metrics.reinjections.labels("failed").inc()
            log.error("re-injecting the initiation of %s failed: %s", key, e)
            if self.installer.fall_back(key):
                events.emit("reinjection_fallback", level=logging.WARNING, public_key=key,
                            endpoint=d.endpoint, reason="send_failed")
            return
        self.metrics.reinjections.labels("sent").inc()
        events.emit("initiation_reinjected", public_key=key, endpoint=d.endpoint,
                    ms=round(1000 * (time.time() - seen_at), 2))

    # -- housekeeping -------------------------------------------------------------

    def _poll_feed(self) -> None:
        with self._feed_lock:
            self.feed.poll()

    def _load_known_keys(self) -> None:
        if time.monotonic() - self._known_loaded_at < KNOWN_KEYS_RELOAD:
            return
        try:
            load_filter(self.known, self.registry.keys, self.registry.changes)
        except PeerNotFound:
            log.warning("the registry has no /v1/gateway/keys: no known-key filter; "
                        "every key is looked up")
            self._known_loaded_at = time.monotonic()  # ask again at the next reload
            return
        except RegistryUnavailable as e:
            log.warning("known-key filter not loaded (registry unavailable: %s); retrying "
                        "in %.0f s", e, KNOWN_KEYS_RETRY)
            return
        self._known_loaded_at = time.monotonic()
        self.metrics.known_keys.set(len(self.known))
        events.emit("known_keys_loaded", keys=len(self.known),
                    bytes=self.known.memory_bytes(), cursor=self.known.cursor)


    def evict_pass(self) -> dict:
        try:
            with self._device_read:
                return self.evictor.run_pass()
        except WgError as e:
            log.error("eviction pass: device error: %s", e)
            return {}

    def check_handshakes(self) -> None:
        pending = self.installer.pending_triggers()
        if not pending:
            return
        # An eviction pass is reading (or just read) every peer: wait for the next tick.
        if not self._device_read.acquire(blocking=False):
            return
        try:  # held until the copy is dropped, so that no second one can coexist
            started = time.monotonic()
            peers = self.device.activity()
            now = time.monotonic()
            self._pace_handshake_checks(now - started)
            self._handshakes_seen(peers, set(pending), now)
            del peers
        finally:
            self._device_read.release()

    def _handshakes_seen(self, peers: list, wanted: set[str], now: float) -> None:
        done = []
        for p in peers:
            if p.public_key not in wanted:
                continue
            if (p.last_handshake is not None or p.rx_bytes) and \
                    self.installer.is_reinjected(p.public_key):
                # The data plane consumed the re-injected initiation (it counts
                # handshake messages in rx_bytes: 148 after one initiation with
                # wireguard-go; the kernel's receive.c calls update_rx_stats after
                # consuming a handshake message) and answered the
                # client; the handshake completes with the client's first data
                # packet, one round trip later (or already did, at a short RTT).
                self.installer.reinjection_answered(p.public_key)
                self.metrics.reinjections.labels("answered").inc()
                events.emit("reinjection_answered", public_key=p.public_key)
            if p.last_handshake is not None:
                done.append(p.public_key)
            elif self.installer.reinjection_overdue(p.public_key, now):
                # Dropped on the way (a firewall), refused (a cookie demanded
                # under load), or not ours to answer: the gateway initiates.
                self.metrics.reinjections.labels("unanswered").inc()
                if self.installer.fall_back(p.public_key):
                    events.emit("reinjection_fallback", level=logging.WARNING,
                                public_key=p.public_key, reason="unanswered")
            elif self.installer.retrigger_due(p.public_key, now) and \
                    self.installer.retrigger(p.public_key):
                self.metrics.retriggers.inc()
                events.emit("handshake_retriggered", public_key=p.public_key)
        if done:
            self.installer.handshake_done(done)
            for key in done:
                events.emit("handshake_completed", public_key=key)

    def _pace_handshake_checks(self, dump_seconds: float) -> None:
        """Keep the whole-device reads of this job to a fraction of the time.

        Reading 50,000 peers takes about a second (bench/evict.py), and
        wireguard-go holds back installs while it answers; repeated every 0.1 s
        while installs keep coming, it would take a core, the GIL the capture
        needs and the device lock installs need. The period follows the cost,
        so a large gateway breaks crossed handshakes a little later instead.
        """
        period = min(HANDSHAKE_CHECK_MAX,
                     max(HANDSHAKE_CHECK_MIN, HANDSHAKE_CHECK_COST_FACTOR * dump_seconds))
        current = self.jobs.period("handshakes")
        if abs(period - current) > 0.25 * current:
            self.jobs.reschedule("handshakes", round(period, 2))

    def _on_evict(self, key: str, reason: str) -> None:
        # The replay guard keeps the key's last timestamp (on disk, for keys that
        # were installed): a returning client's clock-based timestamp is newer
        # anyway, while a recorded old initiation must not reinstall the peer.
        self.served.drop(key)
        self.repair.forget(key)
        self.metrics.installed.set(len(self.installer))

    def health(self) -> tuple[bool, dict]:
        capture_ok = bool(self._threads) and all(t.is_alive() for t in self._threads)
        sched_ok = self.scheduler is not None and self.scheduler.running
        ok = capture_ok and sched_ok
        return ok, {
            "status": "ok" if ok else "failing",
            "capture": capture_ok,
            "scheduler": sched_ok,
            "installed_peers": len(self.installer) if hasattr(self, "installer") else 0,
            "registry": {None: "unknown", True: "ok", False: "unavailable"}[self.registry_ok],
            # Served only once start() has built the registry (serve_http comes last).
            "registry_servers": self.registry.servers.health(),
            "feed": "ok" if getattr(self, "feed", None) and self.feed.healthy else "behind",
            "last_evict_pass": getattr(getattr(self, "evictor", None), "last_pass", {}),
        }

