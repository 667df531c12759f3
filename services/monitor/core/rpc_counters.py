"""The RPC counters every liveloop server exports through its telemetry interceptor,
`liveloop_rpc_requests_total{service, method, code}`, read from a replica's Prometheus /metrics
page: what the error_rate alert rule computes error shares from."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

RPC_REQUESTS_SAMPLE = "liveloop_rpc_requests_total"
MAX_METRICS_BYTES = 16 * 1024 * 1024  # a metrics page is kilobytes; more is not a metrics page

# (service, method, code) -> requests counted since the process started
RpcCounters = Mapping[tuple[str, str, str], float]


def parse_rpc_counters(text: str) -> dict[tuple[str, str, str], float]:
    """The request counters in a Prometheus text page; ValueError when it does not parse."""
    counters: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != RPC_REQUESTS_SAMPLE:
                continue
            labels = sample.labels
            key = (labels.get("service", ""), labels.get("method", ""), labels.get("code", ""))
            counters[key] = counters.get(key, 0.0) + float(sample.value)
    return counters


def fetch_rpc_counters(url: str, timeout_seconds: float) -> dict[tuple[str, str, str], float]:
    """GET the metrics page (blocking: run it in a thread); OSError when it cannot be read."""
    # Only http(s) URLs from the settings get here (the engine checks them).
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=timeout_seconds) as reply:
        body = reply.read(MAX_METRICS_BYTES + 1)
    if len(body) > MAX_METRICS_BYTES:
        raise OSError(f"{url}: metrics page larger than {MAX_METRICS_BYTES} bytes")
    try:
        return parse_rpc_counters(body.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise OSError(f"{url}: not a Prometheus text page: {exc}") from None


def counter_increase(now: RpcCounters, before: RpcCounters | None) -> dict[tuple[str, str, str], float]:
    """Per series, what was counted between two scrapes; a counter that went down was reset (the
    process restarted), so all of its current value is new."""
    if before is None:
        return {}
    increase = {}
    for key, value in now.items():
        previous = before.get(key, 0.0)
        increase[key] = value - previous if value >= previous else value
    return increase
