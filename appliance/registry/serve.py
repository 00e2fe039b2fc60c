"""Serve the registry with gunicorn (never the Flask development server)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from appliance.registry import create_app
from appliance.registry.store import open_store


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class RegistryServer(BaseApplication):
    def __init__(self, db: str, listen: str, workers: int = 2, threads: int = 4,
                 access_log: str | None = None, password_file: str | None = None) -> None:
        self.db = db
        self.password_file = password_file
        self.options = {
            "bind": listen,
            "workers": workers,
            # gthread keeps client connections alive between requests, which the
            # gateways' pooled HTTP sessions rely on; sync workers close each one.
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 30,
            "accesslog": access_log,
            "child_exit": _child_exit,
            "proc_name": "wgjit-registry",
            # gunicorn >= 24 opens a control socket at a fixed path by default;
            # two registries on one host (the lab, tests) would fight over it.
            "control_socket_disable": True,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            # Settings this gunicorn does not know (older releases) are skipped.
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        # Each worker opens its own store after the fork: connections and pools
        # must not be shared across processes.
        return create_app({"DATABASE": self.db, "DB_PASSWORD_FILE": self.password_file,
                           "SKIP_MIGRATE": True})


def serve(db: str, listen: str, workers: int = 2, threads: int = 4,
          access_log: str | None = None, password_file: str | None = None) -> None:
    # Migrate once in the master, before any worker can see the database.
    store = open_store(db, password_file)
    try:
        store.migrate()
    finally:
        store.close()
    # Per-worker metric files must start empty: stale files from a previous run
    # would be summed into this one's counters.
    metrics_dir = tempfile.mkdtemp(prefix="wgjit-registry-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        RegistryServer(db, listen, workers, threads, access_log, password_file).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
