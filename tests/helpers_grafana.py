"""Read deploy/grafana/raytimm-serve.json: its panels, its PromQL, and the metric names it needs.

The metrics test that scrapes a real Serve app uses ``metric_names()`` (the list in
deploy/grafana/metric_names.txt) and ``dashboard_metric_names()`` to assert that every series
the dashboard reads is exported.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import promql_parser

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "raytimm-serve.json"
METRIC_NAMES = ROOT / "deploy" / "grafana" / "metric_names.txt"

# Values Grafana substitutes before a query reaches Prometheus; any duration or label value parses.
_GRAFANA_DURATIONS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_GRAFANA_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<query>.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


def load_dashboard(path: Path = DASHBOARD) -> dict:
    """The dashboard JSON."""
    return json.loads(path.read_text(encoding="utf-8"))


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def interpolate(expr: str) -> str:
    """``expr`` as Prometheus receives it, with Grafana's variables replaced by sample values."""
    expr = _GRAFANA_DURATIONS.sub("5m", expr)
    return _GRAFANA_VARIABLE.sub("x", expr)


def parse_promql(expr: str):
    """The PromQL syntax tree of a dashboard expression; ValueError when it does not parse."""
    return promql_parser.parse(interpolate(expr))


def promql_metric_names(expr: str) -> set[str]:
    """Names of every series selector in a PromQL expression (Grafana variables allowed)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise ValueError(f"selector {node} has no metric name; name it so the name check sees it: {expr}")
            names.add(node.name)

    promql_parser.walk(parse_promql(expr), visit)
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL query: panel targets and query variables (label_values(<query>, label))."""
    queries = [t["expr"] for p in iter_panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        queries.append(match["query"] if match else query)
    return queries


def dashboard_metric_names(dashboard: dict | None = None) -> set[str]:
    """Every metric name the dashboard's queries select."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    return set().union(*(promql_metric_names(q) for q in dashboard_queries(dashboard)))


def metric_names(path: Path = METRIC_NAMES) -> set[str]:
    """The names in deploy/grafana/metric_names.txt (one per line, # comments)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line}
