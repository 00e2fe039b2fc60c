"""Registry benchmark: the same N peers on SQLite and PostgreSQL, then gateway
lookups through gunicorn on each.

    .venv/bin/python bench/registry.py [--peers 1000000] [--engines sqlite,postgresql]
                                       [--json out.json]

Seeding is `wgjit registry import` (executemany on SQLite, COPY on PostgreSQL,
on a private PostgreSQL server this script starts, fsync on). Lookups draw
keys uniformly from every registered peer. Full load: wrk (C) with as many
connections as --clients, falling back to Python clients without it. Half
load: Python clients sending on a fixed schedule at half the full-load rate
(open loop): latency counts from each request's scheduled send time, and
every scheduled request is sent, so a slow server cannot slow the clock down
and hide its own latency.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.keys import encode_key  # noqa: E402
from appliance.registry import tokens  # noqa: E402
from appliance.registry.store import open_store  # noqa: E402
from appliance.registry.store.sqlite import SqliteStore  # noqa: E402
from lab.postgres import PostgresServer  # noqa: E402
from tests.conftest import WGJIT, RegistryProcess  # noqa: E402

TENANTS = 8
TUNNEL4 = int.from_bytes(socket.inet_aton("198.18.0.0"), "big")  # 198.18.0.0/15
TUNNEL4_SIZE = 1 << 17


def peer_networks(n: int, tenant_no: int, i: int) -> list[str]:
    """Two networks for the n-th peer overall, the i-th of its tenant: an IPv4
    /32 while 198.18.0.0/15 lasts (131,072 peers) and an IPv6 /128, then two
    IPv6 /128s. Unique across tenants, so the plan holds whether overlaps are
    checked per tenant or fleet-wide; each tenant's networks come in address
    order, as an allocator hands them out."""
    def v6(j: int) -> str:
        return f"fd00::{tenant_no:x}:{j >> 32:x}:{j >> 16 & 0xffff:x}:{j & 0xffff:x}/128"
    if n < TUNNEL4_SIZE:
        return [socket.inet_ntoa((TUNNEL4 + n).to_bytes(4, "big")) + "/32", v6(2 * i)]
    return [v6(2 * i), v6(2 * i + 1)]


def write_import(path: Path, keys: list[str], tenant_no: int, first: int) -> None:
    """One tenant's peers as `wgjit registry import` reads them; `first` is the
    overall number of its first peer."""
    with open(path, "w") as f:
        for i, key in enumerate(keys):
            f.write(json.dumps({"public_key": key,
                                "allowed_ips": peer_networks(first + i, tenant_no, i)}) + "\n")


def write_imports(tmp: Path, n: int) -> tuple[list[str], list[Path]]:
    per = -(-n // TENANTS)
    keys = [encode_key(os.urandom(32)) for _ in range(n)]
    files = []
    for t in range(TENANTS):
        files.append(tmp / f"bench-{t}.jsonl")
        write_import(files[-1], keys[t * per:(t + 1) * per], t, t * per)
    return keys, files


def seed(db: str, files: list[Path]) -> tuple[float, str]:
    """Seeding time is the wall time of the import commands, startup included.
    Returns it and a gateway token."""
    store = open_store(db)
    store.migrate()
    for t in range(len(files)):
        store.create_tenant(f"bench-{t}")
    token = tokens.create(store, "gateway")
    store.close()
    started = time.perf_counter()
    for t, src in enumerate(files):
        subprocess.run([*WGJIT, "registry", "import", "--db", db, "--tenant", f"bench-{t}",
                        str(src)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, token


def db_bytes(db: str) -> int:
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:
            return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    store = SqliteStore(db)
    store.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return sum(f.stat().st_size for f in Path(db).parent.glob(Path(db).name + "*"))


class _Conn:
    """A keep-alive HTTP/1.1 connection that sends prepared request bytes and
    reads one response by its Content-Length. http.client spent most of a
    loaded core here: the Python clients topped out near 1,100 requests/s
    whatever the server, so an open-loop run measured its own backlog."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def request(self, data: bytes) -> int:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        self.sock.sendall(data)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head = self.buf[:end].lower()
        found = re.search(rb"\r\ncontent-length: *(\d+)", head)
        if found is None:
            raise ConnectionError("a response without Content-Length")
        length = int(found.group(1))
        while len(self.buf) < end + 4 + length:
            self._more()
        self.buf = self.buf[end + 4 + length:]
        if b"\r\nconnection: close" in head:
            self.close()
        return int(head[9:12])

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def _worker(port: int, token: str, keys: list[str], duration: float, rate: float | None,
            out: mp.Queue) -> None:
    """One client process: keep-alive connection, sequential requests.

    With `rate` it sends on a fixed schedule (open loop) and measures latency
    from the scheduled send time.
    """
    conn = _Conn(port)
    prefix = b"GET /v1/gateway/peers/"
    suffix = f" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    rng = random.Random(os.getpid())
    lat: list[float] = []
    errors = 0
    start = time.perf_counter()
    interval = 1 / rate if rate else 0
    scheduled_total = int(duration * rate) if rate else None
    i = 0
    while True:
        now = time.perf_counter()
        if scheduled_total is not None:
            if i >= scheduled_total:  # every scheduled request is sent, late or not
                break
        elif now - start >= duration:
            break
        scheduled = start + i * interval if rate else now
        if rate and scheduled > now:
            time.sleep(scheduled - now)
        key = urllib.parse.quote(rng.choice(keys), safe="").encode()
        try:
            if conn.request(prefix + key + suffix) != 200:
                errors += 1
        except (OSError, ValueError):
            errors += 1
            conn.close()
        lat.append(time.perf_counter() - scheduled)
        i += 1
    conn.close()
    out.put((lat, errors, time.perf_counter() - start))


