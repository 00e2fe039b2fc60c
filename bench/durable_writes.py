"""What a durable commit costs the registry's API writes on SQLite.

Creates and revokes peers through the store (the part of an API write that
touches the disk) with `PRAGMA synchronous` NORMAL and FULL, and prints the
latency per write and the time of one bulk import. Under NORMAL a power cut
can lose the last commits (and reuse their feed cursors); FULL syncs the WAL
at every commit.

    .venv/bin/python bench/durable_writes.py [--peers 300] [--dir DIR] [--json PATH]

`--dir` picks the filesystem (the default is a temporary directory: on tmpfs
an fsync is free and both settings look alike).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.keys import generate_keypair  # noqa: E402
from appliance.registry import cidr  # noqa: E402
from appliance.registry.store import NewPeer  # noqa: E402
from appliance.registry.store.sqlite import SqliteStore  # noqa: E402
from bench.common import RunInfo, percentile, run_main, say, table, write_json  # noqa: E402


def measure(path: Path, sync: str, peers: int, bulk: int) -> dict[str, float]:
    store = SqliteStore(str(path))
    store.migrate()
    store.conn().execute(f"PRAGMA synchronous = {sync}")
    store.create_tenant("bench")
    keys = [generate_keypair()[1] for _ in range(peers)]
    creates, revokes = [], []
    for n, key in enumerate(keys):
        net = cidr.parse(f"198.18.{n // 250}.{n % 250 + 1}/32")
        t = time.perf_counter()
        store.create_peer("bench", key, [net], None, None)
        creates.append(time.perf_counter() - t)
    for key in keys:
        t = time.perf_counter()
        store.set_revoked(key, True)
        revokes.append(time.perf_counter() - t)
    store.create_tenant("bulk")
    t = time.perf_counter()
    store.bulk_create_peers("bulk", (NewPeer(generate_keypair()[1], [cidr.parse(
        f"fd00:{n >> 16:x}:{n & 0xffff:x}::/128")]) for n in range(bulk)))
    bulk_s = time.perf_counter() - t
    store.close()
    return {"create_p50": percentile(creates, 50), "create_p99": percentile(creates, 99),
            "revoke_p50": percentile(revokes, 50), "revoke_p99": percentile(revokes, 99),
            "bulk_s": bulk_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=300)
    ap.add_argument("--bulk", type=int, default=100_000, help="peers in one bulk import")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = RunInfo()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for sync in ("NORMAL", "FULL"):
            say(f"synchronous={sync}: {args.peers} creates, then as many revokes")
            results[sync] = measure(Path(tmp) / f"{sync}.db", sync, args.peers, args.bulk)
    info.finish()
    print(table(["synchronous", "create p50 ms", "create p99 ms", "revoke p50 ms",
                 "revoke p99 ms", f"bulk {args.bulk} s"],
                [[sync, *(f"{r[k] * 1000:.2f}" for k in list(r)[:4]), f"{r['bulk_s']:.1f}"]
                 for sync, r in results.items()]))
    print(info.describe())
    write_json(args.json, "durable_writes", info, {"peers": args.peers, "bulk": args.bulk},
               results)
    return 0


if __name__ == "__main__":
    run_main(main)
