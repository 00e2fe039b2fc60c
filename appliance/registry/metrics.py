"""Prometheus metrics for the registry, correct under several gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (`wgjit registry serve` sets it before the
workers fork), each worker writes its samples to files there and /metrics
merges them; without it (tests, a single process) the default registry is used.
Gauges about the data (peer counts, feed position) are read from the database,
so every worker reports the same truth, and kept for STATS_TTL.
"""

from __future__ import annotations

import os
import threading
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from appliance.registry.store import Store

REQUESTS = Counter(
    "wgjit_registry_requests_total", "API requests by route and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "wgjit_registry_request_seconds", "API request latency by route", ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


# Counting peers scans the table: 0.25 s at 1M peers. /metrics needs no token,
# so uncached anyone could keep every gunicorn thread scanning; cached, a worker
# scans at most once per STATS_TTL whatever the request rate (at 1M peers and
# two workers, under 2% of one core). Counts kept by triggers were the other
# way: a counter row rewritten on every peer write (a million times in a bulk
# import), paid on the write path to save a scan this bound already makes
# cheap. 30 s is one or two Prometheus scrape intervals: totals, and the feed
# cursor shown beside them, may lag by that much.
STATS_TTL = 30.0


class DataCollector:
    """Gauges computed from the database, cached for `ttl` seconds."""

    def __init__(self, db: Store, ttl: float = STATS_TTL) -> None:
        self.db = db
        self.ttl = ttl
        self._lock = threading.Lock()
        self._stats: dict[str, int] | None = None
        self._expires = 0.0

    def stats(self) -> dict[str, int]:
        # Held across the query: concurrent scrapes wait for one scan, not run their own.
        with self._lock:
            now = time.monotonic()
            if self._stats is None or now >= self._expires:
                self._stats = self.db.stats()
                self._expires = now + self.ttl
            return self._stats

    def collect(self):
        stats = self.stats()
        peers = GaugeMetricFamily("wgjit_registry_peers", "Peers by state", labels=["state"])
        peers.add_metric(["active"], stats["active"])
        peers.add_metric(["revoked"], stats["revoked"])
        yield peers
        yield GaugeMetricFamily("wgjit_registry_tenants", "Tenants", value=stats["tenants"])
        yield GaugeMetricFamily("wgjit_registry_change_cursor", "Latest change-feed cursor",
                                value=stats["latest"])


def init_app(app: Flask) -> None:
    data = DataCollector(app.extensions["wgjit_store"])

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, route, str(resp.status_code)).inc()
        if "started" in g:
            LATENCY.labels(route).observe(time.perf_counter() - g.started)
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(registry)
        else:
            registry = _single_process_registry(registry)
        registry.register(data)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _single_process_registry(registry: CollectorRegistry) -> CollectorRegistry:
    # Our counters live in the default registry; wrap it so the data collector
    # can be added per scrape without registering it globally.
    class _Both:
        def collect(self):
            yield from REGISTRY.collect()

    registry.register(_Both())
    return registry
