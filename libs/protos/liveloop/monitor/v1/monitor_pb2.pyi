import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from libs.protos.liveloop.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_OK: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]

class Estimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATOR_UNSPECIFIED: _ClassVar[Estimator]
    ESTIMATOR_IPS: _ClassVar[Estimator]
    ESTIMATOR_SNIPS: _ClassVar[Estimator]
    ESTIMATOR_DR: _ClassVar[Estimator]
    ESTIMATOR_DM: _ClassVar[Estimator]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_OK: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState
ESTIMATOR_UNSPECIFIED: Estimator
ESTIMATOR_IPS: Estimator
ESTIMATOR_SNIPS: Estimator
ESTIMATOR_DR: Estimator
ESTIMATOR_DM: Estimator

class GetSummaryRequest(_message.Message):
    __slots__ = ("deployment", "window", "end_time")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window: _duration_pb2.Duration
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, deployment: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UptakeRow(_message.Message):
    __slots__ = ("offer", "segment", "impressions", "accepted", "uptake_rate", "reward_sum", "explored_impressions", "variant")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UPTAKE_RATE_FIELD_NUMBER: _ClassVar[int]
    REWARD_SUM_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    offer: str
    segment: str
    impressions: int
    accepted: int
    uptake_rate: float
    reward_sum: float
    explored_impressions: int
    variant: str
    def __init__(self, offer: _Optional[str] = ..., segment: _Optional[str] = ..., impressions: _Optional[int] = ..., accepted: _Optional[int] = ..., uptake_rate: _Optional[float] = ..., reward_sum: _Optional[float] = ..., explored_impressions: _Optional[int] = ..., variant: _Optional[str] = ...) -> None: ...

class LatencyQuantiles(_message.Message):
    __slots__ = ("method", "count", "p50_seconds", "p90_seconds", "p99_seconds", "p999_seconds", "max_seconds")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P999_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    method: str
    count: int
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    p999_seconds: float
    max_seconds: float
    def __init__(self, method: _Optional[str] = ..., count: _Optional[int] = ..., p50_seconds: _Optional[float] = ..., p90_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., p999_seconds: _Optional[float] = ..., max_seconds: _Optional[float] = ...) -> None: ...

class ReplicaRevision(_message.Message):
    __slots__ = ("replica_id", "config_revision", "last_seen", "invocations", "stale")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    config_revision: int
    last_seen: _timestamp_pb2.Timestamp
    invocations: int
    stale: bool
    def __init__(self, replica_id: _Optional[str] = ..., config_revision: _Optional[int] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., invocations: _Optional[int] = ..., stale: _Optional[bool] = ...) -> None: ...

class GetSummaryResponse(_message.Message):
    __slots__ = ("deployment", "window_start", "window_end", "invocations", "responses", "uptake_rate", "by_offer", "by_segment", "explore_share", "latency", "replicas", "head_revision", "by_offer_segment", "late_responses", "duplicate_responses", "by_variant", "impressions", "accepted", "decision_log")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    UPTAKE_RATE_FIELD_NUMBER: _ClassVar[int]
    BY_OFFER_FIELD_NUMBER: _ClassVar[int]
    BY_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_SHARE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    BY_OFFER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    LATE_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    BY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DECISION_LOG_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    invocations: int
    responses: int
    uptake_rate: float
    by_offer: _containers.RepeatedCompositeFieldContainer[UptakeRow]
    by_segment: _containers.RepeatedCompositeFieldContainer[UptakeRow]
    explore_share: float
    latency: _containers.RepeatedCompositeFieldContainer[LatencyQuantiles]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaRevision]
    head_revision: int
    by_offer_segment: _containers.RepeatedCompositeFieldContainer[UptakeRow]
    late_responses: int
    duplicate_responses: int
    by_variant: _containers.RepeatedCompositeFieldContainer[UptakeRow]
    impressions: int
    accepted: int
    decision_log: DecisionLogStatus
    def __init__(self, deployment: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., invocations: _Optional[int] = ..., responses: _Optional[int] = ..., uptake_rate: _Optional[float] = ..., by_offer: _Optional[_Iterable[_Union[UptakeRow, _Mapping]]] = ..., by_segment: _Optional[_Iterable[_Union[UptakeRow, _Mapping]]] = ..., explore_share: _Optional[float] = ..., latency: _Optional[_Iterable[_Union[LatencyQuantiles, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaRevision, _Mapping]]] = ..., head_revision: _Optional[int] = ..., by_offer_segment: _Optional[_Iterable[_Union[UptakeRow, _Mapping]]] = ..., late_responses: _Optional[int] = ..., duplicate_responses: _Optional[int] = ..., by_variant: _Optional[_Iterable[_Union[UptakeRow, _Mapping]]] = ..., impressions: _Optional[int] = ..., accepted: _Optional[int] = ..., decision_log: _Optional[_Union[DecisionLogStatus, _Mapping]] = ...) -> None: ...

