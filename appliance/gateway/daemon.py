"""The gateway daemon: its parts built and wired (build_gateway), started and stopped.

capture -> gate (gate.py) -> verify (handshake.py) -> admission decision
(intake.py) -> lookup queue (admission.py) -> workers (provision.py: filter,
cache and registry, install, revocation race, re-injection); plus housekeeping
jobs. Each of those is its own module with its own unit tests; this one holds
the threads, the jobs, reload and health.

Threads, and why:
- capture: reads initiations off the packet sockets and verifies them. It never
  waits on the network or the device; work goes to the queue.
- lookup workers: registry lookups and installs (slow, may block on HTTP),
  taking work from the fair lookup queue several items at a time.
- lookup batcher (batch.py): one dispatcher and up to `workers` registry calls
  at once, each carrying the cache misses of many workers.
- repair: puts back endpoints that replayed initiations stole (repair.py).
- scheduler (APScheduler, one instance): eviction, change feed, known-key
  filter, the handshake check (handshakes.py), cache expiry, the replay
  memory's disk writes (replay.py), registry probes.
- http: /metrics, /healthz and /status (`wgjit gateway status`).
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
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from appliance.gateway import events
from appliance.gateway.admission import FairQueue
from appliance.gateway.batch import LookupBatcher
from appliance.gateway.cache import FEED_WINDOW_POLLS, CachePolicy, PeerCache
from appliance.gateway.capture import Capture, Datagram
from appliance.gateway.cookie import CookieResponder
from appliance.gateway.cookie_learn import CookieLearner
from appliance.gateway.evict import REJECT_AFTER_TIME, EvictionPolicy, Evictor
from appliance.gateway.failover import PROBE_EVERY
from appliance.gateway.feed import FeedFollower
from appliance.gateway.filterload import KNOWN_KEYS_RETRY, FilterLoader
from appliance.gateway.gate import COOKIE, VERIFY, WITHHELD, InitiationGate
from appliance.gateway.handshake import InitiationError, Responder
from appliance.gateway.handshakes import HandshakeWatch
from appliance.gateway.install import Installer
from appliance.gateway.intake import QUEUED, Intake
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.load import LoadSignal
from appliance.gateway.metrics import GatewayMetrics, http_server
from appliance.gateway.overlap import DROP_REASON as OVERLAP
from appliance.gateway.overlap import OverlapGuard
from appliance.gateway.provision import FeedReads, Provisioner
from appliance.gateway.pull import GatewayRegistry, build_gateway_registry
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.rawsend import RawUdpSender
from appliance.gateway.reinject import Reinjector
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import FLUSH_EVERY as REPLAY_FLUSH_EVERY
from appliance.gateway.replay import ReplayGuard, ReplayStore
from appliance.gateway.schedule import Jobs
from appliance.gateway.served import ServedEndpoints
from appliance.gateway.settings import GatewaySettings
from appliance.gateway.sourcelimit import SourceLimiter
from appliance.gateway.state import GatewayState
from appliance.gateway.status import SAMPLE_SECONDS, RecentCounts, counter_by_label
from appliance.keys import decode_key, encode_key
from appliance.secrets import read_secret
from appliance.wg import WgDevice, WgError, ensure_device

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
# Withheld initiations read later than this after they arrived are not owed a cookie
# of ours (cookie_learn.py): the data plane's reply to them left long before, was read
# from the other socket first and may have been pushed out of the learner's bounded
# table of replies waiting for their initiation (16,384, ~0.8 s of the data plane's
# replies at 20,000/s). A late cookie of ours would then reach the client after the
# data plane's and replace it, and the data plane would refuse the retry. In a
# 20,000/s forged flood (bench/flood.py) the capture read 1-2.6 s behind.
OWE_WITHIN = 0.5
CACHE_EXPIRE_EVERY = 300.0  # seconds between sweeps of entries too old even to serve stale


def gate_settings(s: GatewaySettings) -> tuple:
    return s.cookies, s.source_rate, s.source_burst


def build_gate(s: GatewaySettings, responder: Responder,
               served: Callable[[str], bool]) -> InitiationGate:
    """The checks before any DH work, from the settings (gate.py)."""
    limiters = None
    if s.source_rate > 0:
        limiters = (SourceLimiter(s.source_rate, s.source_burst),
                    SourceLimiter(s.source_rate, s.source_burst))
    cookies = CookieResponder(responder.public_key)
    # With cookies off the daemon never asks for mac2: nothing to learn (cookie_learn.py).
    learner = None if s.cookies == "off" else CookieLearner(responder.public_key,
                                                            cookies.is_own)
    return InitiationGate(responder, cookies, LoadSignal(s.cookies), limiters, served, learner)


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


@dataclass
class GatewayParts:
    """Everything a running gateway is made of, built by build_gateway."""

    metrics: GatewayMetrics
    device: WgDevice
    responder: Responder
    sender: RawUdpSender
    capture: Capture
    reinjector: Reinjector | None  # None: install mode invert
    installer: Installer
    registry: GatewayRegistry
    known: KnownKeys
    filter_loader: FilterLoader
    served: ServedEndpoints
    served_here: Callable[[str], bool]  # for the gate: an endpoint a peer of ours uses
    repair: EndpointRepair
    replay: ReplayGuard
    lookups: LookupBatcher
    cache: PeerCache
    evictor: Evictor
    feed: FeedFollower
    feed_reads: FeedReads
    queue: FairQueue
    intake: Intake
    provisioner: Provisioner
    jobs: Jobs
    watch: HandshakeWatch
    closing: ExitStack  # closes the parts that hold files, sockets and threads
    listen_port: int
    underlay: list[str] = field(default_factory=list)


def build_gateway(s: GatewaySettings) -> Gateway:
    """Open the device, the packet sockets, the registry clients and the state dir,
    then assemble the gateway. Nothing runs until Gateway.start."""
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
    metrics = GatewayMetrics()
    closing = ExitStack()
    try:
        device = closing.enter_context(ensure_device(
            s.interface, private_key=private_key, listen_port=s.listen_port,
            addresses=s.addresses, backend=s.backend))
        info = device.info()
        if info.private_key is None:
            raise WgError(f"{s.interface}: the device has no private key and none was given "
                          "(--private-key-file)")
        underlay = s.capture_interfaces or underlay_interfaces(s.interface)
        if not underlay:
            raise WgError("no Ethernet interface to capture on; give --capture-interface")
        port = info.listen_port or s.listen_port
        sender = RawUdpSender()
        closing.callback(sender.close)
        # cookie_replies: the data plane's own, to learn (cookie_learn.py)
        capture = closing.enter_context(Capture(underlay, port=port, cookie_replies=True))
        reinjector = Reinjector() if s.install_mode == "reinject" else None
        if reinjector is not None:
            closing.callback(reinjector.close)
        registry = build_gateway_registry(s.registries, token, metrics,
                                          timeout=s.registry_timeout, ca_file=s.registry_ca)
        return assemble(s, closing, metrics=metrics, device=device,
                        private_key=decode_key(info.private_key), listen_port=port,
                        underlay=underlay, sender=sender, capture=capture,
                        reinjector=reinjector, registry=registry, db_path=state_dir / "gateway.db")
    except BaseException:
        closing.close()
        raise


def cache_policy(s: GatewaySettings) -> CachePolicy:
    return CachePolicy(s.positive_ttl, s.negative_ttl, s.stale_ttl,
                       feed_window=FEED_WINDOW_POLLS * s.feed_interval)


def assemble(s: GatewaySettings, closing: ExitStack, *, metrics: GatewayMetrics,
             device: WgDevice, private_key: bytes, listen_port: int, underlay: list[str],
             sender: RawUdpSender, capture: Capture, reinjector: Reinjector | None,
             registry: GatewayRegistry, db_path: Path) -> Gateway:
    """The parts that need no privileges, wired to the ones opened (build_gateway, or
    a unit test's fakes); adopts the device's peers. `closing` gets every closer."""
    installer = Installer(device, s.trigger_keepalive, OverlapGuard(
        lambda _refused: metrics.drops.labels(OVERLAP).inc()))
    replay_store = ReplayStore(db_path)
    closing.callback(replay_store.close)
    replay = ReplayGuard(store=replay_store)
    repair = EndpointRepair(device.set_endpoint)
    closing.callback(repair.close)
    # Cache misses coalesced into registry calls (batch.py), one per worker at most.
    lookups = LookupBatcher(registry.lookup, TokenBucket(s.rate, s.burst),
                            max_batch=s.lookup_batch, linger=s.lookup_linger,
                            in_flight=s.workers)
    closing.callback(lookups.close)
    cache = PeerCache(db_path, lookups, cache_policy(s))
    closing.callback(cache.close)
    state = GatewayState(db_path)
    closing.callback(state.close)
    served = ServedEndpoints()

    def on_evict(key: str, reason: str) -> None:
        # What the daemon remembers per installed peer goes with it; the replay
        # guard's timestamp stays (replay.py: an old initiation must not reinstall
        # the peer, and a returning client's is newer).
        served.drop(key)
        repair.forget(key)

    def served_here(endpoint: str) -> bool:
        key = served.serving(endpoint)
        return key is not None and key in installer

    evictor = Evictor(installer, EvictionPolicy(s.idle_timeout, s.handshake_grace,
                                                s.max_peers), metrics, on_evict=on_evict)
    known = KnownKeys()
    feed = FeedFollower(registry, state, cache, installer, metrics,
                        evictor.removed_elsewhere, known=known)
    feed_reads = FeedReads(feed)
    queue = FairQueue()
    jobs = Jobs(metrics.missed_jobs)
    parts = GatewayParts(
        metrics=metrics, device=device, responder=Responder(private_key), sender=sender,
        capture=capture, reinjector=reinjector, installer=installer, registry=registry,
        known=known, filter_loader=FilterLoader(known, registry.keys, registry.changes, metrics),
        served=served, served_here=served_here, repair=repair, replay=replay, lookups=lookups,
        cache=cache,
        evictor=evictor, feed=feed, feed_reads=feed_reads, queue=queue,
        intake=Intake(replay, installer, served, queue, known, cache.knows, repair, metrics,
                      feed_read_at=lambda: feed.caught_up_at),
        provisioner=Provisioner(queue=queue, known=known, feed=feed, feed_reads=feed_reads,
                                cache=cache, installer=installer, evictor=evictor,
                                served=served, replay=replay, repair=repair,
                                reinjector=reinjector, metrics=metrics),
        jobs=jobs, watch=HandshakeWatch(installer, metrics, jobs), closing=closing,
        listen_port=listen_port, underlay=underlay)
    adopted = installer.adopt()
    for key in adopted:
        events.emit("peer_adopted", public_key=key)
    feed.check_adopted(adopted)
    metrics.installed.set(len(installer))
    return Gateway(s, parts)


class Gateway:
    def __init__(self, settings: GatewaySettings, parts: GatewayParts) -> None:
        self.settings = settings
        self.parts = p = parts
        self.metrics = p.metrics
        self.gate = build_gate(settings, p.responder, p.served_here)
        p.provisioner.dataplane_cookie = self._dataplane_cookie
        self._stop = threading.Event()
        self._capture = threading.Thread(target=self._capture_loop, name="capture",
                                         daemon=True)
        self._workers = [threading.Thread(target=p.provisioner.work, name=f"pull_{n}",
                                          daemon=True) for n in range(settings.workers)]
        self._http: ThreadingHTTPServer = http_server(settings.metrics_listen, p.metrics,
                                                      self.health, self.status)
        self._drops = RecentCounts(counter_by_label(p.metrics.drops))
        self._started = time.monotonic()
        p.closing.callback(self._http.server_close)
        self._serving = threading.Thread(target=self._http.serve_forever, name="metrics-http",
                                         daemon=True)

    # -- start and stop ---------------------------------------------------------

    def start(self) -> None:
        p, s = self.parts, self.settings
        # Before capture: a continuous feed vouches for the cached peers
        # (cache.py), so known clients come back without registry lookups.
        p.feed.resume()
        for w in self._workers:
            w.start()
        self._schedule()
        self._serving.start()
        self._capture.start()
        events.emit("gateway_ready", interface=s.interface, public_key=encode_key(
            p.responder.public_key), listen_port=p.listen_port, capture=p.underlay,
            peers=len(p.installer), backend=p.device.backend, install_mode=s.install_mode)

    def _schedule(self) -> None:
        p, s = self.parts, self.settings
        p.jobs.every("evict", s.evict_interval, self.evict_pass)
        p.jobs.every("feed", s.feed_interval, p.feed_reads.poll, now=True)
        if s.key_filter == "on":
            p.jobs.every("known_keys", KNOWN_KEYS_RETRY, p.filter_loader.run, now=True)
        p.watch.schedule()
        p.jobs.every("cache_expire", CACHE_EXPIRE_EVERY, p.cache.expire)
        p.jobs.every("replay_flush", REPLAY_FLUSH_EVERY, p.replay.flush)
        p.jobs.every("drops_window", SAMPLE_SECONDS, self._drops.sample)
        self._schedule_audit(s.reconcile_interval)
        p.jobs.every("registry_probe", PROBE_EVERY, p.registry.servers.probe)
        p.jobs.start()

    def _schedule_audit(self, seconds: float) -> None:
        """The periodic check of every installed peer (FeedFollower.audit); 0: none."""
        jobs = self.parts.jobs
        jobs.remove("reconcile")
        if seconds > 0:
            jobs.every("reconcile", seconds, self.parts.feed.audit)

    def stop(self) -> None:
        """Drain: no new captures, finish running installs, stop jobs, close."""
        p = self.parts
        self._stop.set()
        if self._capture.ident is not None:  # started (start may have failed before)
            self._capture.join(timeout=5)
        p.jobs.shutdown()
        p.queue.close()
        # Lookups still waiting for a registry token are failed now, not served at
        # the token rate: after a herd with --lookup-batch 1, eight workers' takes
        # (2,048 keys) at 50 tokens a second held a stop for minutes.
        p.lookups.close()
        for w in self._workers:
            if w.ident is not None:
                w.join(timeout=10)
        if self._serving.ident is not None:
            self._http.shutdown()  # waits for serve_forever: only once it runs
        p.closing.close()
        events.emit("gateway_stopped", interface=self.settings.interface)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (SIGHUP: `apply`, set up by the CLI); then stop."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        try:
            self.start()
            while not self._stop.wait(1.0):
                if not self._capture.is_alive():
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
        p = self.parts
        old, self.settings = self.settings, settings
        p.evictor.set_policy(EvictionPolicy(settings.idle_timeout, settings.handshake_grace,
                                            settings.max_peers))
        p.cache.configure(cache_policy(settings))
        p.lookups.configure(settings.rate, settings.burst, settings.lookup_batch,
                            settings.lookup_linger)
        if gate_settings(settings) != gate_settings(old):
            # A new gate: fresh per-source buckets and cookie secret (outstanding
            # cookies stop counting; their clients get new ones on their next try).
            self.gate = build_gate(settings, p.responder, p.served_here)
        p.jobs.reschedule("evict", settings.evict_interval)
        p.jobs.reschedule("feed", settings.feed_interval)
        if settings.reconcile_interval != old.reconcile_interval:
            self._schedule_audit(settings.reconcile_interval)
        events.emit("config_reloaded", idle_timeout=settings.idle_timeout,
                    evict_interval=settings.evict_interval, rate=settings.rate)

    # -- the packet path --------------------------------------------------------

    def _capture_loop(self) -> None:
        p = self.parts
        while not self._stop.is_set():
            try:
                datagrams = p.capture.recv(timeout=0.25)
            except OSError as e:
                log.error("capture: %s", e)
                time.sleep(0.5)
                continue
            started = time.perf_counter()
            for d in datagrams:
                self.on_datagram(d)
            self._pay_owed_cookies()
            was = self.gate.load.under_load
            self.gate.end_of_read(p.queue.unknown_fill(), time.perf_counter() - started,
                                  p.capture.lag)
            if self.gate.load.under_load != was:  # what decided it, for the operator
                load = self.gate.load
                events.emit("under_load" if not was else "load_over", busy=round(load.busy, 3),
                            demand=round(load.demand, 3), lag_ms=round(load.lag * 1000),
                            verify_us=round(load.verify_cost * 1e6),
                            unknown_fill=round(p.queue.unknown_fill(), 3))
            self.metrics.under_load.set(self.gate.load.under_load)
            self._sync_drops()

    def _sync_drops(self) -> None:
        p = self.parts
        for reason, n in p.capture.malformed.items():
            if n:
                self.metrics.drops.labels(reason).inc(n)
        p.capture.malformed.clear()
        for reason, n in p.queue.take_dropped().items():
            self.metrics.drops.labels(reason).inc(n)
        self.metrics.lookup_queue.set(len(p.queue))

    def on_datagram(self, d: Datagram) -> None:
        """One captured initiation: the cheap checks, then at most one DH pair and
        the admission decision (intake.py). Every early return counts a drop reason."""
        if d.outgoing:  # a cookie reply this host sent (capture.py)
            self._saw_cookie_reply(d)
            return
        seen_at = time.time()
        self.metrics.initiations.inc()
        packet = d.payload
        learner = self.gate.learner
        used = learner.used if learner is not None else 0
        verdict = self.gate.judge(packet, d.src_ip, d.src_port, d.endpoint)
        if learner is not None and learner.used != used:
            self.metrics.learned_mac2.inc()
        if verdict.action != VERIFY:
            if verdict.action == COOKIE:
                self._send_cookie(d)
            elif verdict.action == WITHHELD and learner is not None:
                if self.parts.capture.lag < OWE_WITHIN:
                    learner.withhold(packet, d.src_ip, d.src_port, d)
                self.metrics.cookies_withheld.inc()
            self.metrics.drops.labels(verdict.reason).inc()
            return
        started = time.perf_counter()
        try:
            self._verify(d, seen_at)
        finally:  # its wall time is what the load signal weighs arrivals by (load.py)
            self.gate.verified(time.perf_counter() - started)

    def _verify(self, d: Datagram, seen_at: float) -> None:
        responder, intake = self.parts.responder, self.parts.intake
        try:
            opened = responder.open_static(d.payload)
            if intake.refuses_unknown(opened.initiator_static):  # spares the second X25519
                return
            init = responder.open_timestamp(opened)
        except InitiationError as e:
            self.metrics.drops.labels(e.reason).inc()
            return
        queued = intake.admit(init.initiator_static, init.timestamp, d, seen_at,
                              on_known=self.gate.verified_known) == QUEUED
        # The steps of an install are DEBUG; peer_installed sums them up at INFO
        # (provision.py): six lines a client cost a fifth of the daemon's CPU in a
        # 10,000-client herd. Their fields are not even made at INFO: this is the
        # capture thread.
        if queued and events.enabled(logging.DEBUG):
            events.emit("initiation_seen", level=logging.DEBUG, ts=seen_at,
                        endpoint=d.endpoint, interface=d.ifname)
            events.emit("identity_recovered", level=logging.DEBUG,
                        public_key=encode_key(init.initiator_static), endpoint=d.endpoint)

    def _pay_owed_cookies(self) -> None:
        """Withheld initiations the data plane did not answer get our cookie after all."""
        learner = self.gate.learner
        if learner is None:
            return
        for d in learner.owed():
            self._send_cookie(d)  # the Datagram handed to withhold()
            self.metrics.owed_cookies.inc()

    def _saw_cookie_reply(self, d: Datagram) -> None:
        learner = self.gate.learner
        if learner is None:
            return
        learned = learner.learned
        learner.saw_reply(d.payload, d.dst_ip, d.dst_port)
        self.metrics.cookies_learned.inc(learner.learned - learned)

    def _dataplane_cookie(self, ip: str, port: int) -> bytes | None:
        """The data plane's cookie for ip:port, for a re-injected copy's mac2 (the
        gate, and its learner, are replaced when a reload changes --cookies)."""
        learner = self.gate.learner
        return learner.cookie(ip, port) if learner is not None else None

    def _send_cookie(self, d: Datagram) -> None:
        """Answer an initiation without a valid mac2 with a cookie reply (gate.py says when)."""
        reply = self.gate.cookies.reply(d.payload, d.src_ip, d.src_port)
        try:
            self.parts.sender.send(d.dst_ip, d.dst_port, d.src_ip, d.src_port, reply)
        except OSError as e:  # a full send buffer under a flood: that reply is lost
            self.metrics.drops.labels("cookie_send_failed").inc()
            log.debug("cookie reply to %s: %s", d.endpoint, e)
            return
        self.metrics.cookie_replies.inc()

    # -- housekeeping -------------------------------------------------------------

    def evict_pass(self) -> dict:
        try:
            return self.parts.evictor.run_pass()
        except WgError as e:
            log.error("eviction pass: device error: %s", e)
            return {}

    def status(self) -> dict:
        """What `wgjit gateway status` shows (served at /status, loopback by default)."""
        p, s = self.parts, self.settings
        now = time.time()
        last = dict(p.evictor.last_pass)
        if "at" in last:
            last["seconds_ago"] = round(now - last.pop("at"), 1)
        caught_up = p.feed.caught_up_at
        return {
            "status": "ok" if all(self._running()) else "failing",
            "interface": s.interface, "backend": p.device.backend,
            "listen_port": p.listen_port, "install_mode": s.install_mode,
            "uptime_seconds": round(time.monotonic() - self._started, 1),
            "peers": {"installed": len(p.installer),
                      "awaiting_handshake": len(p.installer.pending_triggers()),
                      "max": s.max_peers},
            "cache": p.cache.counts(),
            "registry_servers": p.registry.servers.health(),
            "feed": {"cursor": p.feed.cursor, "healthy": p.feed.healthy,
                     "caught_up_seconds_ago": None if caught_up is None
                     else round(now - caught_up, 1)},
            "known_keys": len(p.known) if p.known.loaded else None,
            "under_load": self.gate.load.under_load,
            "dataplane_issuing_cookies": (self.gate.learner is not None
                                          and self.gate.learner.issuing),
            "capture_busy": round(self.gate.load.busy, 3),
            "verify_demand": round(self.gate.load.demand, 3),
            "last_evict_pass": last,
            "drops_last_minute": self._drops.last_window(),
        }

    def _running(self) -> tuple[bool, bool]:
        """Whether the capture thread and the scheduler are running."""
        return self._capture.is_alive(), self.parts.jobs.running

    def health(self) -> tuple[bool, dict]:
        p = self.parts
        capture_ok, sched_ok = self._running()
        ok = capture_ok and sched_ok
        return ok, {
            "status": "ok" if ok else "failing",
            "capture": capture_ok,
            "scheduler": sched_ok,
            "installed_peers": len(p.installer),
            "registry": p.registry.health(),
            "registry_servers": p.registry.servers.health(),
            "feed": "ok" if p.feed.healthy else "behind",
            "last_evict_pass": p.evictor.last_pass,
        }
