"""gRPC face of the monitor service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.distribution_drift import DistributionDrift
from libs.common.errors import InvalidArgument
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.core.estimators import PolicyValueEstimate
from services.monitor.core.monitor_service import MonitorService
from services.monitor.core.policy_evaluation import EvaluationRequest
from services.monitor.core.summaries import UptakeRow

_ESTIMATOR_NAMES = {
    monitor_pb2.ESTIMATOR_IPS: "ips",
    monitor_pb2.ESTIMATOR_SNIPS: "snips",
    monitor_pb2.ESTIMATOR_DM: "dm",
    monitor_pb2.ESTIMATOR_DR: "dr",
}
_ESTIMATOR_VALUES = {name: value for value, name in _ESTIMATOR_NAMES.items()}


def _timestamp(seconds: float) -> Timestamp:
    value = Timestamp()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _seconds(value: Duration | Timestamp, present: bool) -> float | None:
    return value.ToNanoseconds() / 1e9 if present else None


def _uptake(row: UptakeRow, variant: bool = False) -> monitor_pb2.UptakeRow:
    return monitor_pb2.UptakeRow(
        offer=row.offer,
        segment="" if variant else row.segment,
        variant=row.segment if variant else "",
        impressions=row.impressions,
        accepted=row.accepted,
        uptake_rate=row.uptake_rate,
        reward_sum=row.reward_sum,
        explored_impressions=row.explored_impressions,
    )


def _estimate(estimate: PolicyValueEstimate) -> monitor_pb2.PolicyEstimate:
    return monitor_pb2.PolicyEstimate(
        estimator=_ESTIMATOR_VALUES[estimate.estimator],
        value=estimate.value,
        lower=estimate.lower,
        upper=estimate.upper,
        std_error=estimate.std_error,
        lift=estimate.lift,
    )


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, service: MonitorService) -> None:
        self._service = service

    async def GetSummary(
        self, request: monitor_pb2.GetSummaryRequest, context: Any
    ) -> monitor_pb2.GetSummaryResponse:
        summary = await self._service.summary(
            request.deployment,
            _seconds(request.window, request.HasField("window")),
            _seconds(request.end_time, request.HasField("end_time")),
        )
        status = await asyncio.to_thread(self._service.decision_log_status)
        return monitor_pb2.GetSummaryResponse(
            deployment=summary.deployment,
            window_start=_timestamp(summary.window_start),
            window_end=_timestamp(summary.window_end),
            invocations=summary.invocations,
            responses=summary.responses,
            uptake_rate=summary.uptake_rate,
            by_offer=[_uptake(row) for row in summary.by_offer],
            by_segment=[_uptake(row) for row in summary.by_segment],
            by_offer_segment=[_uptake(row) for row in summary.by_offer_segment],
            by_variant=[_uptake(row, variant=True) for row in summary.by_variant],
            explore_share=summary.explore_share,
            latency=[
                monitor_pb2.LatencyQuantiles(
                    method=row.method,
                    count=row.count,
                    p50_seconds=row.p50_seconds,
                    p90_seconds=row.p90_seconds,
                    p99_seconds=row.p99_seconds,
                    p999_seconds=row.p999_seconds,
                    max_seconds=row.max_seconds,
                )
                for row in summary.latency
            ],
            replicas=[
                monitor_pb2.ReplicaRevision(
                    replica_id=row.replica_id,
                    config_revision=row.config_revision,
                    last_seen=_timestamp(row.last_seen),
                    invocations=row.invocations,
                    stale=row.stale,
                )
                for row in summary.replicas
            ],
            head_revision=summary.head_revision,
            late_responses=summary.late_responses,
            duplicate_responses=summary.duplicate_responses,
            impressions=summary.impressions,
            accepted=summary.accepted,
            decision_log=monitor_pb2.DecisionLogStatus(
                lag=-1 if status.lag is None else status.lag,
                trimmed_entries=status.trimmed_entries,
                malformed_entries=status.malformed_entries,
                consumed_entries=status.consumed_entries,
            ),
        )

    async def GetTimeSeries(
        self, request: monitor_pb2.GetTimeSeriesRequest, context: Any
    ) -> monitor_pb2.GetTimeSeriesResponse:
        window, offers, invokes = await self._service.time_series(
            request.deployment,
            _seconds(request.window, request.HasField("window")),
            _seconds(request.end_time, request.HasField("end_time")),
        )
        return monitor_pb2.GetTimeSeriesResponse(
            deployment=request.deployment,
            window_start=_timestamp(window.minutes[0]),
            window_end=_timestamp(window.end),
            offers=[
                monitor_pb2.OfferMinute(
                    minute=_timestamp(point.minute),
                    offer=point.offer,
                    impressions=point.impressions,
                    accepted=point.accepted,
                    explored_impressions=point.explored_impressions,
                )
                for point in offers
            ],
            invocations=[
                monitor_pb2.InvokeMinute(
                    minute=_timestamp(minute),
                    invocations=calls,
                    p50_seconds=latency.quantile(0.5),
                    p99_seconds=latency.quantile(0.99),
                )
                for minute, calls, latency in invokes
            ],
        )

    async def EvaluatePolicy(
        self, request: monitor_pb2.EvaluatePolicyRequest, context: Any
    ) -> monitor_pb2.EvaluatePolicyResponse:
        names = [_ESTIMATOR_NAMES[value] for value in request.estimators if value in _ESTIMATOR_NAMES]
        unknown = [value for value in request.estimators if value not in _ESTIMATOR_NAMES]
        if unknown:
            raise InvalidArgument(f"unknown estimator {unknown[0]}", field="estimators")
        if not 0 <= request.confidence_level < 1:
            raise InvalidArgument("must lie in (0, 1); 0 means 0.95", field="confidence_level")
        evaluation = await self._service.evaluate(
            request.deployment,
            candidate_spec_json=request.candidate_spec_json or None,
            candidate_revision=request.candidate_revision or None,
            window_seconds=_seconds(request.window, request.HasField("window")),
            end_time=_seconds(request.end_time, request.HasField("end_time")),
            request=EvaluationRequest(
                estimators=names or list(_ESTIMATOR_NAMES.values()),
                confidence_level=request.confidence_level or 0.95,
                max_importance_weight=request.max_importance_weight,
                bootstrap_samples=request.bootstrap_samples,
                seed=request.seed,
            ),
            logged_table=request.logged_table,
        )
        result = evaluation.result
        return monitor_pb2.EvaluatePolicyResponse(
            decisions=evaluation.decisions,
            usable_decisions=result.usable_decisions,
            logged_value=result.logged_value or 0.0,
            estimates=[
                _estimate(estimate)
                for estimate in result.estimates.values()
                if estimate.estimator in _ESTIMATOR_VALUES
            ],
            effective_sample_size=result.effective_sample_size,
            max_weight=result.max_weight,
            warnings=result.warnings,
            confidence_level=result.confidence_level,
            notes=evaluation.notes,
            unsupported_mass=result.unsupported_mass,
            refused=[f"{name}: {reason}" for name, reason in result.refused.items()],
        )

    async def CompareShadow(
        self, request: monitor_pb2.CompareShadowRequest, context: Any
    ) -> monitor_pb2.CompareShadowResponse:
        window, comparisons = await self._service.compare_shadow(
            request.deployment,
            _seconds(request.window, request.HasField("window")),
            _seconds(request.end_time, request.HasField("end_time")),
        )
        return monitor_pb2.CompareShadowResponse(
            deployment=request.deployment,
            window_start=_timestamp(window.start),
            window_end=_timestamp(window.end),
            shadows=[
                monitor_pb2.ShadowComparison(
                    shadow=row.shadow,
                    live_decisions=row.live_decisions,
                    compared=row.compared,
                    not_comparable=row.not_comparable,
                    agreement=row.agreement,
                    live_value=row.live_value,
                    agreed_value=row.agreed_value,
                    estimates=[_estimate(estimate) for estimate in row.estimates.values()],
                    refused=[f"{name}: {reason}" for name, reason in row.refused.items()],
                    notes=row.notes,
                )
                for row in comparisons
            ],
        )

    async def ListAlerts(
        self, request: monitor_pb2.ListAlertsRequest, context: Any
    ) -> monitor_pb2.ListAlertsResponse:
        if request.min_severity and request.min_severity not in _SEVERITY_NAMES:
            raise InvalidArgument(f"unknown severity {request.min_severity}", field="min_severity")
        alerts, next_token, total = await self._service.list_alerts(
            request.deployment,
            request.include_resolved,
            _SEVERITY_NAMES.get(request.min_severity),
            request.page.page_size,
            request.page.page_token,
        )
        return monitor_pb2.ListAlertsResponse(
            alerts=[
                monitor_pb2.Alert(
                    id=alert.id,
                    rule=alert.rule,
                    deployment=alert.deployment,
                    severity=_SEVERITIES[alert.severity],
                    state=monitor_pb2.ALERT_STATE_FIRING
                    if alert.state == "firing"
                    else monitor_pb2.ALERT_STATE_RESOLVED,
                    summary=alert.summary,
                    labels=alert.labels,
                    value=alert.value,
                    threshold=alert.threshold,
                    started_at=_timestamp(alert.started_at),
                    resolved_at=_timestamp(alert.resolved_at) if alert.resolved_at is not None else None,
                )
                for alert in alerts
            ],
            page=common_pb2.PageResponse(next_page_token=next_token, total_size=total),
        )

    async def GetDrift(
        self, request: monitor_pb2.GetDriftRequest, context: Any
    ) -> monitor_pb2.GetDriftResponse:
        model = None
        if request.HasField("reference_model"):
            if not request.reference_model.name:
                raise InvalidArgument("needs a model name", field="reference_model.name")
            model = (request.reference_model.name, request.reference_model.version)
        window, report = await self._service.drift(
            request.deployment,
            window_seconds=_seconds(request.window, request.HasField("window")),
            features=list(request.features),
            model=model,
        )
        return monitor_pb2.GetDriftResponse(
            features=[_drift(row) for row in report.features],
            score=_drift(report.score),
            reference_model=common_pb2.ModelRef(
                name=report.reference.model_name, version=report.reference.model_version
            ),
            window_start=_timestamp(window.start),
            window_end=_timestamp(window.end),
        )


_SEVERITY_NAMES: dict[int, Literal["ok", "warning", "critical"]] = {
    monitor_pb2.SEVERITY_OK: "ok",
    monitor_pb2.SEVERITY_WARNING: "warning",
    monitor_pb2.SEVERITY_CRITICAL: "critical",
}
_SEVERITIES = {
    "ok": monitor_pb2.SEVERITY_OK,
    "warning": monitor_pb2.SEVERITY_WARNING,
    "critical": monitor_pb2.SEVERITY_CRITICAL,
}


def _drift(row: DistributionDrift) -> monitor_pb2.DistributionDrift:
    return monitor_pb2.DistributionDrift(
        name=row.name,
        psi=row.psi or 0.0,
        ks_statistic=row.ks_statistic or 0.0,
        reference_mean=row.reference_mean or 0.0,
        current_mean=row.current_mean or 0.0,
        reference_missing_rate=row.reference_missing_rate,
        current_missing_rate=row.current_missing_rate,
        current_count=row.current_count,
        severity=_SEVERITIES[row.severity],
    )
