"""The alert rules file (refusals name the line), and the statistics behind the rules: the
two-proportion z-test of uptake_drop, the slow fraction and burn rate of latency_burn_rate, RPC
counter increases of error_rate, and the Alertmanager payload of the webhooks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from scipy.stats import norm

from libs.common.errors import InvalidArgument
from services.monitor.core.alert_engine import SampleHistory
from services.monitor.core.alert_rules import (
    DEFAULT_RULES_FILE,
    KINDS,
    ErrorRateRule,
    LatencyBurnRateRule,
    UptakeDropRule,
    burn_rate,
    compare_uptake,
    load_rules,
    parse_duration,
    parse_rules,
    slow_fraction,
    whole_minutes,
)
from services.monitor.core.alert_store import Alert, alert_id
from services.monitor.core.rollups import LatencyCounts
from services.monitor.core.rpc_counters import counter_increase, parse_rpc_counters
from services.monitor.core.webhooks import ZERO_TIME, alertmanager_payload

pytestmark = pytest.mark.timeout(30)

GOOD = """\
rules:
  - name: uptake
    kind: uptake_drop
    severity: critical
    deployments: [offers]
    for: 10m
    recent_window: 15m
    baseline_window: 1d
    response_delay: 90s
    significance: 0.01
  - name: latency
    kind: latency_burn_rate
    threshold_seconds: 0.25
    windows:
      - {long: 1h, short: 5m, burn_rate: 14.4, severity: critical}
      - {long: 6h, short: 30m, burn_rate: 6}
  - name: errors
    kind: error_rate
    methods: [PredictorService/Invoke]
receivers:
  - name: ops
    url: http://127.0.0.1:9095/hook
    max_attempts: 3
