"""Where the time of GET /v1/gateway/keys goes, at --peers active keys (SQLite).

    .venv/bin/python bench/keysnapshot.py [--peers 1000000] [--json PATH]

Seeds a fresh SQLite registry with `wgjit registry import` (bench/registry.py's
seeding, 8 tenants), then times, in this process and without TLS or gunicorn:
  read keys       store.active_keys (the SQL and the Python strings)
  old salting     base64 decode + keyed BLAKE2s per key + sorted set (the
                  handler before the snapshot cache)
  cache fill      keysnapshot.raw_keys on a cold cache: the feed position,
                  active_keys and the raw keys joined
  cache hit       the same, warm: the feed position only
  new salting     keysnapshot.salted_digests
  request cold    the whole route through Flask's test client, cold cache
  request warm    the same again, another salt (another gateway)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.registry import create_app  # noqa: E402
from appliance.registry.gateway import KEY_DIGEST_SIZE, SNAPSHOTS, key_digest  # noqa: E402
from appliance.registry.keysnapshot import KeySnapshots, salted_digests  # noqa: E402
from appliance.registry.store.sqlite import SqliteStore  # noqa: E402
from bench.common import RunInfo, run_main, say, table, write_json  # noqa: E402
from bench.registry import seed, write_imports  # noqa: E402


def timed(f):
    started = time.perf_counter()
    out = f()
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    info = RunInfo()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "registry.db")
        say(f"  seeding {args.peers} peers")
        _, files = write_imports(Path(tmp), args.peers)
        seeded, token = seed(db, files)
        say(f"  seeded in {seeded:.1f} s")
        st = SqliteStore(db)
        salt = os.urandom(16)
        rows = []
        t, (_, keys) = timed(lambda: st.active_keys(None))
        rows.append(("read keys", t))
        t, old = timed(lambda: b"".join(sorted(
            {key_digest(salt, base64.b64decode(k)) for k in keys})))
        rows.append(("old salting", t))
        snaps = KeySnapshots()
        t, (_, raw) = timed(lambda: snaps.raw_keys(st, None))
        rows.append(("cache fill", t))
        t, _ = timed(lambda: snaps.raw_keys(st, None))
        rows.append(("cache hit", t))
        t, new = timed(lambda: salted_digests(salt, raw, KEY_DIGEST_SIZE))
        rows.append(("new salting", t))
        assert new == old, "the new salting differs from key_digest"
        st.close()

        app = create_app({"DATABASE": db})
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        for label in ("request cold", "request warm"):
            salt_hex = os.urandom(16).hex()
            t, r = timed(lambda s=salt_hex: client.get(
                "/v1/gateway/keys", query_string={"salt": s}, headers=headers))
            assert r.status_code == 200, r.json
            rows.append((label, t))
        body = r.get_data()
        SNAPSHOTS.__init__()  # drop the cached keys before the directory goes
    info.finish()
    print(f"GET /v1/gateway/keys at {args.peers:,} active keys (SQLite), seconds")
    print(table(["step", "s"], [(k, f"{v:.3f}") for k, v in rows]))
    print(f"response {len(body) / 1e6:.1f} MB, sha256 {hashlib.sha256(body).hexdigest()[:12]}")
    print(info.describe())
    write_json(args.json, "keysnapshot", info, vars(args),
               [{"step": k, "seconds": v} for k, v in rows])
    return 0


if __name__ == "__main__":
    run_main(main)