def load(port: int, token: str, keys: list[str], clients: int, duration: float,
         total_rate: float | None = None) -> dict:
    q: mp.Queue = mp.Queue()
    per_rate = total_rate / clients if total_rate else None
    procs = [mp.Process(target=_worker, args=(port, token, keys, duration, per_rate, q))
             for _ in range(clients)]
    for p in procs:
        p.start()
    lat: list[float] = []
    errors = 0
    elapsed = duration
    for _ in procs:
        part, err, took = q.get()
        lat += part
        errors += err
        elapsed = max(elapsed, took)  # late requests stretch an open-loop run
    for p in procs:
        p.join()
    lat.sort()
    return {
        "requests": len(lat),
        "errors": errors,
        "rate": len(lat) / elapsed,
        "offered_rate": total_rate,
        "tool": "python open loop" if total_rate else "python",
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


WRK_SCRIPT = """
local keys = {}
for line in io.lines("%s") do keys[#keys + 1] = line end
request = function()
  local k = keys[math.random(#keys)]
  return wrk.format("GET", "/v1/gateway/peers/" .. k, {["Authorization"] = "Bearer %s"})
end
"""


def _wrk_ms(text: str) -> float:
    value, unit = float(text[:-2] if text.endswith(("us", "ms")) else text[:-1]), text[-2:]
    return value / 1000 if unit == "us" else value * 1000 if not unit.endswith("ms") else value


def load_wrk(port: int, token: str, keys_file: Path, connections: int,
             duration: float) -> dict | None:
    """Throughput and latency with wrk (C, two threads): a Python load generator
    on the same two cores would measure itself as much as the server. Keys come
    from `keys_file` (every registered peer, percent-encoded, one a line)."""
    if not shutil.which("wrk"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (keys_file, token))
    try:
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{int(duration)}s", "--latency", "-s", f.name,
             f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rate": rate, "p50_ms": _wrk_ms(pct["50"]), "p99_ms": _wrk_ms(pct["99"]),
            "errors": int(non2xx.group(1)) if non2xx else 0, "tool": "wrk"}


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages: on a shared machine a
    figure means little without them."""
    return [round(x, 2) for x in os.getloadavg()]


def run_engine(engine: str, db: str, files: list[Path], keys: list[str], keys_file: Path,
               args: argparse.Namespace, tmp: Path) -> dict:
    print(f"{engine}: seeding {args.peers:,} peers ...", flush=True)
    seed_load = loadavg()
    seed_s, token = seed(db, files)
    seed_load += loadavg()
    size = db_bytes(db)
    srv = RegistryProcess(db, workers=args.workers, log=tmp / f"{engine}.log").start()
    try:
        load(srv.port, token, keys, 2, 2.0)  # warm the caches and the workers
        before = loadavg()
        full = load_wrk(srv.port, token, keys_file, args.clients, args.duration) or \
            load(srv.port, token, keys, args.clients, args.duration)
        full["loadavg_before_after"] = before + loadavg()
        before = loadavg()
        half = load(srv.port, token, keys, args.clients, args.duration, full["rate"] / 2)
        half["loadavg_before_after"] = before + loadavg()
    finally:
        srv.stop()
    return {"engine": engine, "peers": args.peers, "seed_seconds": seed_s,
            "seed_rate": args.peers / seed_s, "seed_loadavg_before_after": seed_load,
            "db_bytes": size, "full_load": full, "half_load": half}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1_000_000)
    ap.add_argument("--engines", default="sqlite,postgresql",
                    help="comma-separated: sqlite, postgresql")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--pg-shared-buffers", default="512MB", metavar="SIZE",
                    help="the PostgreSQL server's shared_buffers (512MB: most of the"
                    " 740 MiB a million peers take, as a registry host with 2 GB would"
                    " give it at PostgreSQL's 25%% of RAM guidance)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    engines = args.engines.split(",")
    if not set(engines) <= {"sqlite", "postgresql"}:
        ap.error("--engines: sqlite and/or postgresql")
    results = []
    with tempfile.TemporaryDirectory(prefix="wgjit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys, files = write_imports(tmp, args.peers)
        keys_file = tmp / "keys.txt"
        keys_file.write_text("".join(urllib.parse.quote(k, safe="") + "\n" for k in keys))
        for engine in engines:
            if engine == "sqlite":
                results.append(run_engine(engine, str(tmp / "registry.db"), files, keys,
                                          keys_file, args, tmp))
                continue
            pg = PostgresServer(durable=True, shared_buffers=args.pg_shared_buffers).start()
            os.environ["PGPASSFILE"] = str(pg.pgpass)  # the CLI and gunicorn inherit it
            try:
                results.append(run_engine(engine, pg.create_database("bench"), files, keys,
                                          keys_file, args, tmp))
            finally:
                pg.stop()
    print(f"\nregistry benchmark ({args.peers:,} peers, gunicorn {args.workers} workers x 4"
          f" threads, loopback, {args.clients} connections)")
    header = ["", *engines]
    table = [
        ("seeding", [f"{r['seed_seconds']:.1f} s ({r['seed_rate']:,.0f}/s)" for r in results]),
        ("database size", [f"{r['db_bytes'] / 2**20:,.0f} MiB" for r in results]),
        ("full load", [f"{r['full_load']['rate']:,.0f}/s p50 {r['full_load']['p50_ms']:.2f}"
                       f" p99 {r['full_load']['p99_ms']:.2f} ms" for r in results]),
        ("half load (open loop)",
         [f"{r['half_load']['rate']:,.0f}/s p50 {r['half_load']['p50_ms']:.2f}"
          f" p99 {r['half_load']['p99_ms']:.2f} ms" for r in results]),
        ("errors (full/half)", [f"{r['full_load']['errors']}/{r['half_load']['errors']}"
                                for r in results]),
        ("load average (1 min) seed/full/half",
         [f"{r['seed_loadavg_before_after'][3]:.1f}/{r['full_load']['loadavg_before_after'][3]:.1f}"
          f"/{r['half_load']['loadavg_before_after'][3]:.1f}" for r in results]),
    ]
    widths = [max(len(str(c)) for c in col)
              for col in zip(header, *[[k, *v] for k, v in table], strict=True)]
    for row in [header, *[[k, *v] for k, v in table]]:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"peers": args.peers, "workers": args.workers, "clients": args.clients,
             "duration": args.duration, "cpus": os.cpu_count(),
             "pg_shared_buffers": args.pg_shared_buffers, "results": results},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
