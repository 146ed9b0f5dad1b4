"""deploy/grafana/raytimm-serve.json is a Grafana dashboard whose PromQL reads exactly the metric names
in deploy/grafana/metric_names.txt, spelled as Ray exports them. No Ray needed."""
import itertools
import re

import promql_parser
import pytest

from tests.helpers_grafana import (dashboard_metric_names, dashboard_queries, iter_panels, load_dashboard,
                                   metric_names, parse_promql, promql_metric_names)

PANEL_TYPES = {"row", "timeseries", "heatmap", "stat", "gauge", "bargauge", "barchart", "table", "text"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def _nodes(tree):
    """Every node of a PromQL syntax tree, depth first."""
    out = []
    promql_parser.walk(tree, lambda node: out.append(node))
    return out


def _aggregations(expr: str) -> list[tuple[str, set[str]]]:
    """(operator, by-labels) of every aggregation in an expression."""
    return [(str(n.op), set(n.modifier.labels) if n.modifier else set())
            for n in _nodes(parse_promql(expr)) if isinstance(n, promql_parser.AggregateExpr)]


def test_is_a_grafana_dashboard(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "xywh") and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        # Every query panel reads the dashboard's Prometheus variable, never a fixed datasource.
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_panels_do_not_overlap(dashboard):
    def cells(p):
        g = p["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for a, b in itertools.combinations(iter_panels(dashboard), 2):
        assert not cells(a) & cells(b), f"panels {a['title']!r} and {b['title']!r} overlap"


def test_every_query_is_valid_promql(dashboard):
    for query in dashboard_queries(dashboard):
        parse_promql(query)  # ValueError names the problem


def test_metric_names_are_the_one_list(dashboard):
    assert dashboard_metric_names(dashboard) == metric_names()


def test_names_are_spelled_as_ray_exports_them():
    # docs/pitfalls-found.md "Serve metrics": prefix ray_, counters _total, histograms _bucket/_sum/_count.
    for name in metric_names():
        assert name.startswith(("ray_raytimm_", "ray_serve_")), name


def test_rate_is_taken_of_counters_only(dashboard):
    # rate()/increase() of a gauge is a silent mistake: only counters and histogram series qualify.
    for query in dashboard_queries(dashboard):
        for node in _nodes(parse_promql(query)):
            if isinstance(node, promql_parser.Call) and node.func.name in ("rate", "increase", "irate"):
                name = node.args[0].vector_selector.name
                assert name.endswith(("_total", "_bucket", "_sum", "_count")), f"{node.func.name}({name}) in {query}"


def test_panels_show_what_issue_10_asks_for(dashboard):
    queries = dashboard_queries(dashboard)

    def uses(name: str) -> list[str]:
        return [q for q in queries if name in promql_metric_names(q)]

    # Request rate by route and code.
    assert any(("sum", {"route", "code"}) in _aggregations(q) for q in uses("ray_raytimm_requests_total"))
    # Error ratio, 4xx and 5xx apart.
    for cls in ('"4.."', '"5.."'):
        assert any(f"code=~{cls}" in q.replace(" ", "") and "/" in q for q in uses("ray_raytimm_requests_total")), cls
    # Latency quantiles by route from the request histogram.
    latency = uses("ray_raytimm_request_seconds_bucket")
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}," in x and ("sum", {"le", "route"}) in _aggregations(x) for x in latency), q
    # Batch size distribution, load time by source, models held, confidence, top classes.
    assert uses("ray_raytimm_batch_size_bucket")
    assert any(("sum", {"le", "source"}) in _aggregations(q) for q in uses("ray_raytimm_model_load_seconds_bucket"))
    assert uses("ray_raytimm_models_held")
    assert uses("ray_raytimm_top1_confidence_bucket")
    assert any(q.startswith("topk(") and ("sum", {"model", "class"}) in _aggregations(q)
               for q in uses("ray_raytimm_predictions_total"))
    # Serve's own replica and queue gauges.
    assert uses("ray_serve_deployment_replica_healthy") and uses("ray_serve_deployment_queued_queries")


def test_name_extraction_finds_every_selector_and_refuses_unnamed_ones():
    expr = ('histogram_quantile(0.9, sum by (le, route) (rate(ray_a_bucket{application=~"$application"}[$__rate_interval])))'
            ' / on() group_left sum(ray_b) + count(ray_c_total offset 5m)')
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c_total"}
    with pytest.raises(ValueError, match="no metric name"):
        promql_metric_names('sum({__name__=~"ray_.*"})')
    with pytest.raises(ValueError):
        promql_metric_names("sum(rate(ray_a_total[5m])")
