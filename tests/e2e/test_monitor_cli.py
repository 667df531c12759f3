"""`liveloop monitor` against a whole local stack, as a person runs it: traffic through the front
door, then summary, alerts and evaluate as tables and as JSON, and bad input as clear errors."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from libs.stack.processes import wait_until
from tests.e2e.conftest import REPO, LocalStack
from tests.integration.test_monitor_logged_table import COLUMNS, old_system_log, only
from tests.trainer_datasets import write_csv

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"


def _post(stack: LocalStack, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{stack.front_door}{path}",
        data=json.dumps(body).encode(),
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        reply: dict[str, Any] = json.loads(response.read())
        return reply


def test_monitor_commands_on_a_live_stack(running_stack: LocalStack, tmp_path: Path) -> None:
    stack = running_stack
    published = stack.cli("config", "publish", str(EXAMPLE), "--no-diff")
    assert published.returncode == 0, published.stderr
    key = stack.credentials()["invoke"]
    accepted = 0
    for i in range(40):
        reply = _post(
            stack, "/invocations", {"campaign": "telco-offers", "customer": f"c{i}", "numberoffers": 2}, key
        )
        if i % 4 == 0:
            _post(
                stack,
                "/response",
                {"uuid": reply["uuid"], "accepted_offers": [reply["final_result"][0]["result"]["offer"]]},
                key,
            )
            accepted += 1

    def summarised() -> dict[str, Any] | None:
        summary = stack.cli("monitor", "summary", "telco-offers", "--window", "1h", "--json")
        assert summary.returncode == 0, summary.stderr
        document: dict[str, Any] = json.loads(summary.stdout)
        return document if (document["invocations"], document["responses"]) == (40, accepted) else None

    assert wait_until(summarised, timeout=30), "not summarised within 30 s"
    document = summarised()
    assert document is not None
    assert document["impressions"] == 80
    assert document["accepted"] == accepted
    assert {row["replica_id"] for row in document["replicas"]} == {"predictor-1", "predictor-2"}

    table = stack.cli("monitor", "summary", "telco-offers")
    assert table.returncode == 0, table.stderr
    assert "40 invocations" in table.stdout
    assert "uptake by offer" in table.stdout

    alerts = stack.cli("monitor", "alerts", "--json")
    assert alerts.returncode == 0, alerts.stderr
    assert "alerts" in json.loads(alerts.stdout)

    evaluation = stack.cli("monitor", "evaluate", "telco-offers", "--revision", "1", "--json", timeout=180)
    assert evaluation.returncode == 0, evaluation.stderr
    result = json.loads(evaluation.stdout)
    assert result["decisions"] == 40
    assert {row["estimator"] for row in result["estimates"]} <= {"ips", "snips", "dm", "dr"}

    drift = stack.cli("monitor", "drift", "telco-offers")
    assert drift.returncode == 1
    assert "binds no model" in drift.stderr

    # A team evaluates a spec on its old system's log before publishing anything: the log goes in
    # through ingest, the spec is only a file.
    log = tmp_path / "old_system.csv"
    write_csv(log, old_system_log(600), COLUMNS)
    loaded = stack.cli("ingest", str(log), "--table", "old_system", "--upload", "--type", "time=timestamp")
    assert loaded.returncode == 0, loaded.stderr
    candidate = tmp_path / "candidate.json"
    candidate.write_text(json.dumps(only("alpha")))
    on_log = stack.cli(
        "monitor",
        "evaluate",
        "switch-over",
        "--spec",
        str(candidate),
        "--logged-table",
        "old_system",
        "--json",
    )
    assert on_log.returncode == 0, on_log.stderr
    result = json.loads(on_log.stdout)
    assert result["decisions"] == 600
    assert any("another system" in note for note in result["notes"])
    shown = stack.cli(
        "monitor", "evaluate", "switch-over", "--spec", str(candidate), "--logged-table", "old_system"
    )
    assert shown.returncode == 0, shown.stderr
    assert "on table old_system" in shown.stdout

    for args, code, words in (
        (
            ("evaluate", "switch-over", "--spec", str(candidate), "--logged-table", "nope"),
            1,
            "no table 'nope'",
        ),
        (("summary", "no-such-deployment"), 1, "NOT_FOUND"),
        (("summary", "telco-offers", "--window", "1x"), 2, "not a duration"),
        (("evaluate", "telco-offers"), 2, "name a candidate"),
        (("evaluate", "telco-offers", "--revision", "1", "--spec", str(EXAMPLE)), 2, "not both"),
        (("evaluate", "telco-offers", "--revision", "99"), 1, "candidate_revision"),
    ):
        refused = stack.cli("monitor", *args)
        assert refused.returncode == code, (args, refused.stdout, refused.stderr)
        assert words in refused.stderr, (args, refused.stderr)
