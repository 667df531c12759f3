"""deploy/grafana/: the provisioned Prometheus data source and the "liveloop" dashboard.

Offline: the dashboard JSON is well formed (unique panel ids, panels inside the 24-column grid and not
overlapping, every query on the provisioned data source), every PromQL expression names only series the
code exports (read from the Counter/Gauge/Histogram definitions in libs/ and services/) and parses in
promtool, and docker-compose.yml mounts the provisioning where Grafana reads it. promtool comes from
Debian's `prometheus` package (`make test` installs it); without it the parse test fails, never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_metrics import PROMETHEUS_SERIES, ROOT, exported_series, metric_names

pytestmark = pytest.mark.timeout(60)

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "liveloop.yml"
COMPOSE = ROOT / "docker-compose.yml"
GRID_COLUMNS = 24
# Grafana's own variables, and what they stand for when an expression is parsed here.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
# What the dashboard is for: each of these must be charted.
REQUIRED_SERIES = {
    "liveloop_rpc_requests_total",
    "liveloop_rpc_latency_seconds_bucket",
    "liveloop_config_propagation_seconds_bucket",
    "liveloop_monitor_uptake_ratio",
    "liveloop_monitor_explore_ratio",
    "liveloop_monitor_decision_log_lag_entries",
    "liveloop_monitor_decision_log_trimmed_total",
    "liveloop_monitor_alerts_firing",
}


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict)
    return document


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those nested in collapsed rows."""
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every templating query."""
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            found.append(
                (f"panel {panel['id']} {panel.get('title')!r} {target.get('refId')}", target["expr"])
            )
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", text)
        assert match, f"variable {variable['name']}: only label_values(<series>, <label>) is used"
        found.append((f"variable {variable['name']}", match[1]))
    return found


def datasource_uid() -> str:
    document = yaml.safe_load(DATASOURCES.read_text())
    (source,) = document["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


@pytest.fixture(params=dashboard_files(), ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_there_is_a_dashboard() -> None:
    assert [path.name for path in dashboard_files()] == ["liveloop.json"]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    uid = datasource_uid()
    occupied: dict[tuple[int, int], int] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0, panel["id"]
        assert grid["h"] > 0, panel["id"]
        assert grid["x"] >= 0, panel["id"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, f"panel {panel['id']} leaves the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"panels {occupied[(x, y)]} and {panel['id']} overlap"
                occupied[(x, y)] = panel["id"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"], panel["id"]
        targets = panel["targets"]
        assert targets, f"panel {panel['id']} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["id"]
        for target in targets:
            assert target["expr"].strip()
            for source in (panel.get("datasource"), target.get("datasource")):
                if source is not None:
                    assert source == {"type": "prometheus", "uid": uid}, f"panel {panel['id']}: {source}"
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": uid}, variable["name"]


def test_every_expression_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    allowed = exported_series() | PROMETHEUS_SERIES
    used: set[str] = set()
    problems = []
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric found in {expr!r}")
        if names - allowed:
            problems.append(f"{where}: {sorted(names - allowed)} not defined in libs/ or services/")
        used |= names
    assert not problems, "\n".join(problems)
    assert used >= REQUIRED_SERIES, f"not charted: {sorted(REQUIRED_SERIES - used)}"


def test_every_variable_an_expression_uses_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in dashboard.get("templating", {}).get("list", [])}
    for where, expr in expressions(dashboard):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined or name in BUILTIN_VARIABLES, f"{where}: ${name} is not defined"


def test_every_expression_parses_in_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each expression becomes a recording rule (variables replaced by what they could hold), and
    `promtool check rules` parses them all."""
    promtool = shutil.which("promtool")
    assert promtool is not None, (
        "promtool is missing: run tools/ensure_system_packages.sh (`make test` does), "
        "or apt-get install prometheus"
    )

    def substitute(expr: str) -> str:
        def value(match: re.Match[str]) -> str:
            return BUILTIN_VARIABLES.get(match[1], ".*")

        return re.sub(r"\$\{?(\w+)\}?", value, expr)

    rules = [
        {"record": f"dashboard:expression_{index}", "expr": substitute(expr)}
        for index, (_where, expr) in enumerate(expressions(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=50, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_provisions_the_datasource_and_dashboards() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    grafana = services["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (DASHBOARDS / Path(home).name).is_file()
    # the data source is the compose Prometheus, on the port it listens on
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert "prometheus" in grafana.get("depends_on", [])
