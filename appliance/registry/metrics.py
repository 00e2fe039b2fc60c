"""Prometheus metrics for the registry, correct under several gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (`wgjit registry serve` sets it before the
workers fork), each worker writes its samples to files there and /metrics
merges them; without it (tests, a single process) the default registry is used.
Gauges about the data (peer counts, feed position) are read from the database
at scrape time, so every worker reports the same truth.
"""

from __future__ import annotations

import os
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


class DataCollector:
    """Gauges computed from the database when scraped."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def collect(self):
        stats = self.db.stats()
        peers = GaugeMetricFamily("wgjit_registry_peers", "Peers by state", labels=["state"])
        peers.add_metric(["active"], stats["active"])
        peers.add_metric(["revoked"], stats["revoked"])
        yield peers
        yield GaugeMetricFamily("wgjit_registry_tenants", "Tenants", value=stats["tenants"])
        yield GaugeMetricFamily("wgjit_registry_change_cursor", "Latest change-feed cursor",
                                value=stats["latest"])


def init_app(app: Flask) -> None:
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
        registry.register(DataCollector(app.extensions["wgjit_store"]))
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _single_process_registry(registry: CollectorRegistry) -> CollectorRegistry:
    # Our counters live in the default registry; wrap it so the data collector
    # can be added per scrape without registering it globally.
    class _Both:
        def collect(self):
            yield from REGISTRY.collect()

    registry.register(_Both())
    return registry
