"""bench/plot_connect.py reads the committed connect results as the README states them."""

from __future__ import annotations

import json
from pathlib import Path

from bench.plot_connect import MODES, series

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "connect.json"


def test_series_per_mode_matches_the_summary():
    doc = json.loads(RESULTS.read_text())
    data = series(doc)
    assert set(data) == set(MODES)
    rtts = sorted(float(r) for r in doc["params"]["rtt"])
    for mode, points in data.items():
        assert [r for r, _, _ in points] == rtts
        for rtt, p50, p90 in points:
            assert p50 <= p90
            assert abs(p50 - doc["results"]["summary"][str(int(rtt))]["p50_ms"][mode]) < 1e-6