class DecisionLogStatus(_message.Message):
    __slots__ = ("lag", "trimmed_entries", "malformed_entries", "consumed_entries")
    class MalformedEntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LAG_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    lag: int
    trimmed_entries: int
    malformed_entries: _containers.ScalarMap[str, int]
    consumed_entries: int
    def __init__(self, lag: _Optional[int] = ..., trimmed_entries: _Optional[int] = ..., malformed_entries: _Optional[_Mapping[str, int]] = ..., consumed_entries: _Optional[int] = ...) -> None: ...

class GetTimeSeriesRequest(_message.Message):
    __slots__ = ("deployment", "window", "end_time")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window: _duration_pb2.Duration
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, deployment: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class OfferMinute(_message.Message):
    __slots__ = ("minute", "offer", "impressions", "accepted", "explored_impressions")
    MINUTE_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    minute: _timestamp_pb2.Timestamp
    offer: str
    impressions: int
    accepted: int
    explored_impressions: int
    def __init__(self, minute: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., offer: _Optional[str] = ..., impressions: _Optional[int] = ..., accepted: _Optional[int] = ..., explored_impressions: _Optional[int] = ...) -> None: ...

class InvokeMinute(_message.Message):
    __slots__ = ("minute", "invocations", "p50_seconds", "p99_seconds")
    MINUTE_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    minute: _timestamp_pb2.Timestamp
    invocations: int
    p50_seconds: float
    p99_seconds: float
    def __init__(self, minute: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., invocations: _Optional[int] = ..., p50_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ...) -> None: ...

class GetTimeSeriesResponse(_message.Message):
    __slots__ = ("deployment", "window_start", "window_end", "offers", "invocations")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    offers: _containers.RepeatedCompositeFieldContainer[OfferMinute]
    invocations: _containers.RepeatedCompositeFieldContainer[InvokeMinute]
    def __init__(self, deployment: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., offers: _Optional[_Iterable[_Union[OfferMinute, _Mapping]]] = ..., invocations: _Optional[_Iterable[_Union[InvokeMinute, _Mapping]]] = ...) -> None: ...

