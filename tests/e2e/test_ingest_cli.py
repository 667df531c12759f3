"""`liveloop ingest`, `tables`, `features apply`, `materialize` and `options generate` against a whole
local stack, then an Invoke through the front door that uses what they built: the customer's online
features (no "no features" warning, the segment they imply) and arm rewards from the priors."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
DATA = REPO / "examples" / "data"
CUSTOMER = "c0002"  # 33, female, 1 trip a year: age_band adult, every offer eligible
SEGMENT = "age_band=adult|gender=female|channel=app"
SERVER_PRIOR_WEIGHT = 100  # pseudo-observations per arm when none is asked for


def ok(stack: LocalStack, *args: str) -> str:
    result = stack.cli(*args)
    assert result.returncode == 0, f"liveloop {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ok_json(stack: LocalStack, *args: str) -> Any:
    return json.loads(ok(stack, *args, "--json"))


def expected_arm_rewards() -> dict[str, float]:
    """What Thompson's posterior mean is for each offer in SEGMENT, from the history's priors alone
    (alpha0 = beta0 = 1 in the example deployment)."""
    counts: dict[str, list[int]] = {}
    with (DATA / "history.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if f"age_band={row['age_band']}|gender={row['gender']}|channel={row['channel']}" == SEGMENT:
                seen = counts.setdefault(row["offer"], [0, 0])
                seen[0] += 1
                seen[1] += int(row["accepted"])
    rewards = {}
    for offer, (n, s) in counts.items():
        pseudo = min(SERVER_PRIOR_WEIGHT, n)
        rewards[offer] = (1 + pseudo * s / n) / (2 + pseudo)
    return rewards


def test_ingest_materialize_generate_options_then_invoke(running_stack: LocalStack, tmp_path: Path) -> None:
    stack = running_stack
    ok(stack, "config", "publish", str(EXAMPLE), "--no-diff")
    ok(stack, "config", "status", "--wait-for-head", "10")

    loaded = ok_json(
        stack, "ingest", str(DATA / "customers.csv"), "--table", "customers", "--key", "customer"
    )
    assert (loaded["rows_written"], loaded["rows_rejected"], loaded["already_loaded"]) == (1000, 0, False)
    assert {c["name"]: c["type"] for c in loaded["columns"]} == {
        "customer": "string",
        "age": "int64",
        "gender": "string",
        "trips_per_year": "int64",
        "signup_time": "timestamp",
    }
    again = ok_json(stack, "ingest", str(DATA / "customers.csv"), "--table", "customers", "--key", "customer")
    assert (again["already_loaded"], again["table_rows"]) == (True, 1000)
    uploaded = ok_json(
        stack,
        "ingest",
        str(DATA / "history.csv"),
        "--table",
        "history",
        "--upload",
        "--type",
        "accepted=int64",
    )
    assert (uploaded["rows_written"], uploaded["table_rows"]) == (4000, 4000)
    human = ok(stack, "ingest", str(DATA / "history.csv"), "--table", "history", "--upload")
    assert "already loaded" in human

    # Bad input: the command exits 1 with the status and the rows the service rejected.
    bad = tmp_path / "bad.csv"
    bad.write_text("customer,age,gender,trips_per_year,signup_time\nc9999,old,male,1,2024-01-01T00:00:00Z\n")
    result = stack.cli("ingest", str(bad), "--table", "customers", "--key", "customer")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "'old' is not a whole number" in result.stderr
    result = stack.cli("ingest", str(bad), "--table", "customers", "--type", "age=decimal")
    assert result.returncode == 1
    assert "unknown type" in result.stderr

    tables = {t["name"]: t for t in ok_json(stack, "tables")}
    assert (tables["customers"]["row_count"], tables["customers"]["key"]) == (1000, ["customer"])
    assert tables["history"]["row_count"] == 4000
    described = ok_json(stack, "tables", "--describe", "customers")
    age = next(c for c in described["columns"] if c["name"] == "age")
    assert (age["stats"]["count"], age["stats"]["min"], age["stats"]["max"]) == (1000, 18.0, 83.0)
    assert "customers" in ok(stack, "tables")

    spec = tmp_path / "features.yaml"
    spec.write_text(
        "views:\n"
        "  - name: customer_profile\n    source: customers\n    entity: customer\n    features:\n"
        "      - name: age\n        column: age\n"
        "      - name: trips\n        column: trips_per_year\n"
    )
    applied = stack.cli("features", "apply", str(spec), "--json")
    if applied.returncode == 0:
        views = {v["name"]: v for v in json.loads(applied.stdout)["views"]}
        assert [f["name"] for f in views["customer_profile"]["features"]] == ["age", "trips"]
    else:  # a service without ApplyFeatures: the command says so
        assert "does not implement ApplyFeatures" in applied.stderr, applied.stderr

    materialized = ok_json(stack, "materialize", "customers")
    assert materialized == [{"feature_view": "customers", "entities_written": 1000, "unchanged": False}]
    assert ok_json(stack, "materialize", "customers")[0]["unchanged"] is True

    generated = ok_json(
        stack, "options", "generate", "--deployment", "telco-offers", "--history-table", "history"
    )
    assert generated["offers"] == 7
    assert generated["history_rows"] == 4000
    assert generated["arms_created"] == 108
    assert "options" in ok(stack, "options", "generate", "--deployment", "telco-offers", "--dry-run")
    result = stack.cli("options", "generate", "--deployment", "nope", "--history-table", "history")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr

    expected = expected_arm_rewards()
    deadline = time.monotonic() + 15
    while True:  # replicas cache the live generation for a second
        reply = ok_json(stack, "invoke", "telco-offers", CUSTOMER, "--channel", "app")
        rewards = {row["result"]["offer"]: row["result"]["arm_reward"] for row in reply["final_result"]}
        if (
            all(abs(rewards[offer] - expected[offer]) < 1e-6 for offer in rewards)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.1)  # poll again, bounded by the deadline above
    assert reply["segment"] == SEGMENT
    assert not [w for w in reply.get("warnings", []) if "no features" in w], reply
    assert len(rewards) == 3
    for offer, reward in rewards.items():
        assert reward == pytest.approx(expected[offer], abs=1e-6), (offer, reward, expected[offer])
    assert len({round(r, 6) for r in rewards.values()}) > 1  # priors differ by offer, not the flat 0.5

    unknown = ok_json(stack, "invoke", "telco-offers", "nobody", "--channel", "app")
    assert any("no features for 'nobody'" in w for w in unknown["warnings"])


def test_the_point_in_time_path_of_the_readme_trains_the_example_model(running_stack: LocalStack) -> None:
    """examples/training/take-up.yaml, as its header says: events and customers in, the example
    feature views, a point-in-time training set keeping the offer, a take-up model trained on it."""
    stack = running_stack
    ok(stack, "ingest", str(DATA / "customers.csv"), "--table", "customers", "--key", "customer")
    ok(stack, "ingest", str(DATA / "events.csv"), "--table", "events", "--event-time", "event_time")
    applied = ok_json(stack, "features", "apply", str(REPO / "examples" / "features" / "telco-features.yaml"))
    assert [v["name"] for v in applied["views"]] == ["customer_profile", "customer_activity"]
    built = ok_json(
        stack,
        "features",
        "training-set",
        "telco_take_up",
        "--labels",
        "events",
        "--label",
        "accepted",
        "--feature",
        "customer_profile",
        "--keep",
        "offer",
    )
    assert built["row_count"] == 4000
    names = [c["name"] for c in built["columns"]]
    assert names[:4] == ["customer", "event_time", "accepted", "offer"]
    assert "customer_profile__age_band" in names
    assert built["rows_missing_features"] == 0  # every customer signed up before 2024
    trained = stack.cli("train", str(REPO / "examples" / "training" / "take-up.yaml"), "--json", timeout=240)
    assert trained.returncode == 0, trained.stderr
    final = json.loads(trained.stdout)
    assert final["state"] == "JOB_STATE_SUCCEEDED"
    assert final["model"]["name"] == "take-up"
    assert 0.5 < final["metrics"]["auc"] <= 1.0
