"""GetSummary: what a deployment did over a window, from the per-minute rollups and the config
service's head revision."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.monitor.core.rollup_store import WindowTotals
from services.monitor.core.rollups import INVOKE_METHOD, RESPOND_METHOD, LatencyCounts, OfferCounts


@dataclass(frozen=True)
class UptakeRow:
    offer: str
    segment: str
    impressions: int
    accepted: int
    uptake_rate: float
    reward_sum: float
    explored_impressions: int


@dataclass(frozen=True)
class LatencySummary:
    method: str
    count: int
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    p999_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class ReplicaSummary:
    replica_id: str
    config_revision: int
    last_seen: float
    invocations: int
    stale: bool


@dataclass(frozen=True)
class Summary:
    deployment: str
    window_start: float
    window_end: float
    invocations: int
    responses: int
    late_responses: int
    duplicate_responses: int
    impressions: int
    accepted: int
    uptake_rate: float
    explore_share: float
    head_revision: int
    by_offer: list[UptakeRow] = field(default_factory=list)
    by_segment: list[UptakeRow] = field(default_factory=list)
    by_offer_segment: list[UptakeRow] = field(default_factory=list)
    by_variant: list[UptakeRow] = field(default_factory=list)
    latency: list[LatencySummary] = field(default_factory=list)
    replicas: list[ReplicaSummary] = field(default_factory=list)


def _rate(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _row(offer: str, segment: str, totals: OfferCounts) -> UptakeRow:
    return UptakeRow(
        offer=offer,
        segment=segment,
        impressions=totals.impressions,
        accepted=totals.accepted,
        uptake_rate=_rate(totals.accepted, totals.impressions),
        reward_sum=totals.reward_sum,
        explored_impressions=totals.explored_impressions,
    )


def _latency(method: str, counts: LatencyCounts) -> LatencySummary:
    return LatencySummary(
        method=method,
        count=counts.calls,
        p50_seconds=counts.quantile(0.5),
        p90_seconds=counts.quantile(0.9),
        p99_seconds=counts.quantile(0.99),
        p999_seconds=counts.quantile(0.999),
        max_seconds=counts.max_seconds,
    )


def build_summary(
    deployment: str, start: float, end: float, totals: WindowTotals, head_revision: int
) -> Summary:
    """`head_revision`: the revision the deployment last changed at (0 when unknown)."""
    accepted = sum(row.accepted for row in totals.by_offer.values())
    explored = sum(row.explored_impressions for row in totals.by_offer.values())
    impressions = totals.impressions
    methods = sorted(totals.latency, key=lambda m: (m not in (INVOKE_METHOD, RESPOND_METHOD), m))
    return Summary(
        deployment=deployment,
        window_start=start,
        window_end=end,
        invocations=totals.invocations,
        responses=totals.responses,
        late_responses=totals.late_responses,
        duplicate_responses=totals.duplicate_responses,
        impressions=impressions,
        accepted=accepted,
        uptake_rate=_rate(accepted, impressions),
        explore_share=_rate(explored, impressions),
        head_revision=head_revision,
        by_offer=[_row(offer, "", row) for offer, row in sorted(totals.by_offer.items())],
        by_segment=[_row("", segment, row) for segment, row in sorted(totals.by_segment.items())],
        by_offer_segment=[
            _row(offer, segment, row) for (offer, segment), row in sorted(totals.by_offer_segment.items())
        ],
        by_variant=[_row("", variant, row) for variant, row in sorted(totals.by_variant.items())],
        latency=[_latency(method, totals.latency[method]) for method in methods],
        replicas=[
            ReplicaSummary(
                replica_id=replica.replica,
                config_revision=replica.revision,
                last_seen=replica.last_seen,
                invocations=replica.invocations,
                stale=head_revision > 0 and replica.revision < head_revision,
            )
            for replica in totals.replicas
        ],
    )