class GetDriftRequest(_message.Message):
    __slots__ = ("deployment", "window", "features", "reference_model")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window: _duration_pb2.Duration
    features: _containers.RepeatedScalarFieldContainer[str]
    reference_model: _common_pb2.ModelRef
    def __init__(self, deployment: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., reference_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class DistributionDrift(_message.Message):
    __slots__ = ("name", "psi", "ks_statistic", "reference_mean", "current_mean", "reference_missing_rate", "current_missing_rate", "current_count", "severity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_STATISTIC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MEAN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MEAN_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    psi: float
    ks_statistic: float
    reference_mean: float
    current_mean: float
    reference_missing_rate: float
    current_missing_rate: float
    current_count: int
    severity: Severity
    def __init__(self, name: _Optional[str] = ..., psi: _Optional[float] = ..., ks_statistic: _Optional[float] = ..., reference_mean: _Optional[float] = ..., current_mean: _Optional[float] = ..., reference_missing_rate: _Optional[float] = ..., current_missing_rate: _Optional[float] = ..., current_count: _Optional[int] = ..., severity: _Optional[_Union[Severity, str]] = ...) -> None: ...

class GetDriftResponse(_message.Message):
    __slots__ = ("features", "score", "reference_model", "window_start", "window_end")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[DistributionDrift]
    score: DistributionDrift
    reference_model: _common_pb2.ModelRef
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    def __init__(self, features: _Optional[_Iterable[_Union[DistributionDrift, _Mapping]]] = ..., score: _Optional[_Union[DistributionDrift, _Mapping]] = ..., reference_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("deployment", "include_resolved", "min_severity", "page")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    include_resolved: bool
    min_severity: Severity
    page: _common_pb2.PageRequest
    def __init__(self, deployment: _Optional[str] = ..., include_resolved: _Optional[bool] = ..., min_severity: _Optional[_Union[Severity, str]] = ..., page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "rule", "deployment", "severity", "state", "summary", "labels", "value", "threshold", "started_at", "resolved_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    rule: str
    deployment: str
    severity: Severity
    state: AlertState
    summary: str
    labels: _containers.ScalarMap[str, str]
    value: float
    threshold: float
    started_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., rule: _Optional[str] = ..., deployment: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., state: _Optional[_Union[AlertState, str]] = ..., summary: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts", "page")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    page: _common_pb2.PageResponse
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class EvaluatePolicyRequest(_message.Message):
    __slots__ = ("deployment", "candidate_spec_json", "candidate_revision", "window", "end_time", "estimators", "confidence_level", "max_importance_weight", "bootstrap_samples", "seed", "logged_table")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_IMPORTANCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGGED_TABLE_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    candidate_spec_json: str
    candidate_revision: int
    window: _duration_pb2.Duration
    end_time: _timestamp_pb2.Timestamp
    estimators: _containers.RepeatedScalarFieldContainer[Estimator]
    confidence_level: float
    max_importance_weight: float
    bootstrap_samples: int
    seed: int
    logged_table: str
    def __init__(self, deployment: _Optional[str] = ..., candidate_spec_json: _Optional[str] = ..., candidate_revision: _Optional[int] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., estimators: _Optional[_Iterable[_Union[Estimator, str]]] = ..., confidence_level: _Optional[float] = ..., max_importance_weight: _Optional[float] = ..., bootstrap_samples: _Optional[int] = ..., seed: _Optional[int] = ..., logged_table: _Optional[str] = ...) -> None: ...

class PolicyEstimate(_message.Message):
    __slots__ = ("estimator", "value", "lower", "upper", "std_error", "lift")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    estimator: Estimator
    value: float
    lower: float
    upper: float
    std_error: float
    lift: float
    def __init__(self, estimator: _Optional[_Union[Estimator, str]] = ..., value: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., std_error: _Optional[float] = ..., lift: _Optional[float] = ...) -> None: ...

class EvaluatePolicyResponse(_message.Message):
    __slots__ = ("decisions", "usable_decisions", "logged_value", "estimates", "effective_sample_size", "max_weight", "warnings", "confidence_level", "notes", "unsupported_mass", "refused")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    USABLE_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    LOGGED_VALUE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_MASS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    decisions: int
    usable_decisions: int
    logged_value: float
    estimates: _containers.RepeatedCompositeFieldContainer[PolicyEstimate]
    effective_sample_size: float
    max_weight: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    confidence_level: float
    notes: _containers.RepeatedScalarFieldContainer[str]
    unsupported_mass: float
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decisions: _Optional[int] = ..., usable_decisions: _Optional[int] = ..., logged_value: _Optional[float] = ..., estimates: _Optional[_Iterable[_Union[PolicyEstimate, _Mapping]]] = ..., effective_sample_size: _Optional[float] = ..., max_weight: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., confidence_level: _Optional[float] = ..., notes: _Optional[_Iterable[str]] = ..., unsupported_mass: _Optional[float] = ..., refused: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareShadowRequest(_message.Message):
    __slots__ = ("deployment", "window", "end_time")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window: _duration_pb2.Duration
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, deployment: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ShadowComparison(_message.Message):
    __slots__ = ("shadow", "live_decisions", "compared", "not_comparable", "agreement", "live_value", "agreed_value", "estimates", "refused", "notes")
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    LIVE_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    NOT_COMPARABLE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LIVE_VALUE_FIELD_NUMBER: _ClassVar[int]
    AGREED_VALUE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    shadow: str
    live_decisions: int
    compared: int
    not_comparable: int
    agreement: float
    live_value: float
    agreed_value: float
    estimates: _containers.RepeatedCompositeFieldContainer[PolicyEstimate]
    refused: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shadow: _Optional[str] = ..., live_decisions: _Optional[int] = ..., compared: _Optional[int] = ..., not_comparable: _Optional[int] = ..., agreement: _Optional[float] = ..., live_value: _Optional[float] = ..., agreed_value: _Optional[float] = ..., estimates: _Optional[_Iterable[_Union[PolicyEstimate, _Mapping]]] = ..., refused: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareShadowResponse(_message.Message):
    __slots__ = ("deployment", "window_start", "window_end", "shadows")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    shadows: _containers.RepeatedCompositeFieldContainer[ShadowComparison]
    def __init__(self, deployment: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shadows: _Optional[_Iterable[_Union[ShadowComparison, _Mapping]]] = ...) -> None: ...
