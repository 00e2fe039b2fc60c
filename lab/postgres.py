"""A private PostgreSQL server for tests and benchmarks: Debian's binaries, a
temporary directory, loopback only, gone when stopped.

initdb refuses to run as root, so as root the server runs as the `postgres`
system user that Debian's package creates. Clients log in over TCP on
127.0.0.1 with a password (scram-sha-256), which `password_file` (0600) and
`pgpass` (a PGPASSFILE) hold: the same paths the registry uses in production.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "wgjit"


def find_bin(name: str) -> str:
    """The newest /usr/lib/postgresql/*/bin/NAME (Debian keeps them off PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]))
    if not found:
        raise FileNotFoundError(f"{name}: no /usr/lib/postgresql/*/bin/{name};"
                                " apt-get install postgresql")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, durable: bool = True, shared_buffers: str = "64MB") -> None:
        # durable=False turns off fsync: for tests on a shared machine, where
        # only the registry process is killed, never the host. Tests keep
        # shared_buffers small (many servers, tiny databases); a benchmark
        # sizes it for its data, as an operator would.
        self.durable = durable
        self.shared_buffers = shared_buffers
        self.port = _free_port()
        self.password = secrets.token_urlsafe(24)
        self.root = Path(tempfile.mkdtemp(prefix="wgjit-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.password_file = self.root / "password"
        self.pgpass = self.root / "pgpass"
        self._run_as = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam("postgres")
        self._serial = 0

    def _as_server(self, argv: list[str]) -> None:
        kwargs = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid,
                      "extra_groups": []}
        subprocess.run(argv, check=True, capture_output=True, text=True, cwd=self.root,
                       **kwargs)

    def start(self) -> PostgresServer:
        server_dir = self.root / "server"
        server_dir.mkdir()
        self.sockets.mkdir()
        pwfile = server_dir / "initpw"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            for p in (self.root, server_dir, self.sockets, pwfile):
                os.chown(p, self._run_as.pw_uid, self._run_as.pw_gid)
            self.root.chmod(0o711)  # postgres may enter; nobody else may list
        try:
            self._as_server([find_bin("initdb"), "-D", str(server_dir / "data"), "-U", USER,
                             "--pwfile", str(pwfile), "--auth", "scram-sha-256",
                             "--encoding", "UTF8", "--locale", "C.UTF-8"])
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed: {e.stderr}") from None
        finally:
            pwfile.unlink()
        self.data = server_dir / "data"
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                f" -c unix_socket_directories={self.sockets} -c max_connections=200"
                f" -c shared_buffers={self.shared_buffers}")
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._as_server([find_bin("pg_ctl"), "-D", str(self.data), "-l",
                             str(server_dir / "server.log"), "-o", opts, "-w", "-t", "60",
                             "start"])
        except subprocess.CalledProcessError as e:
            log = (server_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {e.stderr}\n{log}") from None
        for path, text in ((self.password_file, self.password),
                           (self.pgpass, f"127.0.0.1:{self.port}:*:{USER}:{self.password}")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        if name is None:
            self._serial += 1
            name = f"t{os.getpid()}_{self._serial}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._as_server([find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                 "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)
