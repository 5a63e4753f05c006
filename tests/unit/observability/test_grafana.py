"""The Grafana dashboard, the Prometheus configuration and the alerting rules (grafana/).

Grafana itself does not run here (Debian does not package it): the dashboard's structure
is checked against what Grafana's import needs, and every PromQL expression — the
dashboard's and the rules' — is parsed by promtool and may name only metrics that
shardlog exports (read from the collector itself).  The rules are unit-tested with
promtool, with series that fire and do not fire each alert.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from shardlog.observability.metrics import FrontCollector, FrontStats

from ...conftest import PROJECT
from ...prometheus import promtool

GRAFANA = PROJECT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "shardlog.json"
RULES = GRAFANA / "prometheus" / "shardlog-rules.yml"
RULE_TESTS = GRAFANA / "prometheus" / "shardlog-rules.test.yml"
# Not shardlog's: Prometheus's own per-target series, for "the server is down".
PROMETHEUS_SERIES = {"up"}
# Grafana's variables, replaced by what Grafana would put there.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$uuid": ".*"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> list[str]:
    exprs = [target["expr"] for panel in dashboard()["panels"]
             for target in panel.get("targets", ())]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, label)
            match = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match.group(1))
    return exprs


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def with_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable nobody replaces: {expr}"
    return expr


def exported_series() -> set[str]:
    """Every series name shardlog's collector can export (from its TYPE lines: families
    without samples yet included)."""
    registry = CollectorRegistry()
    registry.register(FrontCollector(FrontStats(), lambda: {}))
    names = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            # A counter's TYPE line names it with its _total already.
            suffixes = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count"),
                        "gauge": ("",)}[kind]
            names |= {name + suffix for suffix in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names in matchers or grouping clauses, nor inside strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


# -- the dashboard -----------------------------------------------------------------------------


def test_the_dashboard_has_what_grafana_import_needs():
    board = dashboard()
    assert board["schemaVersion"] >= 39  # Grafana 11
    assert board["uid"] and board["title"] and board["id"] is None
    datasource = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["query"] == "prometheus"
    name = datasource[0]["name"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{name}}}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            if re.search(r"\b(rate|increase)\(", target["expr"]):
                assert "[$__rate_interval]" in target["expr"], target["expr"]


def test_the_dashboard_has_a_row_for_each_concern_and_no_panels_overlap():
    board = dashboard()
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == ["Requests", "Flush", "Sync progress", "Workers", "Drops and errors"]
    cells = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    titles = " / ".join(panel["title"] for panel in board["panels"])
    for wanted in ("Requests per second by type", "Latency p99 by type",
                   "FLUSH latency", "Sync progress per mirror", "Workers up",
                   "Worker restarts", "Dropped datagrams by reason"):
        assert wanted in titles


def test_every_expression_parses(tmp_path):
    exprs = [with_variables(expr) for expr in dashboard_expressions() + rule_expressions()]
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"shardlog_check:expr_{n}", "expr": expr} for n, expr in enumerate(exprs)]}]}
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_a_broken_expression_would_be_caught(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (type (rate(shardlog_requests_total[1m]))"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_every_expression_names_only_metrics_shardlog_exports():
    exported = exported_series() | PROMETHEUS_SERIES
    assert "shardlog_requests_total" in exported
    assert "shardlog_flush_commit_seconds_bucket" in exported
    used = set()
    for expr in dashboard_expressions() + rule_expressions():
        names = metric_names(with_variables(expr))
        assert names, f"no metric in {expr}"
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    # The checker itself: it finds names and ignores functions, labels and keywords.
    assert metric_names('sum by (type) (rate(foo_total{type="x"}[1m])) / on (a) bar') == {
        "foo_total", "bar"}
    assert {"shardlog_request_duration_seconds_bucket", "shardlog_log_regions_in_sync",
            "shardlog_worker_restarts_total", "up"} <= used


# -- Prometheus ------------------------------------------------------------------------------


def test_the_rules_and_the_example_configuration_pass_promtool():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "config", str(GRAFANA / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    assert alerts == {"ShardlogDown", "ShardlogMirrorNotInSync", "ShardlogFlushLatencyHigh",
                      "ShardlogWorkerRestarted", "ShardlogDatagramsDropped"}


def test_every_alert_fires_and_stays_quiet_in_the_rule_tests(tmp_path):
    tests = yaml.safe_load(RULE_TESTS.read_text())
    firing, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    assert firing == alerts
    # Each test case also has series that must not fire (another instance, or later).
    assert quiet >= {"ShardlogDown", "ShardlogMirrorNotInSync", "ShardlogFlushLatencyHigh",
                     "ShardlogWorkerRestarted"}
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # And the tests bite: a rule that can never fire fails them.
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("> 0.05", "> 50"))
    result = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0
    assert "ShardlogFlushLatencyHigh" in result.stdout + result.stderr


# -- Grafana provisioning --------------------------------------------------------------------


def test_the_provisioning_files_point_at_prometheus_and_the_dashboard():
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "shardlog-prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "shardlog.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize("expr", ["up", 'rate(shardlog_enobufs_total[5m]) > 0'])
def test_metric_names_of_simple_expressions(expr):
    assert metric_names(expr) == {expr.split("(")[-1].split("[")[0].split()[0]}
