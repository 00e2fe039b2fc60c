"""The Grafana dashboard and the alert rules in monitoring/ query only what the
services export, and the rules pass Debian's promtool (`./run setup` puts it in
the venv, taken from Debian's prometheus package without installing the server)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from appliance.gateway.metrics import GatewayMetrics
from appliance.registry import create_app
from appliance.registry.store import open_store

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "alerts.yml"

# Labels Prometheus adds to every scraped series, plus histogram buckets.
TARGET_LABELS = {"instance", "job"}
ALWAYS = TARGET_LABELS | {"le"}

METRIC = re.compile(r"\bwgjit_[a-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
TEMPLATE = re.compile(r"\{\{\s*\$?(?:labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def _series_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


def _gateway_exports() -> dict[str, set[str]]:
    metrics = GatewayMetrics()
    out: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for name in _series_names(metric._name, metric._type):
                out[name] = set(metric._labelnames)
    return out


def _registry_exports(tmp_path: Path) -> dict[str, set[str]]:
    db = str(tmp_path / "registry.db")
    store = open_store(db)
    store.migrate()
    store.close()
    client = create_app({"DATABASE": db}).test_client()
    client.get("/metrics")  # so the request counters have a labelled sample
    text = client.get("/metrics").get_data(as_text=True)
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            family = name.removesuffix("_total") if kind == "counter" else name
            for series in _series_names(family, kind):
                out.setdefault(series, set())
        elif line.startswith("wgjit_"):
            name, _, rest = line.partition("{")
            labels = {pair.split("=")[0] for pair in re.findall(r'\w+="[^"]*"', rest)}
            out.setdefault(name.split()[0], set()).update(labels)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    return _gateway_exports() | _registry_exports(tmp_path_factory.mktemp("reg"))


def _dashboard_queries() -> list[tuple[str, list[str]]]:
    """(expr, legend formats) of every panel target and templating query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((target["expr"], [target.get("legendFormat", "")]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((var["query"]["query"], []))
    return out


def _rule_queries() -> list[tuple[str, list[str]]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(rule["expr"], list(rule.get("annotations", {}).values()))
            for group in rules["groups"] for rule in group["rules"]]


def _check(expr: str, texts: list[str], exported: dict[str, set[str]]) -> list[str]:
    problems = []
    names = set(METRIC.findall(expr))
    if not names:
        problems.append(f"queries no wgjit metric: {expr!r}")
    available = set(ALWAYS)
    for name in names:
        if name not in exported:
            problems.append(f"{name} is not exported by the gateway or the registry")
        else:
            available |= exported[name]
    used = {m for g in GROUPING.findall(expr) for m in re.split(r"\s*,\s*", g.strip()) if m}
    used |= set(MATCHER.findall(expr))
    for text in texts:
        used |= {m for m in TEMPLATE.findall(text) if m != "value"}
    for label in sorted(used - available):
        problems.append(f"label {label!r} belongs to none of {sorted(names)} in {expr!r}")
    return problems


def test_dashboard_queries_only_exported_metrics(exported) -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 10
    problems = [p for expr, texts in queries for p in _check(expr, texts, exported)]
    assert problems == []


def test_alert_rules_query_only_exported_metrics(exported) -> None:
    queries = _rule_queries()
    assert len(queries) >= 8
    problems = [p for expr, texts in queries for p in _check(expr, texts, exported)]
    assert problems == []


def test_the_checks_catch_a_renamed_metric_and_a_wrong_label(exported) -> None:
    assert _check("rate(wgjit_gateway_installs[5m])", [], exported)
    assert _check('sum by (tenant) (rate(wgjit_gateway_installs_total[5m]))', [], exported)
    assert _check("wgjit_gateway_installed_peers", ["{{server}}"], exported)


def test_no_metric_label_collides_with_a_target_label(exported) -> None:
    # Prometheus renames such a label to exported_<name> on scrape, so
    # dashboards and alerts that group by it silently see the target's value.
    clashes = {name: labels & TARGET_LABELS for name, labels in exported.items()
               if labels & TARGET_LABELS}
    assert clashes == {}


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {t["refId"] for t in panel["targets"]} == \
            {chr(65 + i) for i in range(len(panel["targets"]))}, panel["title"]


def _promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    assert Path(found).exists(), "promtool missing: `sudo ./run setup` installs it into .venv/bin"
    return found


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_fire_on_the_series_they_are_written_for() -> None:
    result = subprocess.run([_promtool(), "test", "rules", "alerts.test.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
