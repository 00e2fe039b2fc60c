"""Fixtures shared by every tier."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
WGJIT = [sys.executable, "-m", "appliance"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None,
              verify: str | bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1, verify=verify).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class RegistryProcess:
    """A real `wgjit registry serve` (gunicorn) on loopback.

    With tls_dir: HTTPS, with a certificate for 127.0.0.1 from a CA made there
    (`self.ca_file` is what clients verify against).
    """

    def __init__(self, db: str | Path, workers: int = 2, port: int | None = None,
                 log: Path | None = None, tls_dir: Path | None = None,
                 args: tuple[str, ...] = ()) -> None:
        """`db` is a SQLite path or a postgresql:// URL (its password from PGPASSFILE);
        `args` go to `registry serve` as well."""
        self.db = db
        self.args = args
        self.workers = workers
        self.port = port or free_port()
        self.tls_args: list[str] = []
        self.ca_file: str | None = None
        if tls_dir is not None:
            from appliance.tlsca import CertificateAuthority

            ca = CertificateAuthority(tls_dir / "ca")
            cert, key = tls_dir / "server.pem", tls_dir / "server.key"
            ca.server_files(cert, key, ["localhost", "127.0.0.1"])
            self.tls_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
            self.ca_file = str(ca.cert_file)
        scheme = "https" if tls_dir is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = log or Path(db).with_suffix(".log")

    def start(self) -> RegistryProcess:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*WGJIT, "registry", "serve", "--db", str(self.db),
             "--listen", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
             *self.tls_args, *self.args],
            stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(self.url + "/healthz", proc=self.proc, verify=self.ca_file or True)
        return self

    def kill9(self) -> None:
        """Kill the master and its workers at once, as a power cut would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self._logf.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.proc is not None:
            # Workers may outlive a killed master for a moment.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self._logf.close()


def make_token(db: str | Path, scope: str, tenant: str | None = None) -> str:
    from appliance.registry import tokens
    from appliance.registry.store import open_store

    store = open_store(db)
    try:
        store.migrate()
        return tokens.create(store, scope, tenant)
    finally:
        store.close()


@pytest.fixture
def registry_server(tmp_path):
    servers: list[RegistryProcess] = []

    def start(db: str | Path | None = None, workers: int = 2, tls: bool = False,
              args: tuple[str, ...] = ()) -> RegistryProcess:
        log = tmp_path / f"registry-{len(servers)}.log"
        srv = RegistryProcess(db or tmp_path / "registry.db", workers, log=log,
                              tls_dir=tmp_path / "tls" if tls else None, args=args).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
