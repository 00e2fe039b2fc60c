"""Registry benchmark: seed N peers, then gateway lookups through gunicorn.

    .venv/bin/python bench/registry.py [--peers 1000000] [--json out.json]

Prints seeding time and database size, then the lookup throughput at full
load and the latency at half that load (open loop, so a slow server cannot
slow the clock down and hide its own latency).
"""

from __future__ import annotations

import argparse
import http.client
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
from appliance.registry.store.sqlite import SqliteStore  # noqa: E402
from tests.conftest import WGJIT, RegistryProcess  # noqa: E402

TENANTS = 8
TUNNEL4 = int.from_bytes(socket.inet_aton("198.18.0.0"), "big")  # 198.18.0.0/15


def write_import(path: Path, keys: list[str], tenant_no: int) -> None:
    """One tenant's peers as `wgjit registry import` reads them. Tenants keep
    their own address plans, so every tenant draws from 198.18.0.0/15 again
    (131,072 addresses: enough for 8 tenants of 125,000)."""
    with open(path, "w") as f:
        for i, key in enumerate(keys):
            v4 = socket.inet_ntoa((TUNNEL4 + i).to_bytes(4, "big"))
            f.write(f'{{"public_key": "{key}", "allowed_ips":'
                    f' ["{v4}/32", "fd00::{tenant_no:x}:{i >> 16:x}:{i & 0xffff:x}/128"]}}\n')


def seed(path: Path, n: int) -> tuple[float, list[str]]:
    """Seeding time is the wall time of the import commands, startup included."""
    store = SqliteStore(str(path))
    store.migrate()
    per = -(-n // TENANTS)
    keys = [encode_key(os.urandom(32)) for _ in range(n)]
    files = []
    for t in range(TENANTS):
        store.create_tenant(f"bench-{t}")
        files.append(path.with_name(f"bench-{t}.jsonl"))
        write_import(files[-1], keys[t * per:(t + 1) * per], t)
    store.close()
    started = time.perf_counter()
    for t, src in enumerate(files):
        subprocess.run([*WGJIT, "registry", "import", "--db", str(path), "--tenant",
                        f"bench-{t}", str(src)], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    for src in files:
        src.unlink()
    store = SqliteStore(str(path))
    store.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return elapsed, keys


def _worker(port: int, token: str, keys: list[str], duration: float, rate: float | None,
            out: mp.Queue) -> None:
    """One client process: keep-alive connection, sequential requests.

    With `rate` it sends on a fixed schedule (open loop) and measures latency
    from the scheduled send time.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(os.getpid())
    lat: list[float] = []
    errors = 0
    start = time.perf_counter()
    interval = 1 / rate if rate else 0
    i = 0
    while True:
        now = time.perf_counter()
        if now - start >= duration:
            break
        scheduled = start + i * interval if rate else now
        if rate and scheduled > now:
            time.sleep(scheduled - now)
        key = urllib.parse.quote(rng.choice(keys), safe="")
        try:
            conn.request("GET", f"/v1/gateway/peers/{key}", headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        lat.append(time.perf_counter() - scheduled)
        i += 1
    out.put((lat, errors))


def load(port: int, token: str, keys: list[str], clients: int, duration: float,
         total_rate: float | None = None) -> dict:
    q: mp.Queue = mp.Queue()
    sample = random.sample(keys, min(len(keys), 20_000))
    per_rate = total_rate / clients if total_rate else None
    procs = [mp.Process(target=_worker, args=(port, token, sample, duration, per_rate, q))
             for _ in range(clients)]
    for p in procs:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in procs:
        part, err = q.get()
        lat += part
        errors += err
    for p in procs:
        p.join()
    lat.sort()
    return {
        "requests": len(lat),
        "errors": errors,
        "rate": len(lat) / duration,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


WRK_SCRIPT = """
local keys = {%s}
request = function()
  local k = keys[math.random(#keys)]
  return wrk.format("GET", "/v1/gateway/peers/" .. k, {["Authorization"] = "Bearer %s"})
end
"""


def _wrk_ms(text: str) -> float:
    value, unit = float(text[:-2] if text.endswith(("us", "ms")) else text[:-1]), text[-2:]
    return value / 1000 if unit == "us" else value * 1000 if not unit.endswith("ms") else value


def load_wrk(port: int, token: str, keys: list[str], connections: int,
             duration: float, rate: float | None = None) -> dict | None:
    """Throughput and latency with wrk (C, two threads): a Python load generator
    on the same two cores would measure itself as much as the server. With
    `rate`, each connection pauses between requests so that all of them together
    offer about that rate (wrk has no fixed-rate mode; the pause is not counted
    in the latency)."""
    if not shutil.which("wrk"):
        return None
    sample = random.sample(keys, min(len(keys), 20_000))
    quoted = ",".join('"{}"'.format(urllib.parse.quote(k, safe="")) for k in sample)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (quoted, token))
        if rate:
            f.write(f"delay = function() return {1000 * connections / rate:.3f} end\n")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wgjit-bench-") as tmp:
        path = Path(tmp) / "registry.db"
        print(f"seeding {args.peers:,} peers ...", flush=True)
        seed_s, keys = seed(path, args.peers)
        size = sum(f.stat().st_size for f in Path(tmp).glob("registry.db*"))
        store = SqliteStore(str(path))
        token = tokens.create(store, "gateway")
        store.close()
        srv = RegistryProcess(path, workers=args.workers).start()
        try:
            load(srv.port, token, keys, 2, 2.0)  # warm the page cache and the workers
            full = load_wrk(srv.port, token, keys, args.clients, args.duration) or \
                load(srv.port, token, keys, args.clients, args.duration)
            half = load_wrk(srv.port, token, keys, args.clients, args.duration,
                            full["rate"] / 2) if full.get("tool") == "wrk" else \
                load(srv.port, token, keys, args.clients, args.duration, full["rate"] / 2)
        finally:
            srv.stop()
    result = {
        "peers": args.peers, "seed_seconds": seed_s, "seed_rate": args.peers / seed_s,
        "db_bytes": size, "workers": args.workers, "clients": args.clients,
        "full_load": full, "half_load": half,
    }
    rows = [
        ("peers seeded", f"{args.peers:,}"),
        ("seeding time", f"{seed_s:.1f} s ({args.peers / seed_s:,.0f} peers/s)"),
        ("database size", f"{size / 2**20:,.0f} MiB"),
        (f"lookups, full load ({args.clients} conns, {full.get('tool', 'python')})",
         f"{full['rate']:,.0f}/s  p50 {full['p50_ms']:.2f} ms  p99 {full['p99_ms']:.2f} ms"
         f"  errors {full['errors']}"),
        (f"lookups, half load ({half['rate']:,.0f}/s)",
         f"p50 {half['p50_ms']:.2f} ms  p99 {half['p99_ms']:.2f} ms  errors {half['errors']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nregistry benchmark (gunicorn {args.workers} workers x 4 threads, loopback)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
