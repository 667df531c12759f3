"""deploy/prometheus/ checked by Prometheus's own tool: `promtool check rules` (syntax, templates),
`promtool check config` (the compose scrape configuration with the repo's rules) and
`promtool test rules` (each monitor rule fires on a made-up series, and stays quiet when it should).

promtool comes from Debian's `prometheus` package; `make test` installs it when it is missing
(tools/ensure_system_packages.sh). Without it these tests fail, they never skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_metrics import ROOT

pytestmark = pytest.mark.timeout(60)

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
MONITOR = {"job": "monitor", "instance": "monitor:9491"}
OTHER_MONITOR = {"job": "monitor", "instance": "monitor-b:9491"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, (
        "promtool is missing: run tools/ensure_system_packages.sh (`make test` does), "
        "or apt-get install prometheus"
    )
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=50, check=False, cwd=cwd)


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    selector = ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{selector}}}", "values": values}


def expect(alertname: str, at: str, *alerts: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alertname, "exp_alerts": [{"exp_labels": a} for a in alerts]}


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_compose_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    """The scrape configuration as compose mounts it, with the rule file where it is mounted."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", "--syntax-only", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _rules_without_annotations(tmp_path: Path) -> Path:
    """The rules with their annotations dropped: `promtool test rules` compares annotations too, and
    their wording is checked by `promtool check rules` already; here only when each alert fires."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_monitor_rules_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    lag = "liveloop_monitor_decision_log_lag_entries"
    consumed = "liveloop_monitor_decision_log_entries_total"
    trimmed = "liveloop_monitor_decision_log_trimmed_total"
    malformed = "liveloop_monitor_decision_log_malformed_total"
    errors = "liveloop_monitor_consumer_errors_total"
    firing = "liveloop_monitor_alerts_firing"
    tests = [
        {
            # one monitor far behind and consuming nothing, one a little behind and keeping up
            "interval": "1m",
            "input_series": [
                series(lag, MONITOR, "20000x30"),
                series(consumed, {**MONITOR, "kind": "contact"}, "100x30"),
                series(lag, OTHER_MONITOR, "50x30"),
                series(consumed, {**OTHER_MONITOR, "kind": "contact"}, "0+600x30"),
            ],
            "alert_rule_test": [
                expect("LiveloopMonitorDecisionLogLagHigh", "3m"),  # not for 5 minutes yet
                expect("LiveloopMonitorDecisionLogLagHigh", "6m", {**MONITOR, "severity": "warning"}),
                expect("LiveloopMonitorConsumerStalled", "5m"),
                expect("LiveloopMonitorConsumerStalled", "20m", {**MONITOR, "severity": "critical"}),
            ],
        },
        {
            # predictors serving while the monitor counts nothing, then counting again
            "interval": "1m",
            "input_series": [
                series(
                    "liveloop_rpc_requests_total",
                    {
                        "job": "predictor",
                        "instance": "predictor-1:9461",
                        "service": "predictor",
                        "method": "PredictorService/Invoke",
                        "code": "OK",
                    },
                    "0+600x60",
                ),
                series(consumed, {**MONITOR, "kind": "contact"}, "0+600x5 3000x30 3000+600x25"),
            ],
            "alert_rule_test": [
                expect("LiveloopMonitorSeesNoDecisions", "4m"),
                expect("LiveloopMonitorSeesNoDecisions", "12m"),  # not for 10 minutes yet
                expect("LiveloopMonitorSeesNoDecisions", "30m", {"severity": "critical"}),
                expect("LiveloopMonitorSeesNoDecisions", "55m"),
            ],
        },
        {
            # five entries trimmed at minute 3: an alert at once, gone once the 15 minutes have passed
            "interval": "1m",
            "input_series": [
                series(trimmed, MONITOR, "0 0 0 5x40"),
                series(lag, MONITOR, "0x40"),
                series(consumed, {**MONITOR, "kind": "contact"}, "0+10x40"),
            ],
            "alert_rule_test": [
                expect("LiveloopMonitorEntriesTrimmed", "2m"),
                expect("LiveloopMonitorEntriesTrimmed", "5m", {**MONITOR, "severity": "critical"}),
                expect("LiveloopMonitorEntriesTrimmed", "30m"),
                expect("LiveloopMonitorDecisionLogLagHigh", "30m"),
                expect("LiveloopMonitorConsumerStalled", "30m"),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series(malformed, {**MONITOR, "reason": "unknown_schema"}, "0 0 2x30"),
                series(errors, {**MONITOR, "reason": "redis"}, "0+1x30"),
                series(errors, {**MONITOR, "reason": "sql"}, "3x30"),
            ],
            "alert_rule_test": [
                expect(
                    "LiveloopMonitorMalformedEntries",
                    "4m",
                    {**MONITOR, "reason": "unknown_schema", "severity": "warning"},
                ),
                expect("LiveloopMonitorConsumerErrors", "5m"),
                expect(
                    "LiveloopMonitorConsumerErrors",
                    "15m",
                    {**MONITOR, "reason": "redis", "severity": "warning"},
                ),
            ],
        },
        {
            # the monitor's own rules, at the severities services/monitor/core/alert_rules.py uses
            "interval": "1m",
            "input_series": [
                series(firing, {**MONITOR, "rule": "uptake_drop", "severity": "critical"}, "0 1x10"),
                series(firing, {**MONITOR, "rule": "feature_drift", "severity": "warning"}, "0 0 0 2x10"),
                series(firing, {**MONITOR, "rule": "stale_replica", "severity": "warning"}, "0x10"),
            ],
            "alert_rule_test": [
                expect("LiveloopMonitorAlertsFiringCritical", "0m"),
                expect(
                    "LiveloopMonitorAlertsFiringCritical",
                    "2m",
                    {"rule": "uptake_drop", "severity": "critical"},
                ),
                expect("LiveloopMonitorAlertsFiringWarning", "2m"),
                expect(
                    "LiveloopMonitorAlertsFiringWarning",
                    "4m",
                    {"rule": "feature_drift", "severity": "warning"},
                ),
            ],
        },
    ]
    rule_file = _rules_without_annotations(tmp_path)
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": tests})
    )
    result = promtool("test", "rules", test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
