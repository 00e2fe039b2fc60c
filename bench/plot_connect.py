"""Plot bench/connect.py's JSON: first-reply time against round-trip time, per mode.

    .venv/bin/python bench/plot_connect.py [bench/results/connect.json] [--out docs/connect.png]

Points are p50 over the run's clients, bars reach p90; the dotted lines are what
the message count predicts, 2 RTT (pre-provisioned, re-injection) and 3 RTT (role
inversion). Plotting only: the numbers come from the JSON, unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("pre-provisioned", "re-injection", "role inversion")


def series(doc: dict) -> dict[str, list[tuple[float, float, float]]]:
    """mode -> [(rtt_ms, p50_ms, p90_ms)], from the JSON's per-gateway results."""
    out: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    for rtt, gateways in doc["results"]["rtts"].items():
        for g in gateways.values():
            echo = g["from_echo"]
            out[g["mode"]].append((float(rtt), echo["p50"] * 1000, echo["p90"] * 1000))
    return {m: sorted(points) for m, points in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default="bench/results/connect.json")
    ap.add_argument("--out", default="docs/connect.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(json.loads(Path(args.json).read_text()))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for mode, marker in zip(MODES, "os^", strict=True):
        rtt, p50, p90 = zip(*data[mode], strict=True)
        ax.errorbar(rtt, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90,
                                                                            strict=True)]],
                    marker=marker, capsize=3, label=mode)
    top = max(r for points in data.values() for r, _, _ in points)
    ax.plot([0, top], [0, 2 * top], ":", color="grey", label="2 RTT")
    ax.plot([0, top], [0, 3 * top], "--", color="grey", linewidth=0.8, label="3 RTT")
    ax.set_xlabel("emulated round-trip time, ms")
    ax.set_ylabel("ping start to first reply, ms (p50, bar to p90)")
    ax.set_title("Just-in-time connect: re-injection costs what pre-provisioning does")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
