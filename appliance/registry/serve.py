"""Serve the registry with gunicorn (never the Flask development server)."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from gunicorn.app.base import BaseApplication

from appliance.config import ConfigError
from appliance.registry import create_app, errors
from appliance.registry.store import open_store
from appliance.secrets import SecretFileError, check_private
from appliance.transport import is_loopback

log = logging.getLogger(__name__)


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str


def check_tls(cert: str | None, key: str | None) -> TLSFiles | None:
    """Both files or neither; the key 0600; the pair loads. Checked before gunicorn
    starts, since a bad pair otherwise shows up as workers failing to boot in a loop."""
    if not cert and not key:
        return None
    if not (cert and key):
        missing = "tls_key (--tls-key)" if cert else "tls_cert (--tls-cert)"
        raise ConfigError(f"{missing}: required when the other TLS file is given")
    try:
        check_private(key, what="TLS key")
    except SecretFileError as e:
        raise ConfigError(f"tls_key: {e}") from e
    if not os.path.isfile(cert):
        raise ConfigError(f"tls_cert: {cert}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls_cert/tls_key: {cert} and {key} do not load as a certificate "
                          f"and its key: {e}") from e
    return TLSFiles(cert, key)


def _is_loopback_bind(listen: str) -> bool:
    return is_loopback(listen.rpartition(":")[0])


def pool_size(threads: int, db_pool_size: int | None) -> int:
    """PostgreSQL connections per worker: one per thread unless the operator says.

    A gthread worker serves at most `threads` requests at once, and a request
    holds at most one connection at a time (every store call returns its
    connection before the next; the metrics scrape and /healthz are requests
    too). More would sit idle against max_connections; fewer make requests
    queue for a connection (up to POOL_TIMEOUT) while threads are free."""
    return db_pool_size if db_pool_size is not None else threads


class RegistryServer(BaseApplication):
    def __init__(self, db: str, listen: str, workers: int, threads: int,
                 access_log: str | None = None, password_file: str | None = None,
                 tls: TLSFiles | None = None, db_pool_size: int | None = None) -> None:
        self.db = db
        self.password_file = password_file
        self.db_pool_size = pool_size(threads, db_pool_size)
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
            # gunicorn's own TLS: the workers wrap each accepted connection.
            "certfile": tls.cert if tls else None,
            "keyfile": tls.key if tls else None,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            # Settings this gunicorn does not know (older releases) are skipped.
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        # gunicorn's own error pages (414 for a long request line, 400 for a
        # malformed request) become JSON: see errors.gunicorn_error for why this
        # replaces a gunicorn function rather than setting an option.
        from gunicorn import util

        util.write_error = errors.gunicorn_error
        # Each worker opens its own store after the fork: connections and pools
        # must not be shared across processes.
        return create_app({"DATABASE": self.db, "DB_PASSWORD_FILE": self.password_file,
                           "DB_POOL_SIZE": self.db_pool_size, "SKIP_MIGRATE": True})


def serve(db: str, listen: str, workers: int, threads: int,
          access_log: str | None = None, password_file: str | None = None,
          tls: TLSFiles | None = None, db_pool_size: int | None = None) -> None:
    if tls is None and not _is_loopback_bind(listen):
        log.warning("serving plain HTTP on %s: tokens and preshared keys cross the network "
                    "in clear; give --tls-cert and --tls-key", listen)
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
        RegistryServer(db, listen, workers, threads, access_log, password_file, tls,
                       db_pool_size).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