"""


def refusal(text: str) -> str:
    with pytest.raises(InvalidArgument) as raised:
        parse_rules(textwrap.dedent(text), source="rules.yaml")
    assert raised.value.field == "alert_rules_file"
    return raised.value.message


def test_a_good_file_is_read_with_its_durations_defaults_and_receivers() -> None:
    rules = parse_rules(GOOD, source="rules.yaml")
    uptake, latency, errors = rules.rules
    assert isinstance(uptake, UptakeDropRule)
    assert (uptake.severity, uptake.deployments, uptake.for_seconds) == ("critical", ("offers",), 600.0)
    assert (uptake.recent_window, uptake.baseline_window, uptake.response_delay) == (900.0, 86400.0, 90.0)
    assert uptake.min_impressions == 200  # the default
    assert isinstance(latency, LatencyBurnRateRule)
    assert [(w.long, w.short, w.burn_rate, latency.severity_of(w)) for w in latency.windows] == [
        (3600.0, 300.0, 14.4, "critical"),
        (21600.0, 1800.0, 6.0, "warning"),  # the rule's severity
    ]
    assert isinstance(errors, ErrorRateRule)
    assert errors.methods == ("PredictorService/Invoke",)
    assert "INTERNAL" in errors.error_codes
    assert "INVALID_ARGUMENT" not in errors.error_codes  # a client error
    assert [(r.name, r.url, r.max_attempts, r.timeout_seconds) for r in rules.receivers] == [
        ("ops", "http://127.0.0.1:9095/hook", 3, 5.0)
    ]


def test_the_default_file_has_a_rule_of_every_kind_and_is_the_fallback() -> None:
    rules = load_rules(None)
    assert rules.source == str(DEFAULT_RULES_FILE)
    assert DEFAULT_RULES_FILE.parts[-3:] == ("services", "monitor", "alert-rules.yaml")
    assert {rule.kind for rule in rules.rules} == set(KINDS)
    assert len({rule.name for rule in rules.rules}) == len(rules.rules)


def test_an_unknown_kind_is_refused_naming_its_line() -> None:
    message = refusal(
        """\
        rules:
          - name: fine
            kind: no_traffic
          - name: typo
            kind: uptake_dorp
        """
    )
    assert message.startswith("alert_rules_file: rules.yaml, line 5: rule 'typo': unknown kind 'uptake_dorp'")
    assert "uptake_drop" in message  # the kinds it could be


def test_an_unknown_parameter_is_refused_naming_its_line() -> None:
    message = refusal(
        """\
        rules:
          - name: uptake
            kind: uptake_drop
            significance: 0.01
            min_impresions: 50
        """
    )
    assert "line 5: rule 'uptake' (uptake_drop): unknown parameter 'min_impresions'" in message


@pytest.mark.parametrize(
    ("body", "line", "complaint"),
    [
        ("significance: 0.9", 4, "significance: Input should be less than or equal to 0.5"),
        ("min_relative_drop: 0", 4, "min_relative_drop: Input should be greater than 0"),
        ("recent_window: 20s", 4, "recent_window: must be at least 1m"),
        ("for: soon", 4, "for: must be a duration"),
    ],
)
def test_a_bad_threshold_is_refused_naming_its_line(body: str, line: int, complaint: str) -> None:
    message = refusal(f"rules:\n  - name: uptake\n    kind: uptake_drop\n    {body}\n")
    assert f"line {line}: rule 'uptake' (uptake_drop): {complaint}" in message


def test_thresholds_that_contradict_each_other_are_refused() -> None:
    impossible = refusal(
        """\
        rules:
          - name: latency
            kind: latency_burn_rate
            objective: 0.9
            windows:
              - {long: 1h, short: 5m, burn_rate: 14.4}
        """
    )
    assert "line 6:" in impossible  # the window pair that cannot fire
    assert "windows[0].burn_rate: 14.4 x (1 - objective 0.9) is 1 or more" in impossible
    backwards = refusal(
        """\
        rules:
          - name: latency
            kind: latency_burn_rate
            windows:
              - {long: 5m, short: 1h, burn_rate: 2}
        """
    )
    assert "line 5:" in backwards
    assert "windows[0]: short (3600s) must be shorter than long (300s)" in backwards
    assert "min_share (0.6) is above max_share (0.5)" in refusal(
        "rules:\n  - {name: e, kind: explore_share, min_share: 0.6, max_share: 0.5}\n"
    )
    assert "not gRPC status names: INTERNAL_ERROR" in refusal(
        "rules:\n  - {name: e, kind: error_rate, error_codes: [INTERNAL_ERROR]}\n"
    )


def test_the_file_structure_is_checked_line_by_line() -> None:
    assert "line 3: rule name 'a' is used twice" in refusal(
        "rules:\n  - {name: a, kind: no_traffic}\n  - {name: a, kind: replica_nack}\n"
    )
    assert "line 4: 'severity' is given twice" in refusal(
        "rules:\n  - name: a\n    severity: warning\n    severity: critical\n    kind: no_traffic\n"
    )
    assert "line 2: unknown section 'rule'" in refusal("rules: []\nrule: []\n")
    assert "line 4: rule 'a' (decision_log_lag): deployments: this kind watches the platform" in refusal(
        "rules:\n  - name: a\n    kind: decision_log_lag\n    deployments: [offers]\n"
    )
    assert "line 2: rule 'a' (no_traffic): severity: Input should be 'warning' or 'critical'" in refusal(
        "rules:\n  - {name: a, kind: no_traffic, severity: page}\n"
    )
    assert "line 3: not valid YAML" in refusal("rules:\n  - name: a\n   kind: [\n")
    assert "line 3: receiver: url: String should match pattern" in refusal(
        "receivers:\n  - name: ops\n    url: ftp://example.org/hook\n"
    )


def test_a_missing_rules_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as raised:
        load_rules(tmp_path / "nope.yaml")
    assert raised.value.field == "alert_rules_file"
    assert "nope.yaml" in raised.value.message


def test_durations() -> None:
    assert [parse_duration(text) for text in ("90s", "15m", "1h30m", "1d", "250ms", 42, 1.5)] == [
        90.0,
        900.0,
        5400.0,
        86400.0,
        0.25,
        42.0,
        1.5,
    ]
    for bad in ("5 minutes", "m", "", True, "1h 30m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert (whole_minutes(60), whole_minutes(61), whole_minutes(900)) == (60, 120, 900)


# -- statistics ----------------------------------------------------------------------------------


def test_the_uptake_z_test_matches_the_textbook_two_proportion_test() -> None:
    test = compare_uptake(50, 1000, 100, 1000)
    pooled = 150 / 2000
    z = (0.05 - 0.10) / (pooled * (1 - pooled) * (2 / 1000)) ** 0.5
    assert test.z == pytest.approx(z)
    assert test.z == pytest.approx(-4.2448, abs=1e-4)
    assert test.p_value == pytest.approx(norm.cdf(z), rel=1e-9)
    assert test.p_value < 1e-4
    assert test.relative_drop == pytest.approx(0.5)
    assert (test.recent_rate, test.baseline_rate) == (0.05, 0.10)


def test_the_uptake_z_test_finds_no_drop_where_there_is_none() -> None:
    higher = compare_uptake(120, 1000, 100, 1000)
    assert higher.p_value > 0.5
    assert higher.relative_drop < 0
    small = compare_uptake(8, 100, 10, 100)  # 20% lower, but 100 impressions prove nothing
    assert small.relative_drop == pytest.approx(0.2)
    assert small.p_value > 0.3
    nothing_taken = compare_uptake(0, 500, 0, 500)
    assert (nothing_taken.p_value, nothing_taken.relative_drop) == (1.0, 0.0)
    with pytest.raises(ValueError, match="impressions"):
        compare_uptake(0, 0, 1, 10)


def latency(*seconds: float) -> LatencyCounts:
    counts = LatencyCounts()
    for value in seconds:
        counts.add(value)
    return counts


def test_the_slow_fraction_counts_the_calls_above_the_threshold() -> None:
    counts = latency(*[0.005] * 90, *[0.5] * 10)
    assert slow_fraction(counts, 0.1) == pytest.approx(0.10)
    assert slow_fraction(counts, 0.001) == pytest.approx(1.0)
    assert slow_fraction(counts, 0.6) == 0.0  # above the slowest call
    assert slow_fraction(LatencyCounts(), 0.1) == 0.0
    # A threshold inside the bucket of the calls counts only the part of the bucket above it.
    near = latency(*[0.2] * 100)
    fractions = [slow_fraction(near, threshold) for threshold in (0.17, 0.18, 0.19, 0.199)]
    assert all(0 < fraction <= 1 for fraction in fractions)
    assert fractions == sorted(fractions, reverse=True)


def test_the_burn_rate_is_the_slow_fraction_over_the_error_budget() -> None:
    assert burn_rate(0.144, 0.99) == pytest.approx(14.4)
    assert burn_rate(0.01, 0.99) == pytest.approx(1.0)  # exactly on budget
    assert burn_rate(0.0, 0.999) == 0.0
    counts = latency(*[0.005] * 60, *[0.3] * 40)
    assert burn_rate(slow_fraction(counts, 0.1), 0.99) == pytest.approx(40.0)


def test_rpc_counters_are_read_and_their_increase_survives_a_restart() -> None:
    text = (
        "# HELP liveloop_rpc_requests_total RPCs\n"
        "# TYPE liveloop_rpc_requests_total counter\n"
        'liveloop_rpc_requests_total{service="predictor",method="PredictorService/Invoke",code="OK"} 90.0\n'
        'liveloop_rpc_requests_total{service="predictor",method="PredictorService/Invoke",code="INTERNAL"} 10.0\n'
        'liveloop_rpc_requests_created{service="predictor",method="PredictorService/Invoke",code="OK"} 1.7e9\n'
        'liveloop_rpc_latency_seconds_count{service="predictor",method="PredictorService/Invoke"} 100.0\n'
    )
    counters = parse_rpc_counters(text)
    assert counters == {
        ("predictor", "PredictorService/Invoke", "OK"): 90.0,
        ("predictor", "PredictorService/Invoke", "INTERNAL"): 10.0,
    }
    later = {("predictor", "PredictorService/Invoke", "OK"): 150.0, ("predictor", "X", "OK"): 5.0}
    assert counter_increase(later, counters) == {
        ("predictor", "PredictorService/Invoke", "OK"): 60.0,
        ("predictor", "X", "OK"): 5.0,
    }
    restarted = {("predictor", "PredictorService/Invoke", "OK"): 7.0}
    assert counter_increase(restarted, later) == {("predictor", "PredictorService/Invoke", "OK"): 7.0}
    assert counter_increase(later, None) == {}


def test_a_sample_history_answers_the_value_at_the_start_of_a_window() -> None:
    history: SampleHistory[int] = SampleHistory()
    assert history.reference(100.0) is None
    for when, value in ((0.0, 1), (30.0, 2), (60.0, 3), (90.0, 4)):
        history.add(when, value, keep_seconds=60.0)
    assert history.reference(90.0) == 4  # a window of 0: the last evaluation
    assert history.reference(45.0) == 2  # at or before the cutoff
    assert history.reference(-10.0) == 2  # older than kept: the oldest kept
    assert history.reference(30.0) == 2


def test_the_webhook_payload_is_alertmanagers() -> None:
    firing = Alert(
        id=alert_id("uptake", "offers", {"offer": "alpha"}),
        rule="uptake",
        kind="uptake_drop",
        deployment="offers",
        severity="critical",
        state="firing",
        summary="uptake of offer alpha fell",
        labels={"offer": "alpha"},
        value=0.5,
        threshold=0.3,
        started_at=1_765_000_000.25,
        resolved_at=None,
        updated_at=1_765_000_000.25,
    )
    payload = alertmanager_payload("ops", [firing], "http://monitor:9491")
    assert payload["version"] == "4"
    assert payload["status"] == "firing"
    assert payload["receiver"] == "ops"
    assert payload["groupKey"] == '{}:{alertname="uptake",deployment="offers"}'
    assert payload["groupLabels"] == {"alertname": "uptake", "deployment": "offers"}
    assert payload["commonLabels"] == {
        "alertname": "uptake",
        "severity": "critical",
        "deployment": "offers",
        "offer": "alpha",
    }
    assert payload["externalURL"] == "http://monitor:9491"
    (entry,) = payload["alerts"]
    assert entry["startsAt"] == "2025-12-06T05:46:40.250Z"
    assert entry["endsAt"] == ZERO_TIME
    assert entry["fingerprint"] == firing.id
    assert len(firing.id) == 16
    assert firing.id == alert_id("uptake", "offers", {"offer": "alpha"})
    assert firing.id != alert_id("uptake", "offers", {"offer": "bravo"})
