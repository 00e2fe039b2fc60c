"""The known-key filter's memory and lookup cost at 1M and 10M registered keys.

    .venv/bin/python bench/keyfilter.py [--sizes 1000000,10000000] [--json PATH]

Per size: a snapshot as GET /v1/gateway/keys sends it (sorted 4-byte digests,
base64 in JSON; evenly spaced values stand in for the registry's digests,
which only the order and the count matter for here), loaded into KnownKeys:
the array it keeps, the peak Python allocation while loading (tracemalloc:
the base64 text, its decoding and the array), the JSON body's size, the cost
of one `knows` (keyed BLAKE2s + binary search) and the false-positive rate
measured over random keys against the rate n / 2^32 predicts.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
import time
import tracemalloc
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.gateway.keyfilter import KnownKeys  # noqa: E402
from bench.common import RunInfo, table, write_json  # noqa: E402


def snapshot(n: int) -> dict:
    step = (1 << 32) // n
    values = array("I", range(step // 2, step * n, step))
    values.byteswap()  # big-endian on the wire
    return {"digest_size": 4, "count": n, "cursor": 0, "feed_id": "bench",
            "digests": base64.b64encode(values.tobytes()).decode()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--probes", type=int, default=200_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    info = RunInfo()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        snap = snapshot(n)
        body = len(snap["digests"])
        known = KnownKeys()
        tracemalloc.start()
        known.load(snap)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del snap
        probes = [secrets.token_bytes(32) for _ in range(args.probes)]
        t0 = time.perf_counter()
        hits = sum(1 for k in probes if known.knows(k))
        per = (time.perf_counter() - t0) / len(probes)
        results.append({"keys": n, "array_bytes": known.memory_bytes(), "load_peak_bytes": peak,
                        "body_bytes": body, "lookup_us": per * 1e6,
                        "false_positives": hits / len(probes), "predicted": n / 2**32})
    info.finish()
    print(table(["keys", "filter MB", "load peak MB", "snapshot MB", "lookup us",
                 "false pos.", "n/2^32"],
                [[f"{r['keys']:,}", f"{r['array_bytes'] / 1e6:.1f}",
                  f"{r['load_peak_bytes'] / 1e6:.1f}", f"{r['body_bytes'] / 1e6:.1f}",
                  f"{r['lookup_us']:.2f}", f"{100 * r['false_positives']:.3f}%",
                  f"{100 * r['predicted']:.3f}%"] for r in results]))
    print(info.describe())
    write_json(args.json, "keyfilter", info, vars(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
