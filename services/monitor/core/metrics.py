"""The monitor's own Prometheus metrics (served on the service's metrics port).

Per deployment, over the last summary of each (refreshed by the monitor's background loop):
uptake and explore share; of the consumer: entries counted, malformed, trimmed before they were
read, its lag; of the alert rules: alerts firing.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ENTRIES_CONSUMED = Counter(
    "liveloop_monitor_decision_log_entries_total",
    "Decision log entries counted, by kind (contact, response)",
    ["kind"],
)
ENTRIES_MALFORMED = Counter(
    "liveloop_monitor_decision_log_malformed_total",
    "Decision log entries that could not be read, by kind of problem",
    ["reason"],
)
ENTRIES_TRIMMED = Counter(
    "liveloop_monitor_decision_log_trimmed_total",
    "Decision log entries trimmed from the stream before the monitor read them",
)
CONSUMER_LAG = Gauge(
    "liveloop_monitor_decision_log_lag_entries",
    "Entries in the decision log not yet delivered to the monitor's consumer group",
)
CONSUMER_ERRORS = Counter(
    "liveloop_monitor_consumer_errors_total",
    "Consumer rounds that failed and will be retried, by what failed (redis, sql, nogroup)",
    ["reason"],
)
UPTAKE_RATE = Gauge(
    "liveloop_monitor_uptake_ratio",
    "Accepted / presented offers of a deployment over the monitor's summary window",
    ["deployment"],
)
EXPLORE_SHARE = Gauge(
    "liveloop_monitor_explore_ratio",
    "Share of presented offers that came from exploration, over the summary window",
    ["deployment"],
)
INVOCATIONS = Gauge(
    "liveloop_monitor_invocations",
    "Invoke calls of a deployment logged in the summary window",
    ["deployment"],
)
ALERTS_FIRING = Gauge(
    "liveloop_monitor_alerts_firing",
    "Alerts firing now, by rule and severity",
    ["rule", "severity"],
)
