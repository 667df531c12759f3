import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from libs.protos.liveloop.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_TYPE_UNSPECIFIED: _ClassVar[ModelType]
    MODEL_TYPE_LOGISTIC_REGRESSION: _ClassVar[ModelType]
    MODEL_TYPE_MLP: _ClassVar[ModelType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class ModelUse(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_USE_UNSPECIFIED: _ClassVar[ModelUse]
    MODEL_USE_SCORE: _ClassVar[ModelUse]
    MODEL_USE_PRIOR: _ClassVar[ModelUse]
MODEL_TYPE_UNSPECIFIED: ModelType
MODEL_TYPE_LOGISTIC_REGRESSION: ModelType
MODEL_TYPE_MLP: ModelType
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
MODEL_USE_UNSPECIFIED: ModelUse
MODEL_USE_SCORE: ModelUse
MODEL_USE_PRIOR: ModelUse

class Split(_message.Message):
    __slots__ = ("validation_fraction", "test_fraction", "time_column", "group_column")
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TIME_COLUMN_FIELD_NUMBER: _ClassVar[int]
    GROUP_COLUMN_FIELD_NUMBER: _ClassVar[int]
    validation_fraction: float
    test_fraction: float
    time_column: str
    group_column: str
    def __init__(self, validation_fraction: _Optional[float] = ..., test_fraction: _Optional[float] = ..., time_column: _Optional[str] = ..., group_column: _Optional[str] = ...) -> None: ...

class EarlyStopping(_message.Message):
    __slots__ = ("patience", "metric", "min_delta")
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    patience: int
    metric: str
    min_delta: float
    def __init__(self, patience: _Optional[int] = ..., metric: _Optional[str] = ..., min_delta: _Optional[float] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("model_name", "training_set", "label", "features", "model_type", "hyperparameters", "split", "seed", "early_stopping", "max_epochs", "description", "workers")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    training_set: str
    label: str
    features: _containers.RepeatedScalarFieldContainer[str]
    model_type: ModelType
    hyperparameters: _containers.MessageMap[str, _struct_pb2.Value]
    split: Split
    seed: int
    early_stopping: EarlyStopping
    max_epochs: int
    description: str
    workers: int
    def __init__(self, model_name: _Optional[str] = ..., training_set: _Optional[str] = ..., label: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., model_type: _Optional[_Union[ModelType, str]] = ..., hyperparameters: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., split: _Optional[_Union[Split, _Mapping]] = ..., seed: _Optional[int] = ..., early_stopping: _Optional[_Union[EarlyStopping, _Mapping]] = ..., max_epochs: _Optional[int] = ..., description: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("spec", "dry_run")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    spec: TrainingSpec
    dry_run: bool
    def __init__(self, spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class StartTrainingResponse(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_start")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_START_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_start: bool
    def __init__(self, job_id: _Optional[str] = ..., from_start: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "epoch", "max_epochs", "loss", "validation_loss", "metrics", "eta_seconds", "time", "message", "model", "progress")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    epoch: int
    max_epochs: int
    loss: float
    validation_loss: float
    metrics: _containers.ScalarMap[str, float]
    eta_seconds: float
    time: _timestamp_pb2.Timestamp
    message: str
    model: _common_pb2.ModelRef
    progress: _common_pb2.Progress
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., epoch: _Optional[int] = ..., max_epochs: _Optional[int] = ..., loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., eta_seconds: _Optional[float] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "created_at", "started_at", "finished_at", "error", "epochs_done", "model", "author")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_DONE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: TrainingSpec
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    error: str
    epochs_done: int
    model: _common_pb2.ModelRef
    author: str
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., epochs_done: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., author: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page", "state", "model_name")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    state: JobState
    model_name: str
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., model_name: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "page")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    page: _common_pb2.PageResponse
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class ModelMetrics(_message.Message):
    __slots__ = ("auc", "log_loss", "calibration_error", "brier_score", "rows", "other")
    class OtherEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUC_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    BRIER_SCORE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    auc: float
    log_loss: float
    calibration_error: float
    brier_score: float
    rows: int
    other: _containers.ScalarMap[str, float]
    def __init__(self, auc: _Optional[float] = ..., log_loss: _Optional[float] = ..., calibration_error: _Optional[float] = ..., brier_score: _Optional[float] = ..., rows: _Optional[int] = ..., other: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ModelFeature(_message.Message):
    __slots__ = ("name", "dtype", "encoding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    encoding: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., encoding: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "model_type", "metrics", "features", "label", "training_set", "data_fingerprint", "code_version", "artifact_uri", "checksum", "created_at", "job_id", "hyperparameters", "seed", "training_rows", "deployments", "description", "input_columns")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SET_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ROWS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    model_type: ModelType
    metrics: ModelMetrics
    features: _containers.RepeatedCompositeFieldContainer[ModelFeature]
    label: str
    training_set: str
    data_fingerprint: str
    code_version: str
    artifact_uri: str
    checksum: str
    created_at: _timestamp_pb2.Timestamp
    job_id: str
    hyperparameters: _containers.MessageMap[str, _struct_pb2.Value]
    seed: int
    training_rows: int
    deployments: _containers.RepeatedScalarFieldContainer[str]
    description: str
    input_columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., model_type: _Optional[_Union[ModelType, str]] = ..., metrics: _Optional[_Union[ModelMetrics, _Mapping]] = ..., features: _Optional[_Iterable[_Union[ModelFeature, _Mapping]]] = ..., label: _Optional[str] = ..., training_set: _Optional[str] = ..., data_fingerprint: _Optional[str] = ..., code_version: _Optional[str] = ..., artifact_uri: _Optional[str] = ..., checksum: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_id: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., seed: _Optional[int] = ..., training_rows: _Optional[int] = ..., deployments: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., input_columns: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "latest_version", "version_count", "updated_at", "latest_metrics", "deployments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    latest_version: int
    version_count: int
    updated_at: _timestamp_pb2.Timestamp
    latest_metrics: ModelMetrics
    deployments: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeploymentRef]
    def __init__(self, name: _Optional[str] = ..., latest_version: _Optional[int] = ..., version_count: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latest_metrics: _Optional[_Union[ModelMetrics, _Mapping]] = ..., deployments: _Optional[_Iterable[_Union[_common_pb2.DeploymentRef, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page", "name_prefix")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    name_prefix: str
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., name_prefix: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "page")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    page: _common_pb2.PageResponse
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelVersion
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[_Union[ModelVersion, _Mapping]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class GetTrainingReferenceRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetTrainingReferenceResponse(_message.Message):
    __slots__ = ("model", "reference_json", "inputs", "rows", "created_at")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    reference_json: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    rows: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference_json: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., rows: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("name", "version_a", "version_b", "evaluation_table")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_A_FIELD_NUMBER: _ClassVar[int]
    VERSION_B_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_TABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version_a: int
    version_b: int
    evaluation_table: str
    def __init__(self, name: _Optional[str] = ..., version_a: _Optional[int] = ..., version_b: _Optional[int] = ..., evaluation_table: _Optional[str] = ...) -> None: ...

class MetricDelta(_message.Message):
    __slots__ = ("metric", "a", "b", "delta", "b_better")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    B_BETTER_FIELD_NUMBER: _ClassVar[int]
    metric: str
    a: float
    b: float
    delta: float
    b_better: bool
    def __init__(self, metric: _Optional[str] = ..., a: _Optional[float] = ..., b: _Optional[float] = ..., delta: _Optional[float] = ..., b_better: _Optional[bool] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("a", "b", "deltas", "features_added", "features_removed", "same_data", "evaluated_rows")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_ADDED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SAME_DATA_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_ROWS_FIELD_NUMBER: _ClassVar[int]
    a: ModelVersion
    b: ModelVersion
    deltas: _containers.RepeatedCompositeFieldContainer[MetricDelta]
    features_added: _containers.RepeatedScalarFieldContainer[str]
    features_removed: _containers.RepeatedScalarFieldContainer[str]
    same_data: bool
    evaluated_rows: int
    def __init__(self, a: _Optional[_Union[ModelVersion, _Mapping]] = ..., b: _Optional[_Union[ModelVersion, _Mapping]] = ..., deltas: _Optional[_Iterable[_Union[MetricDelta, _Mapping]]] = ..., features_added: _Optional[_Iterable[str]] = ..., features_removed: _Optional[_Iterable[str]] = ..., same_data: _Optional[bool] = ..., evaluated_rows: _Optional[int] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "version", "deployment", "dry_run", "message", "use", "prior_weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    deployment: str
    dry_run: bool
    message: str
    use: ModelUse
    prior_weight: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., deployment: _Optional[str] = ..., dry_run: _Optional[bool] = ..., message: _Optional[str] = ..., use: _Optional[_Union[ModelUse, str]] = ..., prior_weight: _Optional[float] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("config_revision", "deployment", "diff", "model")
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    config_revision: int
    deployment: str
    diff: str
    model: _common_pb2.ModelRef
    def __init__(self, config_revision: _Optional[int] = ..., deployment: _Optional[str] = ..., diff: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...
