"""The Grafana dashboard asks only for series and labels the daemon exports: a rename fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import metrics
from daemon.health import Health

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "gemini-batchd.json"

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
METRIC = re.compile(r"\b(gemini_batchd_\w*)\s*(\{[^}]*\})?")
MATCHERS = re.compile(r"\{[^}]*\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
COUNTER_CALL = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*$")
INSTANCE_FILTER = 'instance=~"$instance"'

CHECKED_LABELS = frozenset({"state", "stage", "kind", "call", "outcome"})
SCRAPE_LABELS = frozenset({"instance", "job"})  # added by Prometheus when it scrapes node_exporter
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "5m", "__range": "1h"}
"""Grafana's built-in variables used in queries, with a value for promtool to parse."""


def _view() -> metrics.View:
    return metrics.View([], metrics.Finished(), Health(lambda: 0.0), metrics.Counters(), 0, 0, 0)


def _exported_labels() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> values, as Prometheus reads the daemon's file."""
    exported: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics.render(_view())):
        for sample in family.samples:
            labels = exported.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return exported


def _walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))  # a row's own panels (collapsed rows)


FAMILIES = {family.name: family for family in metrics.families(_view())}
EXPORTED = _exported_labels()
DASH: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
PANELS = [panel for panel in _walk(DASH["panels"]) if panel["type"] != "row"]
ROWS = [panel for panel in _walk(DASH["panels"]) if panel["type"] == "row"]
TARGETS = [(panel["title"], target) for panel in PANELS for target in panel.get("targets", [])]


def _datasource() -> dict[str, str]:
    """The reference every query must use: the dashboard's datasource input, `${DS_...}`."""
    inputs = [i for i in DASH["__inputs"] if i["type"] == "datasource"]
    assert [i["pluginId"] for i in inputs] == ["prometheus"]
    return {"type": "prometheus", "uid": f"${{{inputs[0]['name']}}}"}


def _variable(name: str) -> dict[str, Any]:
    found = [v for v in DASH["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, f"no dashboard variable {name!r}"
    return found[0]


def _code(expr: str) -> str:
    """`expr` with the insides of its string literals blanked, same length: names only."""
    return STRING.sub(lambda m: m[0][0] + " " * (len(m[0]) - 2) + m[0][-1], expr)


def _title(panel: dict[str, Any]) -> str:
    return str(panel.get("title") or panel.get("id"))


def test_the_names_checked_are_the_names_prometheus_reads() -> None:
    assert set(EXPORTED) == set(FAMILIES)  # a counter's family name already ends in _total
    for family in FAMILIES.values():
        assert family.name.endswith("_total") == (family.kind == "counter"), family.name


def test_dashboard_imports_with_a_datasource_input_and_an_instance_variable() -> None:
    assert DASH["schemaVersion"] >= 39 and DASH["title"] and DASH["uid"]
    assert DASH.get("id") is None  # Grafana gives an imported dashboard its own
    instance = _variable("instance")
    assert (instance["type"], instance["datasource"]) == ("query", _datasource())
    assert instance["definition"] == "label_values(gemini_batchd_info, instance)"
    assert instance["query"]["query"] == instance["definition"]
    assert "gemini_batchd_info" in EXPORTED
    assert instance["multi"] and instance["includeAll"]
    ids = [panel["id"] for panel in [*PANELS, *ROWS]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    required = {r["id"] for r in DASH["__requires"] if r["type"] == "panel"}
    assert {panel["type"] for panel in PANELS} <= required
    assert all(row["title"] for row in ROWS)


@pytest.mark.parametrize("panel", PANELS, ids=_title)
def test_panel_says_what_it_shows_and_what_to_do(panel: dict[str, Any]) -> None:
    assert panel.get("title", "").strip()
    assert len(panel.get("description", "").strip()) >= 40, "describe what to do when it looks bad"
    place = panel["gridPos"]
    assert place["w"] >= 1 and place["h"] >= 1 and place["x"] + place["w"] <= 24


@pytest.mark.parametrize("panel", PANELS, ids=_title)
def test_panel_queries_the_dashboard_datasource(panel: dict[str, Any]) -> None:
    assert panel["targets"], "a panel with no query"
    assert panel["datasource"] == _datasource()
    for target in panel["targets"]:
        assert target["datasource"] == _datasource(), target["refId"]


@pytest.mark.parametrize("panel", PANELS, ids=_title)
def test_panel_queries_only_what_the_daemon_exports(panel: dict[str, Any]) -> None:
    variables = {v["name"] for v in DASH["templating"]["list"]} | set(GRAFANA_VARIABLES)
    for target in panel["targets"]:
        expr, code = target["expr"], _code(target["expr"])
        assert "$instance" in expr, expr
        assert {m[1] for m in VARIABLE.finditer(expr)} <= variables, expr
        for block in MATCHERS.finditer(code):  # every selector, the node_exporter one too
            assert INSTANCE_FILTER in expr[block.start() : block.end()], expr
        carried = set(SCRAPE_LABELS)
        names = list(METRIC.finditer(code))
        for found in names:
            name = found[1]
            assert name in EXPORTED, f"{name} is not exported: {expr}"
            assert found[2], f"{name} without a selector: {expr}"
            carried |= EXPORTED[name].keys()
            is_counter = FAMILIES[name].kind == "counter"
            in_rate = COUNTER_CALL.search(code[: found.start()]) is not None
            assert is_counter == in_rate, f"{name}: counters only (and always) in rate/increase"
            selector = expr[found.start(2) : found.end(2)]
            for label, op, value in MATCHER.findall(selector):
                if label not in CHECKED_LABELS:
                    continue
                literal = op in ("=", "!=") or re.fullmatch(r"[\w|]+", value)
                assert literal, f"{label}{op}{value!r}: use literal values"
                known = EXPORTED[name].get(label, set())
                assert set(value.split("|")) <= known, f"{name}{{{label}{op}{value!r}}}: {known}"
        for group in GROUPING.findall(code):
            grouped = {label.strip() for label in group.split(",") if label.strip()}
            assert grouped <= carried, f"grouping by a label no series has: {expr}"
        assert set(LEGEND_LABEL.findall(target.get("legendFormat", ""))) <= carried, expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    values = {**GRAFANA_VARIABLES, "instance": ".*"}
    rules = [
        {"record": f"dashboard:query_{n}", "expr": VARIABLE.sub(lambda m: values[m[1]], t["expr"])}
        for n, (_, t) in enumerate(TARGETS)
    ]
    path = tmp_path / "rules.yaml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
