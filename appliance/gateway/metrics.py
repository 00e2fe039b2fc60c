"""The gateway's Prometheus metrics, and the local HTTP endpoint serving them.

prometheus-client has no /healthz, so a small stdlib HTTP server serves both
`/metrics` (prometheus-client's exposition) and `/healthz` (the daemon's own
check) on one local port.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from appliance.gateway.overlap import DROP_REASON as OVERLAP

log = logging.getLogger(__name__)

# The policy's own reasons first (those can thrash), then the registry's.
EVICTION_REASONS = ("idle", "never_handshaken", "cap", "revoked", "deleted")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.initiations = Counter("wgjit_gateway_initiations_total",
                                   "Handshake initiations seen by the capture", registry=r)
        self.verified = Counter("wgjit_gateway_initiations_verified_total",
                                "Initiations whose sender proved its key", registry=r)
        self.drops = Counter("wgjit_gateway_drops_total",
                             "Packets dropped before any lookup, by reason", ["reason"],
                             registry=r)
        self.lookups = Counter("wgjit_gateway_cache_lookups_total",
                               "Peer lookups by outcome (hit, fetched, stale, ...)",
                               ["outcome"], registry=r)
        self.registry_calls = Counter("wgjit_gateway_registry_calls_total",
                                      "HTTP calls to the registry", registry=r)
        self.registry_lookup_keys = Counter(
            "wgjit_gateway_registry_lookup_keys_total",
            "Keys asked in registry lookup calls (divide by calls: keys per call)", registry=r)
        self.registry_errors = Counter("wgjit_gateway_registry_errors_total",
                                       "Registry calls that failed", registry=r)
        self.registry_up = Gauge(
            "wgjit_gateway_registry_up",
            "1 while the registry server answers, 0 from a failed call until it answers again",
            ["server"], registry=r)
        self.registry_server_failures = Counter(
            "wgjit_gateway_registry_server_failures_total",
            "Calls and probes a registry server failed (unreachable, timeout, 5xx, 429)",
            ["server"], registry=r)
        self.registry_failovers = Counter(
            "wgjit_gateway_registry_failovers_total",
            "Calls retried on another registry server after a failure", registry=r)
        self.installs = Counter("wgjit_gateway_installs_total", "Peers installed", registry=r)
        self.install_errors = Counter("wgjit_gateway_install_errors_total",
                                      "Installs the device refused", registry=r)
        self.install_latency = Histogram(
            "wgjit_gateway_install_seconds", "From captured initiation to peer on the device",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.retriggers = Counter(
            "wgjit_gateway_handshake_retriggers_total",
            "Peers installed afresh because their handshake had not completed", registry=r)
        self.reinjections = Counter(
            "wgjit_gateway_reinjections_total",
            "Captured initiations handed back to the data plane, by outcome (sent, "
            "answered, unanswered: fell back to role inversion, failed: the send failed)",
            ["outcome"], registry=r)
        self.installed = Gauge("wgjit_gateway_installed_peers", "Peers on the device now",
                               registry=r)
        self.evictions = Counter("wgjit_gateway_evictions_total", "Peers removed, by reason",
                                 ["reason"], registry=r)
        self.reinstalls = Counter(
            "wgjit_gateway_reinstalls_after_eviction_total",
            "Installs of a peer evicted shortly before (eviction thrash), by the reason "
            "of that eviction", ["reason"], registry=r)
        self.evict_pass = Histogram("wgjit_gateway_evict_pass_seconds",
                                    "Duration of one eviction pass", registry=r,
                                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.feed_cursor = Gauge("wgjit_gateway_feed_cursor", "Change-feed cursor applied",
                                 registry=r)
        # A time, not a cursor distance: with a tenant-limited token the
        # gateway's cursor counts only its tenants' changes.
        self.feed_caught_up = Gauge(
            "wgjit_gateway_feed_caught_up_timestamp_seconds",
            "When a feed poll last reached the registry's latest change (Unix time)",
            registry=r)
        self.feed_polls = Counter("wgjit_gateway_feed_polls_total",
                                  "Change-feed polls started", registry=r)
        self.feed_errors = Counter("wgjit_gateway_feed_errors_total",
                                   "Change-feed polls that failed", registry=r)
        self.reconciles = Counter("wgjit_gateway_reconciles_total",
                                  "Full reconciles against the registry", registry=r)
        self.missed_jobs = Counter("wgjit_gateway_scheduler_missed_total",
                                   "Scheduled runs missed or skipped, by job", ["task"],
                                   registry=r)

        self.cookie_replies = Counter(
            "wgjit_gateway_cookie_replies_total",
            "Cookie replies sent to initiations without a valid mac2 while under load",
            registry=r)
        # cookie_learn.py: the data plane's own cookie replies
        self.cookies_learned = Counter(
            "wgjit_gateway_dataplane_cookies_total",
            "Cookie replies from the data plane seen leaving, matched to their initiation",
            registry=r)
        self.cookies_withheld = Counter(
            "wgjit_gateway_cookie_replies_withheld_total",
            "Cookie replies not sent because the data plane was answering with its own",
            registry=r)
        self.owed_cookies = Counter(
            "wgjit_gateway_cookie_replies_owed_total",
            "Withheld cookie replies sent after all: the data plane left the initiation "
            "unanswered", registry=r)
        self.learned_mac2 = Counter(
            "wgjit_gateway_dataplane_mac2_total",
            "Initiations whose mac2 was valid under a cookie the data plane gave that source",
            registry=r)
        self.under_load = Gauge("wgjit_gateway_under_load",
                                "1 while only initiations with a valid mac2 are processed",
                                registry=r)
        self.lookup_queue = Gauge("wgjit_gateway_lookup_queue",
                                  "Lookups waiting for a worker", registry=r)
        self.known_keys = Gauge("wgjit_gateway_known_keys",
                                "Keys in the known-key filter (0 until it is loaded)",
                                registry=r)
        self.endpoint_repairs = Counter(
            "wgjit_gateway_endpoint_repairs_total",
            "Endpoint repair requests after replays, by outcome (queued, folded, repeat, "
            "refused)",
            ["outcome"], registry=r)

        # Zero series from the start, so that a rate() sees the first eviction.
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
        for reason in EVICTION_REASONS[:3]:
            self.reinstalls.labels(reason)
        self.drops.labels(OVERLAP)  # overlap.py: a peer that would take another's networks

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def http_server(listen: str, metrics: GatewayMetrics,
                health: Callable[[], tuple[bool, dict]],
                report: Callable[[], dict] | None = None) -> ThreadingHTTPServer:
    """/metrics, /healthz and /status (`wgjit gateway status`) on HOST:PORT, bound (a
    port in use fails here, before the daemon starts anything) but not yet serving:
    run its serve_forever in a thread."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok, detail = health()
                self._send(200 if ok else 503, json.dumps(detail).encode(), "application/json")
            elif self.path == "/status" and report is not None:
                self._send(200, json.dumps(report()).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not_found"}', "application/json")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # scrapes every few seconds would drown the event log

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    return Server((host, int(port)), Handler)
